"""The Helm chart: lint, template, schema; installed on the real control plane, its RBAC is
enough for the operator's whole happy path, and uninstalling leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dpo_operator.cli.main import build_parser, settings_from_args
from kubernetes import client

from tests.cluster.control_plane import BIN as K8S_BIN
from tests.cluster.control_plane import (
    PROMETHEUS_OPERATOR_CRDS,
    ControlPlane,
    Kubelet,
    Operator,
    wait_for,
)
from tests.conftest import REPO
from tests.reports import GATE_PASSED as PASSED
from tests.reports import PROMOTED

CHART = REPO / "charts" / "dpo-operator"
RELEASE, RELEASE_NAMESPACE = "dpo", "dpo-system"
VALUES_SETS = {
    "default": [],
    "namespaced": ["--set", "watchNamespaces={team-a,team-b}"],
    "monitoring": [
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.podMonitor.enabled=true",
        "--set",
        "prometheusRule.enabled=true",
    ],
}
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(K8S_BIN / "helm"), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}:\n{result.stderr}")
    return result


def rendered(values: list[str]) -> list[dict[str, Any]]:
    text = helm("template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, *values).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.mark.parametrize("values", VALUES_SETS.values(), ids=VALUES_SETS.keys())
def test_the_chart_lints_and_renders_valid_kubernetes_objects(values: list[str]) -> None:
    assert "0 chart(s) failed" in helm("lint", str(CHART), *values).stdout
    for obj in rendered(values):
        if obj["kind"] not in PROMETHEUS_OPERATOR_KINDS:  # those: next test, on the API server
            kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_the_monitoring_objects_validate_against_the_prometheus_operator_crds(
    crd_installed: ControlPlane,
) -> None:
    for crd in sorted(PROMETHEUS_OPERATOR_CRDS.glob("*.yaml")):
        crd_installed.kubectl("apply", "--server-side", "-f", str(crd))
    crd_installed.kubectl("wait", "--for=condition=Established", "crd", "--all")
    crd_installed.kubectl("create", "namespace", RELEASE_NAMESPACE, check=False)
    monitoring = [
        o for o in rendered(VALUES_SETS["monitoring"]) if o["kind"] in PROMETHEUS_OPERATOR_KINDS
    ]
    assert {o["kind"] for o in monitoring} == PROMETHEUS_OPERATOR_KINDS
    result = crd_installed.kubectl(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        "-",
        stdin=yaml.safe_dump_all(monitoring),
    )
    assert result.stdout.count("(server dry run)") == len(monitoring)


def test_the_namespaced_mode_grants_roles_only_where_it_watches() -> None:
    objects = rendered(VALUES_SETS["namespaced"])
    roles = {(o["kind"], o["metadata"].get("namespace")) for o in objects if "Role" in o["kind"]}
    assert ("Role", "team-a") in roles
    assert ("Role", "team-b") in roles
    cluster_roles = [o for o in objects if o["kind"] == "ClusterRole"]
    assert len(cluster_roles) == 1, "only the framework's cluster-scoped reads"
    assert all(r["apiGroups"] != ["batch"] for r in cluster_roles[0]["rules"])
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args
    assert "--all-namespaces" not in args


def test_the_operator_pod_is_locked_down_and_probed() -> None:
    deployment = next(o for o in rendered([]) if o["kind"] == "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    container = spec["template"]["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["memory"]


def test_the_trainer_image_value_reaches_the_operator_as_dpo_render_takes_it() -> None:
    def args(values: list[str]) -> list[str]:
        deployment = next(o for o in rendered(values) if o["kind"] == "Deployment")
        found: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        return found

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert f"--trainer-image=ghcr.io/dpo-operator/trainer:{chart['appVersion']}" in args([])
    pinned = args(["--set", "trainerImage=registry.example.com/dpo-trainer:1"])
    assert "--trainer-image=registry.example.com/dpo-trainer:1" in pinned


def test_the_default_output_value_reaches_the_operator_as_dpo_render_takes_it() -> None:
    deployment = next(
        o
        for o in rendered(
            [
                "--set",
                "defaultOutput.uri=s3://acme-runs/dpo",
                "--set",
                "defaultOutput.credentialsSecret=s3-writer",
            ]
        )
        if o["kind"] == "Deployment"
    )
    flags = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    settings = settings_from_args(build_parser().parse_args(["operator", *flags]))
    assert settings.default_output is not None
    assert settings.default_output.uri == "s3://acme-runs/dpo"
    assert settings.default_output.credentials_secret == "s3-writer"
    none = next(o for o in rendered([]) if o["kind"] == "Deployment")
    assert not any(
        "--default-output" in a for a in none["spec"]["template"]["spec"]["containers"][0]["args"]
    )


def test_the_privileged_pieces_reach_the_operator_only_from_the_chart() -> None:
    def args(values: list[str]) -> list[str]:
        deployment = next(o for o in rendered(values) if o["kind"] == "Deployment")
        found: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        return found

    defaults = args([])
    assert "--allow-profiles=*=tcp,infiniband,roce,efa" in defaults
    assert "--promotion-root=*=pvc://" in defaults
    assert any(a.startswith("--tcpxo-daemon-image=us-docker.pkg.dev/") for a in defaults)
    chosen = args(
        [
            "--set-json",
            'network.allowedProfiles={"*":["tcp"],"ml":["tcpxo"]}',
            "--set-json",
            'promotion.roots={"*":["s3://models/{namespace}/"]}',
            "--set",
            "network.tcpxo.daemonImage=registry.corp/rxdm@sha256:abc",
            "--set-json",
            'scheduling.allowedPriorityClasses={"prod":["dpo-high"]}',
        ]
    )
    assert {"--allow-profiles=*=tcp", "--allow-profiles=ml=tcpxo"} <= set(chosen)
    assert "--promotion-root=*=s3://models/{namespace}/" in chosen
    assert "--tcpxo-daemon-image=registry.corp/rxdm@sha256:abc" in chosen
    # The flags are the ones `dpo operator` and `dpo render` parse.
    parsed = build_parser().parse_args(["operator", *chosen])
    settings = settings_from_args(parsed)
    assert settings.allowed_profiles["ml"] == frozenset({"tcpxo"})
    assert settings.promotion_roots == {"*": ("s3://models/{namespace}/",)}
    assert settings.allowed_priority_classes == {"prod": frozenset({"dpo-high"})}
    refused = helm(
        "template", "dpo", str(CHART), "--set-json",
        'scheduling.allowedPriorityClasses={"*":["system-node-critical"]}', check=False,
    )  # fmt: skip
    assert refused.returncode != 0, "the chart's schema never lets system-* in"


def test_two_replicas_are_refused_by_the_values_schema() -> None:
    result = helm("lint", str(CHART), "--set", "replicas=2", check=False)
    assert result.returncode != 0
    assert "/replicas" in result.stdout + result.stderr


def test_the_dashboard_configmap_carries_the_grafana_sidecar_label() -> None:
    dashboard = next(o for o in rendered([]) if o["kind"] == "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    panels = json.loads(dashboard["data"]["dpo-operator.json"])["panels"]
    assert len(panels) >= 15


# -- on the control plane ----------------------------------------------------------------------


def chart_operator(plane: ControlPlane) -> Operator:
    """`dpo operator` authenticated as the chart's ServiceAccount (a TokenRequest token)."""
    token = (
        plane.core()
        .create_namespaced_service_account_token(
            "dpo-dpo-operator",
            RELEASE_NAMESPACE,
            client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
            ),
        )
        .status.token
    )
    kubeconfig = plane.workdir / "operator-sa.kubeconfig"
    kubeconfig.write_text(plane.kubeconfig_for(token))
    return Operator(plane, kubeconfig=kubeconfig, log="chart-operator.log").start()


