"""The operator, as a separate process, drives DPOJobs on the real control plane."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dpo_trainer.train.metrics import PrometheusCallback

from tests.cluster.control_plane import ControlPlane, Kubelet, Operator, free_port, wait_for
from tests.cluster.scenario import Scenario
from tests.conftest import example_manifest
from tests.reports import BAD_INPUT, PROMOTED
from tests.reports import GATE_PASSED as PASSED
from tests.reports import GATE_REJECTED as REJECTED

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def operator(crd_installed: ControlPlane) -> Iterator[Operator]:
    running = Operator(crd_installed).start()
    try:
        yield running
    finally:
        running.kill()


def test_the_happy_path_ends_promoted_with_status_at_every_step(
    operator: Operator, crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    metrics_port = free_port()
    run = Scenario(
        crd_installed,
        kubelet,
        "op-happy",
        **{"monitoring.port": metrics_port, "monitoring.intervalSeconds": 5},
    )
    train = run.pod("train-1")
    kubelet.running(train)
    status = run.wait_phase("Training")
    assert status["startTime"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Training"] == "True"

    # Rank 0 serves its metrics (the trainer's own exporter); the operator mirrors them.
    exporter = PrometheusCallback("quickstart", "op-happy", metrics_port, serve=True)
    try:
        for name, value in (
            ("dpo_train_step", 42),
            ("dpo_train_loss", 0.61),
            ("dpo_train_reward_accuracy", 0.875),
            ("dpo_train_reward_margin", 0.25),
        ):
            exporter.set(name, value)
        wait_for(
            "metrics in status",
            lambda: (run.status().get("metrics") or {}).get("step") == 42,
            timeout=40,
        )
        # A health signal on rank 0's page: the DPOJob is Degraded, and says what to try.
        exporter.set_degraded({"AccuracyStuck"})
        exporter.set("dpo_train_step", 43)

        def degraded() -> dict[str, str] | None:
            conditions = {c["type"]: c for c in run.status().get("conditions", [])}
            return conditions.get("Degraded")

        wait_for("a Degraded condition", lambda: (degraded() or {}).get("status") == "True")
        condition = degraded() or {}
        assert condition["reason"] == "AccuracyStuck"
        assert "check the pairs" in condition["message"]
        assert run.status()["metrics"]["degraded"] == ["AccuracyStuck"]
    finally:
        exporter.close()
    columns = crd_installed.kubectl("get", "dpo", "-n", "op-happy").stdout.splitlines()[1].split()
    assert columns[1:6] == ["Training", "1", "43", "0.875", "0.25"]

    kubelet.succeeded(train, json.dumps({"status": "completed", "step": 60}))
    run.wait_phase("Evaluating")
    kubelet.succeeded(run.pod("eval-1"), PASSED)
    run.wait_phase("Promoting")
    kubelet.succeeded(run.pod("promote-1"), PROMOTED)
    status = run.wait_phase("Succeeded")
    assert status["promotion"]["version"] == "quickstart-ab12"
    assert status["promotion"]["digest"] == "sha256:ab12"
    assert status["evaluation"]["verdict"] == "Passed"
    assert status["completionTime"]
    row = crd_installed.kubectl("get", "dpo", "-n", "op-happy").stdout.splitlines()[1].split()
    assert row[1] == "Succeeded"
    assert row[6] == "Passed"
    described = crd_installed.kubectl("describe", "dpo", "quickstart", "-n", "op-happy").stdout
    for reason in ("Degraded", "GatePassed", "Promoted"):
        assert reason in described, f"kubectl describe lacks the {reason} event"
    assert run.jobs() == ["quickstart-eval-1", "quickstart-promote-1", "quickstart-train-1"]


def test_a_retryable_failure_restarts_the_group(
    operator: Operator, crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    run = Scenario(crd_installed, kubelet, "op-retry")
    kubelet.terminated(run.pod("train-1"), 137, "OOMKilled")
    wait_for("attempt 2", lambda: run.status().get("attempt") == 2)
    kubelet.running(run.pod("train-2"))
    status = run.wait_phase("Training")
    assert status["restarts"] == 1
    assert "quickstart-train-1" not in wait_for(
        "old attempt deleted",
        lambda: (jobs := run.jobs()) and "quickstart-train-1" not in jobs and jobs,
    )
    assert "Restarting" in run.events()


def test_bad_data_fails_at_once_with_the_trainers_message(
    operator: Operator, crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    run = Scenario(crd_installed, kubelet, "op-bad")
    kubelet.terminated(run.pod("train-1"), 2, BAD_INPUT)
    status = run.wait_phase("Failed")
    assert status["message"] == "bad config or data: prefs.jsonl: row 3, column 'chosen'"
    assert status.get("restarts", 0) == 0
    assert run.jobs() == ["quickstart-train-1"]


def test_a_rejected_gate_ends_rejected_and_promotes_nothing(
    operator: Operator, crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    run = Scenario(crd_installed, kubelet, "op-rejected")
    kubelet.succeeded(run.pod("train-1"))
    kubelet.terminated(run.pod("eval-1"), 3, REJECTED)
    status = run.wait_phase("Rejected")
    assert "rewardAccuracy 0.0312 (needs >= 0.6)" in status["message"]
    assert status["evaluation"]["verdict"] == "Rejected"
    time.sleep(2)
    assert not any("promote" in job for job in run.jobs())


def test_manual_promotion_waits_for_the_approval_annotation(
    operator: Operator, crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    run = Scenario(crd_installed, kubelet, "op-manual", **{"promotion.mode": "manual"})
    kubelet.succeeded(run.pod("train-1"))
    kubelet.succeeded(run.pod("eval-1"), PASSED)
    status = run.wait_phase("AwaitingApproval")
    assert (
        "kubectl annotate --overwrite dpo quickstart dpo.dev/approve=sha256:ab" in status["message"]
    )
    assert not any("promote" in job for job in run.jobs())
    crd_installed.kubectl(
        "annotate", "dpo", "quickstart", "-n", "op-manual", "dpo.dev/approve=sha256:ab"
    )
    run.wait_phase("Promoting")


def test_suspend_stops_the_pods_and_resume_continues(
    operator: Operator, crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    run = Scenario(crd_installed, kubelet, "op-suspend")
    kubelet.running(run.pod("train-1"))
    run.wait_phase("Training")
    run.suspend(True)
    run.wait_phase("Suspended")
    job = crd_installed.batch().read_namespaced_job("quickstart-train-1", "op-suspend")
    assert job.spec.suspend is True
    run.suspend(False)
    wait_for(
        "unsuspended",
        lambda: (
            crd_installed.batch()
            .read_namespaced_job("quickstart-train-1", "op-suspend")
            .spec.suspend
            is False
        ),
    )
    assert run.jobs() == ["quickstart-train-1"], "the same Job resumes; checkpoints stay"


def test_deleting_the_dpojob_removes_its_children(
    operator: Operator, crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    run = Scenario(crd_installed, kubelet, "op-delete")
    run.pod("train-1")
    crd_installed.kubectl("delete", "dpo", "quickstart", "-n", "op-delete", "--wait=true")
    wait_for(
        "children garbage-collected",
        lambda: (
            run.jobs() == []
            and not crd_installed.core()
            .list_namespaced_config_map("op-delete", label_selector="dpo.dev/job-name=quickstart")
            .items
        ),
    )


@pytest.mark.parametrize("phase", ["Training", "Evaluating", "Promoting"])
def test_an_operator_killed_mid_phase_carries_on_without_duplicates(
    operator: Operator, crd_installed: ControlPlane, kubelet: Kubelet, phase: str
) -> None:
    run = Scenario(crd_installed, kubelet, f"op-kill-{phase.lower()}")
    steps = {
        "Training": lambda: kubelet.running(run.pod("train-1")),
        "Evaluating": lambda: kubelet.succeeded(run.pod("train-1")),
        "Promoting": lambda: (
            kubelet.succeeded(run.pod("train-1")),
            kubelet.succeeded(run.pod("eval-1"), PASSED),
        ),
    }
    steps[phase]()
    run.wait_phase(phase)
    operator.kill()
    operator.start()
    if phase == "Training":
        kubelet.succeeded(run.pod("train-1"))
    if phase in ("Training", "Evaluating"):
        kubelet.succeeded(run.pod("eval-1"), PASSED)
    kubelet.succeeded(run.pod("promote-1"), PROMOTED)
    run.wait_phase("Succeeded")
    assert run.jobs() == ["quickstart-eval-1", "quickstart-promote-1", "quickstart-train-1"]


def test_a_spec_the_operator_refuses_gets_a_condition_not_a_crash(
    operator: Operator, crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    # The CRD cannot do the memory plan's arithmetic; the operator's validation can.
    too_big = {
        "model.name": "acme/model-70b",
        "model.parameters": "70B",
        "peft.enabled": False,
        "resources.gpusPerNode": 1,
        "resources.gpuMemory": "16Gi",
    }
    run = Scenario(crd_installed, kubelet, "op-invalid", **too_big)
    status = wait_for("SpecValid condition", lambda: (s := run.status()).get("conditions") and s)
    (condition,) = [c for c in status["conditions"] if c["type"] == "SpecValid"]
    assert condition["status"] == "False"
    assert condition["reason"] == "InvalidSpec"
    assert "full fine-tune fits on no strategy" in condition["message"]
    assert run.jobs() == []
    assert "InvalidSpec" in run.events()
    # Fixed spec: the same DPOJob goes ahead.
    fixed = {"spec": {"peft": {"enabled": True}, "model": {"name": "builtin:tiny-llama"}}}
    crd_installed.kubectl(
        "patch", "dpo", "quickstart", "-n", "op-invalid", "--type=merge", "-p", json.dumps(fixed)
    )
    run.pod("train-1")
    assert operator.process is not None
    assert operator.process.poll() is None, "the operator kept running"


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        ({"dpo.lossType": "sigmod"}, "'sigmod' is not a loss type; use one of sigmoid, hinge"),
        (
            {"dpo.lossType": "simpo", "model.reference": {"name": "builtin:tiny-llama"}},
            "simpo is reference-free; remove model.reference",
        ),
    ],
    ids=["unknown-name", "simpo-with-a-reference"],
)
def test_a_loss_named_as_trl_names_it_is_checked_by_the_operator(
    operator: Operator,
    crd_installed: ControlPlane,
    kubelet: Kubelet,
    loss: dict[str, Any],
    message: str,
) -> None:
    """`lossType: NAME` (one name, as TRL takes it) passes the API server, which has no type for
    a string-or-list field and runs no CEL on an untyped one; the operator refuses what `dpo
    validate` refuses, with the same words, before any child exists."""
    run = Scenario(crd_installed, kubelet, f"op-loss-{len(message)}", **loss)
    status = wait_for("SpecValid condition", lambda: (s := run.status()).get("conditions") and s)
    (condition,) = [c for c in status["conditions"] if c["type"] == "SpecValid"]
    assert (condition["status"], condition["reason"]) == ("False", "InvalidSpec")
    assert message in condition["message"]
    assert run.jobs() == []


def test_a_profile_the_admin_did_not_allow_is_refused_before_any_pod(
    operator: Operator, crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    tcpxo = {
        "network.profile": "tcpxo",
        "network.secondaryNetworks": ["vpc1"],
        "resources.gpusPerNode": 1,
        "resources.gpuMemory": "80Gi",
    }
    run = Scenario(crd_installed, kubelet, "op-not-allowed", **tcpxo)
    status = wait_for("SpecValid condition", lambda: (s := run.status()).get("conditions") and s)
    (condition,) = [c for c in status["conditions"] if c["type"] == "SpecValid"]
    assert condition["reason"] == "NotAllowed"
    assert "spec.network.profile: tcpxo" in condition["message"]
    assert "NotAllowed" in run.events()
    assert run.jobs() == []


def test_a_child_the_api_server_refuses_fails_the_run_with_its_message(
    operator: Operator, crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    """An admission policy of the cluster (here a ValidatingAdmissionPolicy) refuses the
    training Job: the run ends Failed with the API server's words, instead of retrying forever
    before any status is written."""
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": "no-train-jobs-in-op-refused"},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": ["batch"],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["jobs"],
                    }
                ]
            },
            "validations": [
                {
                    "expression": "!object.metadata.namespace.startsWith('op-refused')",
                    "message": "training Jobs are not allowed in op-refused",
                    "reason": "Invalid",
                }
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": "no-train-jobs-in-op-refused"},
        "spec": {"policyName": "no-train-jobs-in-op-refused", "validationActions": ["Deny"]},
    }
    crd_installed.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([policy, binding]))
    try:
        # The policy takes a moment to be enforced: probe it with a Job of our own.
        crd_installed.kubectl("create", "namespace", "op-refused-probe")
        probe = ("create", "job", "probe", "--image=x", "-n", "op-refused-probe")
        wait_for(
            "the policy enforced",
            lambda: crd_installed.kubectl(*probe, "--dry-run=server", check=False).returncode,
        )
        run = Scenario(crd_installed, kubelet, "op-refused")
        status = run.wait_phase("Failed", timeout=90)
        (failed,) = [c for c in status["conditions"] if c["type"] == "Failed"]
        assert failed["reason"] == "ChildRefused"
        assert "Job quickstart-train-1" in status["message"]
        assert "training Jobs are not allowed in op-refused" in status["message"]
        assert "ChildRefused" in run.events()
    finally:
        crd_installed.kubectl("delete", "-f", "-", stdin=yaml.safe_dump_all([policy, binding]))


def test_an_object_of_someone_else_under_a_childs_name_is_never_adopted(
    operator: Operator, crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    namespace = "op-squatted"
    crd_installed.kubectl("create", "namespace", namespace)
    squatter = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "quickstart-config",
            "namespace": namespace,
            "labels": {"dpo.dev/job-name": "quickstart"},  # the label alone proves nothing
        },
        "data": {"trainer.json": "{}"},
    }
    crd_installed.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(squatter))
    manifest = example_manifest("quickstart")
    manifest["metadata"]["namespace"] = namespace
    crd_installed.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
    status = wait_for(
        "Failed",
        lambda: (
            (
                s := yaml.safe_load(
                    crd_installed.kubectl(
                        "get", "dpo", "quickstart", "-n", namespace, "-o", "yaml"
                    ).stdout
                ).get("status")
                or {}
            ).get("phase")
            == "Failed"
            and s
        ),
        60,
    )
    assert (
        "a ConfigMap named quickstart-config already exists and is not this DPOJob's"
        in (status["message"])
    )
    kept = crd_installed.core().read_namespaced_config_map("quickstart-config", namespace)
    assert kept.data == {"trainer.json": "{}"}, "someone else's object is left as it was"
    assert not kept.metadata.owner_references


def test_a_status_decided_from_an_older_dpojob_is_refused_by_the_api_server(
    crd_installed: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kopf
    from dpo_operator.controller.client import ApiError, KubeAPI
    from dpo_operator.controller.executor import KubernetesExecutor
    from dpo_operator.core.settings import Settings

    namespace = "op-stale-status"
    crd_installed.kubectl("create", "namespace", namespace)
    manifest = example_manifest("quickstart")
    manifest["metadata"]["namespace"] = namespace
    crd_installed.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
    read = json.loads(
        crd_installed.kubectl("get", "dpo", "quickstart", "-n", namespace, "-o", "json").stdout
    )
    decided_on = read["metadata"]["resourceVersion"]
    crd_installed.kubectl(  # a person edits the DPOJob meanwhile
        "patch",
        "dpo",
        "quickstart",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"runPolicy": {"maxRestarts": 5}}}',
    )
    monkeypatch.setenv("KUBECONFIG", str(crd_installed.kubeconfig))
    info = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
    assert info is not None

    async def write_stale_status() -> ApiError:
        api = KubeAPI()
        await api.use(info)
        executor = KubernetesExecutor(api, Settings())
        try:
            with pytest.raises(ApiError) as conflict:
                await executor.write_status(
                    namespace, "quickstart", {"phase": "Pending"}, decided_on
                )
        finally:
            await api.close()
        return conflict.value

    assert asyncio.run(write_stale_status()).status == 409


def test_the_operator_answers_its_liveness_probe(operator: Operator) -> None:
    healthz = f"http://127.0.0.1:{operator.liveness_port}/healthz"
    assert wait_for("kopf liveness endpoint", lambda: _get(healthz))


def test_the_operator_serves_its_own_metrics(operator: Operator) -> None:
    url = f"http://127.0.0.1:{operator.metrics_port}/metrics"
    text = wait_for("operator metrics", lambda: _get(url))
    for name in (
        "dpo_operator_dpojobs",
        "dpo_operator_reconcile_seconds",
        "dpo_operator_reconcile_errors_total",
        "dpo_operator_restarts_total",
        "dpo_operator_gate_verdicts_total",
        "dpo_operator_promotions_total",
    ):
        assert f"# TYPE {name}" in text or f"# TYPE {name.removesuffix('_total')}" in text, name


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""
