"""One lifecycle, two executors: each scenario of tests/scenarios.py runs on the real control
plane (the operator, with this test as kubelet) and on this machine (`dpo run` with scripted
pods), and both go through the same phases. And the operator creates exactly what `dpo render`
prints for the same DPOJob and settings."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dpo_operator.api import GROUP, PLURAL, TERMINAL_PHASES, VERSION
from dpo_operator.core.lifecycle import APPROVE_ANNOTATION, Component
from dpo_operator.core.names import LABEL_ATTEMPT, LABEL_COMPONENT
from kubernetes import client, watch
from urllib3.exceptions import ProtocolError

from tests.cluster.control_plane import ControlPlane, Kubelet, Operator, wait_for
from tests.conftest import example_manifest
from tests.reports import GATE_PASSED
from tests.scenarios import RUNNING_PHASE, SCENARIOS, Scenario, run_locally

TRAINER_IMAGE = "registry.example.com/ml/dpo-trainer:pinned"
NAME = "quickstart"


@pytest.fixture(scope="module")
def operator(crd_installed: ControlPlane) -> Iterator[Operator]:
    running = Operator(
        crd_installed, "--trainer-image", TRAINER_IMAGE, log="executors-operator.log"
    ).start()
    try:
        yield running
    finally:
        running.kill()


class PhaseRecorder:
    """Every phase the DPOJob's status goes through, from a watch started before it exists."""

    def __init__(self, plane: ControlPlane, namespace: str) -> None:
        self.custom = client.CustomObjectsApi(plane.api_client())
        self.namespace = namespace
        self.phases: list[str] = []
        self.watch = watch.Watch()
        listed = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        self.thread = threading.Thread(
            target=self._follow, args=(listed["metadata"]["resourceVersion"],), daemon=True
        )
        self.thread.start()

    def _follow(self, resource_version: str) -> None:
        with contextlib.suppress(ProtocolError):  # the stream is cut when the test stops it
            self._record(resource_version)

    def _record(self, resource_version: str) -> None:
        for event in self.watch.stream(
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            resource_version=resource_version,
            timeout_seconds=300,
        ):
            phase = (event["object"].get("status") or {}).get("phase")
            if phase and (not self.phases or self.phases[-1] != phase):
                self.phases.append(phase)

    def stop(self) -> None:
        self.watch.stop()


class ScriptedKubelet:
    """Plays the kubelet for one scenario: each new pod runs until the DPOJob shows it running,
    then ends as the scenario says; approves the promotion when the scenario does."""

    def __init__(
        self, plane: ControlPlane, kubelet: Kubelet, scenario: Scenario, namespace: str
    ) -> None:
        self.kubelet, self.scenario, self.namespace = kubelet, scenario, namespace
        self.custom = client.CustomObjectsApi(plane.api_client())
        self.core = plane.core()
        self.stopped = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._play, daemon=True)
        self.thread.start()

    def status(self) -> dict[str, Any]:
        body = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, NAME
        )
        return body.get("status") or {}

    def shows_running(self, component: Component, attempt: int) -> bool:
        status = self.status()
        if status.get("phase") != RUNNING_PHASE[component]:
            return False
        if component != "train":
            return True
        training = next((c for c in status.get("conditions", []) if c["type"] == "Training"), {})
        return training.get("status") == "True" and training.get("message") == f"attempt {attempt}"

    def _play(self) -> None:
        handled: set[str] = set()
        tried: dict[tuple[Component, int], int] = {}
        try:
            while not self.stopped.is_set():
                self._approve_when_waiting()
                for pod in self.core.list_namespaced_pod(self.namespace).items:
                    if pod.metadata.name in handled or pod.metadata.deletion_timestamp:
                        continue
                    handled.add(pod.metadata.name)
                    labels = pod.metadata.labels
                    component: Component = labels[LABEL_COMPONENT]
                    attempt = int(labels[LABEL_ATTEMPT])
                    key = (component, attempt)
                    end = self.scenario.pod_end(component, attempt, tried.get(key, 0))
                    tried[key] = tried.get(key, 0) + 1
                    self.kubelet.running(pod)
                    if end.exit_code is None:
                        continue
                    wait_for(
                        f"{pod.metadata.name} seen running",
                        lambda c=component, a=attempt: self.shows_running(c, a),
                        timeout=30,
                    )
                    self.kubelet.terminated(pod, end.exit_code, end.message)
                time.sleep(0.2)
        except BaseException as error:
            self.errors.append(error)

    def _approve_when_waiting(self) -> None:
        if self.scenario.approve and self.status().get("phase") == "AwaitingApproval":
            digest = self.status()["evaluation"]["adapterDigest"]
            patch = {"metadata": {"annotations": {APPROVE_ANNOTATION: digest}}}
            self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, NAME, patch
            )

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=30)
        assert not self.errors, self.errors


