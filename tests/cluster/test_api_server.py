"""The CRD and the rendered objects on a real kube-apiserver and controller-manager."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from dpo_operator.core.render import render_all, to_yaml
from dpo_operator.core.resolve import resolve

from tests.cluster.control_plane import ControlPlane, Kubelet
from tests.conftest import EXAMPLES, MINIMAL, REPO, SWEEP_EXAMPLES, example, set_fields
from tests.rule_cases import (
    ACCEPTED,
    BROKEN,
    OPERATOR_ONLY,
    SWEEP_BEYOND_CEL,
    SWEEP_BROKEN,
)

EXAMPLE_NAMESPACES = ("ml-training", "team-a")


@pytest.fixture(scope="module")
def namespaces(crd_installed: ControlPlane) -> ControlPlane:
    for namespace in EXAMPLE_NAMESPACES:
        crd_installed.kubectl("create", "namespace", namespace)
    return crd_installed


def test_every_example_applies_and_kubectl_shows_the_printer_columns(
    namespaces: ControlPlane,
) -> None:
    for path in EXAMPLES:
        result = namespaces.kubectl("apply", "-f", str(path))
        assert "created" in result.stdout or "configured" in result.stdout
    table = namespaces.kubectl("get", "dpo", "--all-namespaces").stdout.splitlines()
    assert table[0].split() == [
        "NAMESPACE",
        "NAME",
        "PHASE",
        "NODES",
        "STEP",
        "PROGRESS",
        "ACCURACY",
        "MARGIN",
        "GATE",
        "AGE",
    ]
    assert len(table) == 1 + len(EXAMPLES)
    quickstart = next(line for line in table if " quickstart " in line).split()
    assert quickstart[2] == "1", "the Nodes column reads spec.resources.nodes"


def test_the_api_server_fills_in_the_defaults(namespaces: ControlPlane) -> None:
    namespaces.kubectl("apply", "-f", str(REPO / "examples" / "ipo-lora.yaml"))
    stored = yaml.safe_load(namespaces.kubectl("get", "dpo", "gemma-ipo-lora", "-o", "yaml").stdout)
    spec = stored["spec"]
    assert spec["dpo"]["lossType"] == ["ipo"]
    assert spec["runPolicy"]["maxRestarts"] == 3
    assert spec["network"]["profile"] == "tcp"
    assert spec["evalGate"]["minRewardAccuracy"] == 0.6


def _manifest(name: str, **spec: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(MINIMAL)
    manifest["metadata"] = {"name": name, "namespace": "default"}
    return set_fields(manifest, **spec)


# Schema checks (no CEL): what `kubectl apply` must say.
SCHEMA_REFUSALS = [
    (
        "local-output",
        _manifest("p", **{"output.uri": "/data/out"}),
        "spec.output.uri in body should match",
    ),
    (
        "zero-nodes",
        _manifest("q", **{"resources.nodes": 0}),
        "spec.resources.nodes in body should be greater than or equal to 1",
    ),
    (
        "unknown-field",
        _manifest("r", **{"dpo.maxPromptLength": 512}),
        'unknown field "spec.dpo.maxPromptLength"',
    ),
    (
        "extra-publishes-to-the-hub",
        _manifest("s", **{"dpo.extra": {"push_to_hub": True, "hub_model_id": "x/y"}}),
        'unknown field "spec.dpo.extra.push_to_hub"',
    ),
]


@pytest.mark.parametrize(
    ("manifest", "field", "message"),
    [pytest.param(m, f, t, id=c) for c, m, f, t in BROKEN if c not in OPERATOR_ONLY],
)
def test_the_api_server_refuses_what_dpo_validate_refuses_with_the_same_message(
    crd_installed: ControlPlane, manifest: dict[str, Any], field: str, message: str
) -> None:
    # create, not apply: `kubectl apply` drops null fields (a null is its way to delete one),
    # and a gate criterion set to null must reach the API server's rules as null.
    result = crd_installed.kubectl(
        "create", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(manifest), check=False
    )
    assert result.returncode != 0, f"accepted: {manifest}"
    assert message in result.stderr, result.stderr
    assert field.removeprefix("spec.") in result.stderr, result.stderr


@pytest.mark.parametrize("manifest", [pytest.param(m, id=c) for c, m in ACCEPTED])
def test_the_api_server_accepts_what_dpo_validate_accepts(
    crd_installed: ControlPlane, manifest: dict[str, Any]
) -> None:
    crd_installed.kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(manifest))


@pytest.mark.parametrize(
    ("manifest", "message"), [pytest.param(m, text, id=case) for case, m, text in SCHEMA_REFUSALS]
)
def test_kubectl_apply_of_a_manifest_the_schema_refuses_says_what_is_wrong(
    crd_installed: ControlPlane, manifest: dict[str, Any], message: str
) -> None:
    result = crd_installed.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest), check=False)
    assert result.returncode != 0, f"accepted: {manifest}"
    assert message in result.stderr, result.stderr


def _mark_started(plane: ControlPlane, name: str) -> None:
    """What the operator writes when training starts: the status the freeze rule reads."""
    plane.kubectl(
        "patch",
        "dpo",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"phase": "Training", "startTime": "2026-11-23T00:00:00Z"}}',
    )


def test_training_settings_are_frozen_once_training_started(crd_installed: ControlPlane) -> None:
    crd_installed.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(_manifest("frozen")))
    _mark_started(crd_installed, "frozen")
    changed = crd_installed.kubectl(
        "patch",
        "dpo",
        "frozen",
        "--type=merge",
        "-p",
        '{"spec": {"dpo": {"beta": 0.5}}}',
        check=False,
    )
    assert changed.returncode != 0
    assert "cannot change once training has started" in changed.stderr
    crd_installed.kubectl(
        "patch", "dpo", "frozen", "--type=merge", "-p", '{"spec": {"runPolicy": {"suspend": true}}}'
    )
    resized = '{"spec": {"resources": {"nodes": 2}}}'
    refused = crd_installed.kubectl(
        "patch", "dpo", "frozen", "--type=merge", "-p", resized, check=False
    )
    assert refused.returncode != 0
    assert "nor spec.resources unless spec.dpo.globalBatchSize" in refused.stderr


def test_a_run_with_a_global_batch_size_can_change_size_once_started(
    crd_installed: ControlPlane,
) -> None:
    """dpo.globalBatchSize keeps each step's pairs at any size: resources may change after the
    start (a run suspended on 4 nodes goes on on 2)."""
    manifest = set_fields(
        _manifest("elastic"),
        **{"dpo.globalBatchSize": 16, "dpo.perDeviceBatchSize": 2, "resources.nodes": 4},
    )
    crd_installed.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
    _mark_started(crd_installed, "elastic")
    crd_installed.kubectl(
        "patch", "dpo", "elastic", "--type=merge", "-p", '{"spec": {"resources": {"nodes": 2}}}'
    )
    odd = '{"spec": {"resources": {"nodes": 3}}}'
    refused = crd_installed.kubectl(
        "patch", "dpo", "elastic", "--type=merge", "-p", odd, check=False
    )
    assert refused.returncode != 0
    assert "must be a multiple of dpo.perDeviceBatchSize x the GPUs" in refused.stderr


def test_every_rendered_object_of_every_example_is_created(namespaces: ControlPlane) -> None:
    fenced: set[str] = set()  # the NetworkPolicy is one per namespace, shared by its DPOJobs
    for path in EXAMPLES:
        job = example(path.stem)
        children = [
            child
            for child in render_all(resolve(job))
            if child["kind"] != "NetworkPolicy" or job.namespace not in fenced
        ]
        fenced.add(job.namespace)
        result = namespaces.kubectl("create", "-f", "-", stdin=to_yaml(children))
        created = [line for line in result.stdout.splitlines() if line.endswith(" created")]
        assert len(created) == len(children), f"{path.name}: {result.stdout}"


def create_rendered(plane: ControlPlane, name: str, namespace: str) -> None:
    """Every object `dpo render` makes for example `name`, created in a new `namespace`."""
    plane.kubectl("create", "namespace", namespace)
    job = example(name).model_copy(deep=True)
    job.metadata.namespace = namespace
    plane.kubectl("create", "-f", "-", stdin=to_yaml(render_all(resolve(job))))


def test_the_job_controller_makes_pods_with_the_promised_hostnames_and_env(
    crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    plane = crd_installed
    create_rendered(plane, "llama-8b-lora-infiniband", "contract")

    pods = kubelet.wait_for_pods("contract", "llama-8b-ultrafeedback-train-1", 2)
    by_index = {
        pod.metadata.annotations["batch.kubernetes.io/job-completion-index"]: pod for pod in pods
    }
    assert sorted(by_index) == ["0", "1"]
    for index, pod in by_index.items():
        assert pod.spec.hostname == f"llama-8b-ultrafeedback-train-1-{index}"
        assert pod.spec.subdomain == "llama-8b-ultrafeedback-nodes"
        env = {e.name: e for e in pod.spec.containers[0].env}
        assert env["MASTER_ADDR"].value == (
            "llama-8b-ultrafeedback-train-1-0.llama-8b-ultrafeedback-nodes"
        )
        assert env["NODE_RANK"].value_from.field_ref.field_path == (
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        )
        assert env["NNODES"].value == "2"
    service = plane.core().read_namespaced_service("llama-8b-ultrafeedback-nodes", "contract")
    assert service.spec.publish_not_ready_addresses is True
    assert service.spec.cluster_ip == "None"


def _job_condition(plane: ControlPlane, namespace: str, name: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = plane.batch().read_namespaced_job(name, namespace)
        for condition in job.status.conditions or []:
            if condition.type in ("Complete", "Failed") and condition.status == "True":
                return str(condition.type)
        time.sleep(0.2)
    raise TimeoutError(f"Job {namespace}/{name} did not finish")


def test_pods_reported_succeeded_complete_the_job(
    crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    plane = crd_installed
    create_rendered(plane, "quickstart", "happy")
    (pod,) = kubelet.wait_for_pods("happy", "quickstart-train-1", 1)
    kubelet.running(pod)
    kubelet.succeeded(pod, message='{"status": "completed", "step": 60}')
    assert _job_condition(plane, "happy", "quickstart-train-1") == "Complete"
    (done,) = kubelet.pods("happy", "quickstart-train-1")
    terminated = done.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 0
    assert terminated.message == '{"status": "completed", "step": 60}'


def test_one_failed_pod_fails_the_whole_training_job(
    crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    plane = crd_installed
    create_rendered(plane, "llama-8b-lora-infiniband", "sad")
    pods = kubelet.wait_for_pods("sad", "llama-8b-ultrafeedback-train-1", 2)
    kubelet.running(pods[0])
    kubelet.terminated(pods[1], 1, "NCCL timeout")
    # backoffLimit 0: the operator, not the Job, restarts the group from its checkpoint.
    assert _job_condition(plane, "sad", "llama-8b-ultrafeedback-train-1") == "Failed"


def test_a_sweep_applies_and_kubectl_shows_its_progress_columns(
    crd_installed: ControlPlane,
) -> None:
    for path in SWEEP_EXAMPLES:
        crd_installed.kubectl("apply", "-n", "default", "-f", str(path))
    table = crd_installed.kubectl("get", "dposweep", "-n", "default").stdout.splitlines()
    assert table[0].split() == [
        "NAME", "PHASE", "TRIALS", "DONE", "RUNNING", "STOPPED", "BEST", "WINNER", "AGE",
    ]  # fmt: skip
    assert table[1].split()[0] == "beta-sweep", "no operator here: its status is empty"


@pytest.mark.parametrize(
    ("manifest", "message"),
    [pytest.param(m, e, id=c) for c, m, e in SWEEP_BROKEN if c not in SWEEP_BEYOND_CEL],
)
def test_the_api_server_refuses_a_broken_sweep_as_dpo_validate_does(
    crd_installed: ControlPlane, manifest: dict[str, Any], message: str
) -> None:
    result = crd_installed.kubectl(
        "create", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(manifest), check=False
    )
    assert result.returncode != 0, f"accepted: {manifest}"
    field, _, said = message.partition(": ")
    assert said in result.stderr, result.stderr
    # The API server writes list indexes in brackets: spec.parameters[0].max.
    assert re.sub(r"\.(\d+)", r"[\1]", field) in result.stderr, result.stderr


def test_the_trials_a_sweep_renders_are_dpojobs_the_api_server_takes(
    crd_installed: ControlPlane, tmp_path: Path
) -> None:
    rendered = tmp_path / "trials.yaml"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dpo"), "render", str(SWEEP_EXAMPLES[0])],
        capture_output=True,
        text=True,
        check=True,
    )
    rendered.write_text(result.stdout)
    created = crd_installed.kubectl(
        "create", "--dry-run=server", "-n", "default", "-f", str(rendered)
    )
    assert created.stdout.count("created (server dry run)") == 6, created.stdout
