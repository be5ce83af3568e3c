"""Rendering a DPOJob into its children: golden files, the Kubernetes schema, the pod contract."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dpo_contract.config import TrainerConfig
from dpo_contract.pod import (
    EXIT_BAD_INPUT,
    EXIT_CHAMPION_CHANGED,
    EXIT_GATE_REJECTED,
    EXIT_WRONG_ENVIRONMENT,
    TRAINER_CONFIG_FILE,
)
from dpo_operator.api import DPOJob
from dpo_operator.core.render import (
    KUEUE_TOPOLOGY_ANNOTATIONS,
    render_all,
    render_child,
    render_config_map,
    render_eval_job,
    render_network_policy,
    render_promote_job,
    render_service,
    render_training_job,
    to_yaml,
    trainer_config,
)
from dpo_operator.core.resolve import resolve
from dpo_operator.core.settings import Settings
from dpo_operator.core.validate import parse_dpojob

from tests.conftest import REPO, example, example_manifest, job_with

GOLDEN = REPO / "tests" / "unit" / "golden"
KUBERNETES_VERSION = kubernetes_validate.latest_version()

Manifest = dict[str, Any]


def pod_spec(job_manifest: Manifest) -> Manifest:
    spec: Manifest = job_manifest["spec"]["template"]["spec"]
    return spec


def trainer(job_manifest: Manifest) -> Manifest:
    container: Manifest = pod_spec(job_manifest)["containers"][0]
    return container


def env_of(container: Manifest) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_rendered_examples_match_their_golden_files(example_job: DPOJob) -> None:
    rendered = to_yaml(render_all(resolve(example_job)))
    golden = GOLDEN / f"{example_job.name}.yaml"
    if os.environ.get("DPO_UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert golden.exists(), f"no golden file: run DPO_UPDATE_GOLDEN=1 pytest {__file__}"
    assert rendered == golden.read_text(), (
        "rendering changed; review the diff and run DPO_UPDATE_GOLDEN=1 pytest to accept it"
    )


def test_every_rendered_object_is_valid_kubernetes(example_job: DPOJob) -> None:
    for obj in render_all(resolve(example_job)):
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_two_node_job_finds_rank_zero_by_dns_without_extra_controllers() -> None:
    job = example("llama-8b-lora-infiniband")
    train = render_training_job(resolve(job), 1)
    env = env_of(trainer(train))
    assert train["spec"]["completionMode"] == "Indexed"
    assert train["spec"]["completions"] == train["spec"]["parallelism"] == 2
    # Indexed Job pods are named <job>-<index> and live under the Service's subdomain.
    assert env["MASTER_ADDR"] == "llama-8b-ultrafeedback-train-1-0.llama-8b-ultrafeedback-nodes"
    assert pod_spec(train)["subdomain"] == render_service(resolve(job))["metadata"]["name"]
    assert env["NODE_RANK"] == {
        "fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        }
    }
    assert env["NNODES"] == "2"
    assert env["NPROC_PER_NODE"] == "8"


def test_each_attempt_gets_its_own_job_and_rank_zero_address() -> None:
    job = example("llama-8b-lora-infiniband")
    second = render_training_job(resolve(job), 2)
    assert second["metadata"]["name"] == "llama-8b-ultrafeedback-train-2"
    assert env_of(trainer(second))["MASTER_ADDR"].startswith("llama-8b-ultrafeedback-train-2-0.")
    assert second["metadata"]["labels"]["dpo.dev/attempt"] == "2"


def test_headless_service_resolves_rank_zero_before_it_is_ready() -> None:
    job = example("llama-8b-lora-infiniband")
    service = render_service(resolve(job))
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod_labels = render_training_job(resolve(job), 1)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_launch_passes_machine_count_rank_address_and_port_explicitly() -> None:
    command = trainer(render_training_job(resolve(example("llama-8b-lora-infiniband")), 1))[
        "command"
    ]
    # PID 1 forwards SIGTERM to accelerate and the trainer, so they checkpoint before exiting.
    assert command[:5] == ["dpo-trainer", "launch", "--", "accelerate", "launch"]
    flags = dict(zip(command[5::2], command[6::2], strict=False))
    assert flags["--num_machines"] == "$(NNODES)"
    assert flags["--machine_rank"] == "$(NODE_RANK)"
    assert flags["--main_process_ip"] == "$(MASTER_ADDR)"
    assert flags["--main_process_port"] == "$(MASTER_PORT)"
    assert flags["--num_processes"] == "16"
    assert flags["--config_file"] == "/etc/dpo/accelerate.yaml"
    assert command[-4:] == ["dpo_trainer.cli", "train", "--config", "/etc/dpo/trainer.json"]


def test_every_variable_the_command_references_is_defined_before_use(example_job: DPOJob) -> None:
    container = trainer(render_training_job(resolve(example_job), 1))
    defined: set[str] = set()
    for entry in container["env"]:
        for reference in re.findall(r"\$\((\w+)\)", entry.get("value", "")):
            assert reference in defined, f"{entry['name']} uses $({reference}) before it is set"
        defined.add(entry["name"])
    for reference in re.findall(r"\$\((\w+)\)", " ".join(container["command"])):
        assert reference in defined


def test_cpu_pods_receive_their_rank_for_gloo() -> None:
    env = env_of(
        trainer(render_training_job(resolve(job_with(resources={"nodes": 2, "gpusPerNode": 0})), 1))
    )
    assert env["RANK"] == "$(NODE_RANK)"
    assert env["WORLD_SIZE"] == "$(NNODES)"
    assert env["LOCAL_RANK"] == "0"


def test_shared_memory_is_a_sized_memory_volume() -> None:
    train = render_training_job(resolve(example("full-finetune-hsdp-efa")), 1)
    volumes = {v["name"]: v for v in pod_spec(train)["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "128Gi"}
    mounts = {m["mountPath"]: m["name"] for m in trainer(train)["volumeMounts"]}
    assert mounts["/dev/shm"] == "dshm"


def test_gpus_and_rdma_devices_are_requested_as_limits() -> None:
    limits = trainer(render_training_job(resolve(example("llama-8b-lora-infiniband")), 1))[
        "resources"
    ]["limits"]
    assert limits["nvidia.com/gpu"] == "8"
    assert limits["rdma/ib"] == "8"
    assert limits["memory"] == "800Gi"


def test_pods_are_locked_down(example_job: DPOJob) -> None:
    for obj in render_all(resolve(example_job)):
        if obj["kind"] != "Job":
            continue
        pod = pod_spec(obj)
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["restartPolicy"] == "Never"
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]


def test_children_are_owned_and_labelled_when_the_dpojob_exists() -> None:
    job = job_with()
    applied = job.model_copy(update={"metadata": job.metadata.model_copy(update={"uid": "u-1"})})
    children = render_all(resolve(applied))
    shared = [obj for obj in children if obj["kind"] == "NetworkPolicy"]
    assert [obj["metadata"].get("ownerReferences") for obj in shared] == [None], (
        "the namespace's NetworkPolicy serves every DPOJob there: no one owns it"
    )
    for obj in children:
        if obj in shared:
            continue
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "dpo.dev/v1alpha1",
            "kind": "DPOJob",
            "name": "demo",
            "uid": "u-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        labels = obj["metadata"]["labels"]
        assert labels["dpo.dev/job-name"] == "demo"
        assert labels["app.kubernetes.io/managed-by"] == "dpo-operator"
        assert labels["app.kubernetes.io/instance"] == "demo"


def test_a_manifest_never_applied_renders_without_owner_references() -> None:
    assert all("ownerReferences" not in obj["metadata"] for obj in render_all(resolve(job_with())))


def test_kueue_queue_label_creates_jobs_suspended() -> None:
    job = example("kueue-queued")
    train, evaluation = render_training_job(resolve(job), 1), render_eval_job(resolve(job), 1)
    for queued in (train, evaluation):
        assert queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
        assert queued["spec"]["suspend"] is True
    template = train["spec"]["template"]
    assert template["metadata"]["annotations"]["kueue.x-k8s.io/podset-preferred-topology"] == (
        "cloud.provider.com/topology-block"
    )
    assert template["spec"]["priorityClassName"] == "training-high"


def test_unqueued_jobs_run_at_once_unless_suspended() -> None:
    assert render_training_job(resolve(job_with()), 1)["spec"]["suspend"] is False
    suspended = job_with(runPolicy={"suspend": True})
    assert render_training_job(resolve(suspended), 1)["spec"]["suspend"] is True


def test_topology_key_without_kueue_packs_pods_with_preferred_affinity() -> None:
    train = render_training_job(resolve(example("full-finetune-hsdp-efa")), 1)
    (term,) = pod_spec(train)["affinity"]["podAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "topology.k8s.aws/network-node-layer-3"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"]["dpo.dev/job-name"] == (
        "llama-70b-full-dpo"
    )


def test_a_required_topology_without_kueue_is_required_pod_affinity() -> None:
    job = example("full-finetune-hsdp-efa")
    required = job.model_copy(
        update={
            "spec": job.spec.model_copy(
                update={
                    "scheduling": job.spec.scheduling.model_copy(
                        update={"topology_policy": "Required"}
                    )
                }
            )
        }
    )
    affinity = pod_spec(render_training_job(resolve(required), 1))["affinity"]["podAffinity"]
    assert "preferredDuringSchedulingIgnoredDuringExecution" not in affinity
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "topology.k8s.aws/network-node-layer-3"


@pytest.mark.parametrize(("policy", "annotation"), list(KUEUE_TOPOLOGY_ANNOTATIONS.items()))
def test_a_queued_hsdp_gang_asks_kueue_for_its_topology_and_one_slice_per_shard_group(
    policy: str, annotation: str
) -> None:
    # 8 nodes: two replicas of a shard group of 4 nodes (32 GPUs) each.
    manifest = example_manifest("full-finetune-hsdp-efa")
    manifest["spec"]["parallelism"]["strategy"] = "hsdp"
    manifest["spec"]["resources"]["nodes"] = 8
    scheduling = manifest["spec"]["scheduling"]
    scheduling.update({"queueName": "gpus", "topologyPolicy": policy})
    job = parse_dpojob(manifest)
    annotations = render_training_job(resolve(job), 1)["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations[annotation] == scheduling["topologyKey"]
    assert resolve(job).layout.shard == 32
    assert annotations["kueue.x-k8s.io/podset-slice-required-topology"] == scheduling["topologyKey"]
    assert annotations["kueue.x-k8s.io/podset-slice-size"] == "4"
    assert "affinity" not in pod_spec(render_training_job(resolve(job), 1)), (
        "Kueue places, not affinity"
    )


def test_the_group_is_restarted_by_the_operator_never_pod_by_pod() -> None:
    spec = render_training_job(resolve(job_with()), 1)["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["podReplacementPolicy"] == "Failed"


def test_eval_and_promote_never_retry_bad_input_a_wrong_environment_or_a_rejection() -> None:
    job = example("quickstart")
    evaluation, promote = render_eval_job(resolve(job), 1), render_promote_job(resolve(job), 1)
    eval_rules = evaluation["spec"]["podFailurePolicy"]["rules"]
    assert eval_rules[0]["action"] == "FailJob"
    assert eval_rules[0]["onExitCodes"]["values"] == [
        EXIT_BAD_INPUT,
        EXIT_GATE_REJECTED,
        EXIT_WRONG_ENVIRONMENT,
    ]
    assert trainer(evaluation)["command"] == [
        "dpo-trainer",
        "eval",
        "--config",
        "/etc/dpo/trainer.json",
    ]
    assert promote["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [
        EXIT_BAD_INPUT,
        EXIT_WRONG_ENVIRONMENT,
        EXIT_CHAMPION_CHANGED,
    ]
    assert "nvidia.com/gpu" not in json.dumps(trainer(promote)["resources"])


def test_promote_job_exists_only_with_a_promotion_target() -> None:
    kinds = [obj["metadata"]["name"] for obj in render_all(resolve(job_with()))]
    assert kinds == [
        "demo-config",
        "demo-nodes",
        "dpo-trainers",
        "demo-init",
        "demo-train-1",
        "demo-eval-1",
    ]
    promoted = job_with(promotion={"target": "s3://models/demo"})
    assert render_all(resolve(promoted))[-1]["metadata"]["name"] == "demo-promote-1"


def test_configmap_carries_the_pod_contract_the_trainer_parses() -> None:
    job = example("kueue-queued")
    data = render_config_map(resolve(job))["data"]
    config = TrainerConfig.model_validate_json(data[TRAINER_CONFIG_FILE])
    assert config.training.loss_type == ["sigmoid", "sft"]
    assert config.training.loss_weights == [1.0, 0.5]
    assert config.distributed.world_size == 16
    assert config.job.name == "team-a-rpo"
    accelerate = yaml.safe_load(data["accelerate.yaml"])
    assert accelerate["num_machines"] == 2
    assert accelerate["num_processes"] == 16


def test_pvc_uris_are_mounted_and_seen_as_paths_by_the_trainer() -> None:
    job = example("sigmoid-norm")
    config = TrainerConfig.model_validate_json(
        render_config_map(resolve(job))["data"][TRAINER_CONFIG_FILE]
    )
    assert config.data.train.uri == "/mnt/pvc/datasets/prefs/train.parquet"
    assert config.artifacts_dir.startswith("/mnt/pvc/dpo-checkpoints/default/qwen-7b-ln-dpo/")
    train = render_training_job(resolve(job), 1)
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(train)["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"datasets", "dpo-checkpoints"}


def test_secrets_are_passed_by_reference_only() -> None:
    env = env_of(trainer(render_training_job(resolve(example("llama-8b-lora-infiniband")), 1)))
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}


@pytest.mark.parametrize(
    ("loss", "reference_free"), [(["sigmoid"], False), (["simpo"], True), (["ipo"], False)]
)
def test_trainer_knows_when_no_reference_model_is_needed(
    loss: list[str], reference_free: bool
) -> None:
    job = job_with(dpo={"lossType": loss})
    config = TrainerConfig.model_validate_json(
        render_config_map(resolve(job))["data"][TRAINER_CONFIG_FILE]
    )
    assert config.training.reference_free is reference_free


def test_the_namespace_policy_lets_trainers_talk_and_only_the_operator_scrape() -> None:
    settings = Settings(operator_namespace="dpo-system", metrics_scrapers=("monitoring",))
    policy = render_network_policy(resolve(job_with(), settings))
    assert policy["metadata"]["namespace"] == "ml"
    spec = policy["spec"]
    trainers = {"matchLabels": {"app.kubernetes.io/managed-by": "dpo-operator"}}
    assert spec["podSelector"] == trainers
    assert spec["policyTypes"] == ["Ingress"]
    peers, scrapes = spec["ingress"]
    assert peers == {"from": [{"podSelector": trainers}]}, "same namespace, trainers only"
    assert scrapes["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    allowed = [p["namespaceSelector"]["matchLabels"] for p in scrapes["from"]]
    assert allowed == [
        {"kubernetes.io/metadata.name": "dpo-system"},
        {"kubernetes.io/metadata.name": "monitoring"},
    ]
    # The named port exists on the training container, whatever spec.monitoring.port says.
    container = render_training_job(resolve(job_with(monitoring={"port": 9555})), 1)["spec"][
        "template"
    ]
    ports = container["spec"]["containers"][0]["ports"]
    assert {"name": "metrics", "containerPort": 9555, "protocol": "TCP"} in ports
    assert all(
        o["kind"] != "NetworkPolicy"
        for o in render_all(resolve(job_with(), Settings(network_policy=False)))
    )


def test_the_model_initializer_is_a_cpu_pod_outside_kueue_that_fails_once_on_bad_input() -> None:
    queued = job_with(scheduling={"queueName": "gpus"}, resources={"gpusPerNode": 8})
    init = render_child(resolve(queued), "init", 1)
    assert init["metadata"]["name"] == "demo-init"
    assert "kueue.x-k8s.io/queue-name" not in init["metadata"]["labels"]
    assert init["spec"]["suspend"] is False, "a CPU step: nothing for Kueue to admit"
    container = trainer(init)
    assert container["command"] == ["dpo-trainer", "init", "--config", "/etc/dpo/trainer.json"]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert container["resources"]["limits"]["memory"] == "4Gi"
    assert init["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [EXIT_BAD_INPUT]
    builtin = job_with(model={"name": "builtin:tiny-llama"})
    assert "demo-init" not in [m["metadata"]["name"] for m in render_all(resolve(builtin))]
    skipped = job_with(model={"name": "org/model-7b", "initialize": False})
    assert "demo-init" not in [m["metadata"]["name"] for m in render_all(resolve(skipped))]


@pytest.mark.parametrize(
    ("model", "output", "staged"),
    [
        ("Qwen/Qwen3-8B", "pvc://runs", "/mnt/pvc/runs/ml/demo/{uid}/base-model"),
        ("Qwen/Qwen3-8B", "s3://bucket/runs", "s3://bucket/runs/ml/demo/{uid}/base-model"),
        ("s3://models/qwen3-8b", "pvc://runs", "/mnt/pvc/runs/ml/demo/{uid}/base-model"),
        ("s3://models/qwen3-8b", "s3://bucket/runs", None),
        ("pvc://models/qwen3-8b", "pvc://runs", None),
        ("builtin:tiny-llama", "pvc://runs", None),
    ],
)
def test_the_model_is_staged_where_the_training_pods_read_it_fastest(
    model: str, output: str, staged: str | None
) -> None:
    """A hub model is copied once into the run's storage (one download, not one per pod); an
    object-store model onto the run's volume; a model already on a volume or in the same kind
    of store is read where it is."""
    job = job_with(model={"name": model}, output={"uri": output})
    config = trainer_config(resolve(job))
    uid = config.job.uid
    assert config.model.staged == (staged.format(uid=uid) if staged else None)