def run_on_cluster(
    plane: ControlPlane, kubelet: Kubelet, scenario: Scenario, namespace: str
) -> list[str]:
    plane.kubectl("create", "namespace", namespace)
    recorder = PhaseRecorder(plane, namespace)
    plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(scenario.manifest(namespace)))
    player = ScriptedKubelet(plane, kubelet, scenario, namespace)
    try:
        final = scenario.phases[-1]
        wait_for(
            f"{namespace} reaches {final}",
            lambda: recorder.phases and recorder.phases[-1] == final,
            timeout=90,
        )
        time.sleep(2 if final in TERMINAL_PHASES else 4)  # anything after the end shows
    finally:
        player.stop()
        recorder.stop()
    return recorder.phases


@pytest.mark.parametrize("scenario", [pytest.param(s, id=s.name) for s in SCENARIOS])
def test_both_executors_go_through_the_same_phases(
    operator: Operator,
    crd_installed: ControlPlane,
    kubelet: Kubelet,
    scenario: Scenario,
    tmp_path: Path,
) -> None:
    local_phases, output = run_locally(scenario, tmp_path)
    assert local_phases == list(scenario.phases), output
    cluster_phases = run_on_cluster(crd_installed, kubelet, scenario, f"same-{scenario.name}")
    assert cluster_phases == local_phases, operator.log.read_text()[-3000:]


def contains(live: Any, rendered: Any, path: str = "") -> list[str]:
    """Where `rendered` is not in `live`: the API server may add defaults, never change a field."""
    if isinstance(rendered, dict):
        if not isinstance(live, dict):
            return [f"{path}: {live!r} is not a mapping"]
        problems: list[str] = []
        for key, value in rendered.items():
            if key not in live:
                problems.append(f"{path}.{key}: missing")
            else:
                problems += contains(live[key], value, f"{path}.{key}")
        return problems
    if isinstance(rendered, list):
        if not isinstance(live, list) or len(live) != len(rendered):
            return [f"{path}: {live!r} != {rendered!r}"]
        return [p for i, v in enumerate(rendered) for p in contains(live[i], v, f"{path}[{i}]")]
    return [] if live == rendered else [f"{path}: {live!r} != {rendered!r}"]


def test_the_operator_creates_exactly_what_dpo_render_prints(
    operator: Operator, crd_installed: ControlPlane, kubelet: Kubelet, tmp_path: Path
) -> None:
    namespace = "render-is-run"
    manifest = example_manifest("quickstart")
    manifest["metadata"]["namespace"] = namespace
    crd_installed.kubectl("create", "namespace", namespace)
    crd_installed.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
    batch = crd_installed.batch()
    kubelet.succeeded(kubelet.wait_for_pods(namespace, f"{NAME}-train-1", 1)[0])
    kubelet.succeeded(kubelet.wait_for_pods(namespace, f"{NAME}-eval-1", 1)[0], GATE_PASSED)
    kubelet.wait_for_pods(namespace, f"{NAME}-promote-1", 1)

    applied = tmp_path / "dpojob.yaml"
    applied.write_text(
        crd_installed.kubectl("get", "dpo", NAME, "-n", namespace, "-o", "yaml").stdout
    )
    dpo = str(Path(sys.executable).parent / "dpo")
    printed = subprocess.run(
        [dpo, "render", str(applied), "--trainer-image", TRAINER_IMAGE],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rendered = list(yaml.safe_load_all(printed))
    kinds = [r["kind"] for r in rendered]
    assert kinds == ["ConfigMap", "Service", "NetworkPolicy", "Job", "Job", "Job"]
    core = crd_installed.core()
    read = {
        "ConfigMap": core.read_namespaced_config_map,
        "Service": core.read_namespaced_service,
        "NetworkPolicy": client.NetworkingV1Api(
            crd_installed.api_client()
        ).read_namespaced_network_policy,
        "Job": batch.read_namespaced_job,
    }
    api = crd_installed.api_client()
    for wanted in rendered:
        name = wanted["metadata"]["name"]
        live = api.sanitize_for_serialization(read[wanted["kind"]](name, namespace))
        assert contains(live, wanted) == [], f"{wanted['kind']} {name}"
        for field in ("labels", "annotations", "ownerReferences"):
            assert live["metadata"].get(field) == wanted["metadata"].get(field), (name, field)
    images = {
        c["image"]
        for r in rendered
        if r["kind"] == "Job"
        for c in r["spec"]["template"]["spec"]["containers"]
    }
    assert images == {TRAINER_IMAGE}, json.dumps(sorted(images))