@pytest.fixture(scope="module")
def installed(crd_installed: ControlPlane) -> ControlPlane:
    crd_installed.helm(
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        RELEASE_NAMESPACE,
        "--create-namespace",
        "--wait=false",
    )
    return crd_installed


def quickstart_in(plane: ControlPlane, namespace: str) -> None:
    manifest = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    manifest["metadata"]["namespace"] = namespace
    plane.kubectl("create", "namespace", namespace)
    plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))


def phase(plane: ControlPlane, namespace: str) -> str:
    return str(
        plane.kubectl(
            "get", "dpo", "quickstart", "-n", namespace, "-o", "jsonpath={.status.phase}"
        ).stdout
    )


def test_the_charts_rbac_is_enough_for_the_whole_happy_path(
    installed: ControlPlane, kubelet: Kubelet
) -> None:
    operator = chart_operator(installed)
    try:
        quickstart_in(installed, "chart-happy")
        (train,) = kubelet.wait_for_pods("chart-happy", "quickstart-train-1", 1)
        kubelet.succeeded(train)
        (evaluation,) = kubelet.wait_for_pods("chart-happy", "quickstart-eval-1", 1)
        kubelet.succeeded(evaluation, PASSED)
        (promote,) = kubelet.wait_for_pods("chart-happy", "quickstart-promote-1", 1)
        kubelet.succeeded(promote, PROMOTED)
        wait_for("Succeeded", lambda: phase(installed, "chart-happy") == "Succeeded")
        assert "Forbidden" not in operator.log.read_text()
    finally:
        operator.kill()


def test_a_role_missing_one_verb_fails_visibly(installed: ControlPlane) -> None:
    role = json.loads(
        installed.kubectl("get", "clusterrole", "dpo-dpo-operator", "-o", "json").stdout
    )
    original = json.dumps(role)
    for rule in role["rules"]:
        if rule["resources"] == ["jobs"]:
            rule["verbs"].remove("create")
    installed.kubectl("replace", "-f", "-", stdin=json.dumps(role))
    operator = chart_operator(installed)
    try:
        quickstart_in(installed, "chart-forbidden")

        def forbidden_event() -> str:
            events = installed.core().list_namespaced_event("chart-forbidden").items
            return next((e.message for e in events if e.reason == "Forbidden"), "")

        message = wait_for("a Forbidden event on the DPOJob", forbidden_event)
        assert 'cannot create resource "jobs"' in message
        assert "grant it in the operator's Role" in message
        assert not installed.batch().list_namespaced_job("chart-forbidden").items
    finally:
        operator.kill()
        restored = json.loads(original)
        restored["metadata"].pop("resourceVersion", None)
        installed.kubectl("replace", "-f", "-", stdin=json.dumps(restored))


def test_helm_uninstall_leaves_no_operator_objects(installed: ControlPlane) -> None:
    installed.helm("uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait")
    selector = f"app.kubernetes.io/instance={RELEASE}"
    leftovers = installed.kubectl(
        "get",
        "deployments,serviceaccounts,services,configmaps,roles,rolebindings,"
        "clusterroles,clusterrolebindings",
        "--all-namespaces",
        "-l",
        selector,
        "-o",
        "name",
    ).stdout.split()
    assert leftovers == []
    # The CRD stays (Helm never deletes crds/), so existing DPOJobs and their records survive.
    installed.kubectl("get", "crd", "dpojobs.dpo.dev")
