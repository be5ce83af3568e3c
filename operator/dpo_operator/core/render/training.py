"""The training Job: an Indexed Job of `nodes` pods running `accelerate launch` with the pod
contract's env, the network profile's pieces and the topology the scheduler or Kueue reads.
"""

from __future__ import annotations

from dpo_contract.pod import (
    ACCELERATE_CONFIG_PATH,
    DEFAULT_MASTER_PORT,
    ENV_JOB,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_METRICS_PORT,
    ENV_NAMESPACE,
    ENV_NNODES,
    ENV_NODE_NAME,
    ENV_NODE_RANK,
    ENV_NPROC_PER_NODE,
    ENV_POD_NAME,
    TRAINER_CONFIG_PATH,
)

from dpo_operator.api import DPOJob
from dpo_operator.core.names import (
    LABEL_COMPONENT,
    LABEL_JOB,
    master_address,
    service_name,
    training_job_name,
)
from dpo_operator.core.network import network_pieces
from dpo_operator.core.render.manifest import Manifest
from dpo_operator.core.render.pod import (
    COMPLETION_INDEX_FIELD,
    TRAINER_CONTAINER,
    batch_job,
    container_resources,
    container_security,
    pod_spec,
    user_env,
    volumes_and_mounts,
)
from dpo_operator.core.resolve import ResolvedJob

KUEUE_TOPOLOGY_ANNOTATIONS = {
    "Preferred": "kueue.x-k8s.io/podset-preferred-topology",
    "Required": "kueue.x-k8s.io/podset-required-topology",
}
KUEUE_SLICE_TOPOLOGY_ANNOTATION = "kueue.x-k8s.io/podset-slice-required-topology"
KUEUE_SLICE_SIZE_ANNOTATION = "kueue.x-k8s.io/podset-slice-size"


def launch_command(resolved: ResolvedJob) -> list[str]:
    """`accelerate launch` with machine count, rank, address and port passed explicitly.

    accelerate ignores torchrun's PET_* variables; without these flags every node would train
    alone with world size 1 and report success. `dpo-trainer launch --` runs it as PID 1 and
    forwards SIGTERM, so the trainer checkpoints before the pod goes away.
    """
    return [
        "dpo-trainer",
        "launch",
        "--",
        "accelerate",
        "launch",
        "--config_file",
        ACCELERATE_CONFIG_PATH,
        "--num_machines",
        f"$({ENV_NNODES})",
        "--num_processes",
        str(resolved.world_size),
        "--machine_rank",
        f"$({ENV_NODE_RANK})",
        "--main_process_ip",
        f"$({ENV_MASTER_ADDR})",
        "--main_process_port",
        f"$({ENV_MASTER_PORT})",
        "--module",
        "dpo_trainer.cli",
        "train",
        "--config",
        TRAINER_CONFIG_PATH,
    ]


def contract_env(resolved: ResolvedJob, attempt: int) -> list[Manifest]:
    """The pod contract's variables, in dependency order (later ones may use $(EARLIER))."""
    job, spec = resolved.job, resolved.spec
    env: list[Manifest] = [
        {"name": ENV_JOB, "value": job.name},
        {"name": ENV_NAMESPACE, "value": job.namespace},
        {"name": ENV_NNODES, "value": str(spec.resources.nodes)},
        {"name": ENV_NPROC_PER_NODE, "value": str(resolved.processes_per_node)},
        {"name": ENV_NODE_RANK, "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_FIELD}}},
        {"name": ENV_MASTER_ADDR, "value": master_address(job, attempt)},
        {"name": ENV_MASTER_PORT, "value": str(DEFAULT_MASTER_PORT)},
        {"name": ENV_METRICS_PORT, "value": str(spec.monitoring.port)},
        {"name": ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": ENV_NODE_NAME, "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]
    if spec.resources.gpus_per_node == 0:
        # On CPU accelerate starts one process per pod itself and, unlike torchrun, does not set
        # the ranks: torch.distributed reads them from here.
        env += [
            {"name": "RANK", "value": f"$({ENV_NODE_RANK})"},
            {"name": "WORLD_SIZE", "value": f"$({ENV_NNODES})"},
            {"name": "LOCAL_RANK", "value": "0"},
        ]
    return env


def render_training_job(resolved: ResolvedJob, attempt: int) -> Manifest:
    """An Indexed Job of `nodes` pods; pod i is machine rank i (its completion index)."""
    job, spec, settings = resolved.job, resolved.spec, resolved.settings
    gpus = 0 if settings.cpu else spec.resources.gpus_per_node
    pieces = network_pieces(
        resolved.network, gpus, spec.scheduling.node_selector, settings.tcpxo_daemon_image
    )
    volumes, mounts = volumes_and_mounts(resolved, pieces, resolved.training_disk)
    container: Manifest = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": launch_command(resolved),
        "env": contract_env(resolved, attempt)
        + [{"name": k, "value": v} for k, v in pieces.env.items()]
        + user_env(job),
        "ports": [
            {"name": "rendezvous", "containerPort": DEFAULT_MASTER_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": spec.monitoring.port, "protocol": "TCP"},
        ],
        "resources": container_resources(
            gpus,
            spec.resources.gpu_resource_name,
            spec.resources.cpu,
            resolved.memory_request,
            resolved.disk_request(resolved.training_disk),
            pieces.resources,
        ),
        "volumeMounts": mounts,
        "securityContext": container_security(pieces.capabilities),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.output.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.output.credentials_secret}}]
    pod = pod_spec(job, container, volumes)
    pod["subdomain"] = service_name(job)
    # Time for the trainer to finish the step and write (and send) a checkpoint after SIGTERM.
    pod["terminationGracePeriodSeconds"] = resolved.grace_period_seconds
    if pieces.sidecars:
        pod["initContainers"] = list(pieces.sidecars)
    annotations = dict(pieces.annotations)
    topology = spec.scheduling.topology_key
    if topology and spec.scheduling.queue_name:
        annotations.update(kueue_topology_annotations(resolved, topology))
    elif topology:
        _add_packing_affinity(pod, job, topology)
    nodes = spec.resources.nodes
    return batch_job(
        job,
        training_job_name(job, attempt),
        "train",
        attempt,
        pod,
        pod_annotations=annotations,
        suspend=spec.run_policy.suspend,
        spec_extra={
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            # The operator restarts the whole group from its checkpoint; the Job never retries
            # one pod alone, which would leave it waiting for peers that already gave up.
            "backoffLimit": 0,
            # A replacement pod starts only once the old one is gone, never beside it.
            "podReplacementPolicy": "Failed",
        },
    )


def kueue_topology_annotations(resolved: ResolvedJob, topology_key: str) -> dict[str, str]:
    """What Kueue's topology-aware scheduling reads off the training pods: the whole gang in one
    `topology_key` group (preferred or required), and for hsdp each shard group in one: the
    shards all-gather every layer, the replicas only all-reduce once a step."""
    spec = resolved.spec
    annotations = {KUEUE_TOPOLOGY_ANNOTATIONS[spec.scheduling.topology_policy]: topology_key}
    chosen = resolved.layout
    if chosen.strategy == "hsdp":
        # plan.layouts makes each hsdp shard group whole nodes: shard = nodes in it x GPUs.
        pods_per_shard_group = chosen.shard // spec.resources.gpus_per_node
        annotations[KUEUE_SLICE_TOPOLOGY_ANNOTATION] = topology_key
        annotations[KUEUE_SLICE_SIZE_ANNOTATION] = str(pods_per_shard_group)
    return annotations


def _add_packing_affinity(pod: Manifest, job: DPOJob, topology_key: str) -> None:
    selector = {"matchLabels": {LABEL_JOB: job.name, LABEL_COMPONENT: "train"}}
    term = {"topologyKey": topology_key, "labelSelector": selector}
    affinity = pod.setdefault("affinity", {})
    pod_affinity = affinity.setdefault("podAffinity", {})
    if job.spec.scheduling.topology_policy == "Required":
        # The first pod matches its own labels, so the gang's first pod picks the group.
        pod_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", []).append(term)
    else:
        preferred = {"weight": 100, "podAffinityTerm": term}
        pod_affinity.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).append(
            preferred
        )
