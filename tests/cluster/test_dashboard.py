"""The Grafana dashboard and alert rules, answered by a real Prometheus.

Debian's Prometheus scrapes a real tiny training run (`dpo run`) and the operator while it
drives DPOJobs on the real control plane. Every panel query of the chart's dashboard returns
data; every alert rule of the chart's PrometheusRule is loaded into Prometheus and evaluates
without error. The main curves are drawn to a PNG from Prometheus' answers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.control_plane import ControlPlane, Kubelet, free_port
from tests.cluster.test_chart import CHART, helm
from tests.conftest import REPO
from tests.reports import GATE_PASSED as PASSED
from tests.reports import GATE_REJECTED as REJECTED
from tests.reports import PROMOTED

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
BIN = Path(sys.executable).parent


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        loaded: dict[str, Any] = json.loads(response.read())
        return loaded


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((CHART / "dashboards" / "dpo-operator.json").read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def alert_rules() -> dict[str, Any]:
    text = helm("template", "dpo", str(CHART), "--set", "prometheusRule.enabled=true").stdout
    rule = next(d for d in yaml.safe_load_all(text) if d and d["kind"] == "PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends for "All" in both selectors."""
    return (
        expr.replace('"$dpojob"', '".*"')
        .replace('"$namespace"', '".*"')
        .replace('"$sweep"', '".*"')
    )


@pytest.fixture
def prometheus(tmp_path: Path) -> Any:
    if not Path(PROMETHEUS).exists():
        pytest.fail("no prometheus binary: apt-get install prometheus (make test does it)")
    return tmp_path


def test_every_panel_and_alert_is_answered_by_a_real_prometheus(
    crd_installed: ControlPlane, kubelet: Kubelet, prometheus: Path
) -> None:
    plane, workdir = crd_installed, prometheus
    operator_port, trainer_port, prometheus_port = free_port(), free_port(), free_port()
    (workdir / "rules.yaml").write_text(yaml.safe_dump(alert_rules()))
    (workdir / "prometheus.yaml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(workdir / "rules.yaml")],
                "scrape_configs": [
                    {
                        "job_name": "dpo-operator",
                        "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}],
                    },
                    {
                        "job_name": "dpo-trainers",
                        "static_configs": [{"targets": [f"127.0.0.1:{trainer_port}"]}],
                    },
                ],
            }
        )
    )
    processes = []
    try:
        processes.append(
            subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={workdir / 'prometheus.yaml'}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                ],
                stdout=(workdir / "prometheus.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        processes.append(
            subprocess.Popen(
                [
                    str(BIN / "dpo"),
                    "operator",
                    "--all-namespaces",
                    "--metrics-port",
                    str(operator_port),
                    "--liveness-port",
                    str(free_port()),
                ],
                env={**os.environ, "KUBECONFIG": str(plane.kubeconfig)},
                stdout=(workdir / "operator.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        started = time.time()
        # The operator drives DPOJobs: one promoted, one rejected, one restarted.
        _drive_dpojobs(plane, kubelet)
        # A real tiny training run serves dpo_train_* and dpo_eval_* while it trains, as trial 1
        # of a DPOSweep the operator holds (the sweep panels join on its trial info).
        manifest = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
        manifest["metadata"] = {"name": "dash-1", "namespace": "dash-sweep"}
        _sweep_of(plane, manifest, "dash")
        manifest["spec"]["dpo"]["maxSteps"] = 100
        manifest["spec"]["dpo"]["loggingSteps"] = 2
        (workdir / "job.yaml").write_text(yaml.safe_dump(manifest))
        run = subprocess.run(
            [
                str(BIN / "dpo"),
                "run",
                str(workdir / "job.yaml"),
                "--workdir",
                str(workdir / "run"),
                "--metrics-port",
                str(trainer_port),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        time.sleep(3)
        base = f"http://127.0.0.1:{prometheus_port}/api/v1"
        window = {"start": started, "end": time.time(), "step": 1}

        print(f"\n{'query':90s} series points")
        answers: dict[str, list[Any]] = {}
        for title, expr in dashboard_queries():
            promql = grafana_to_promql(expr)
            result = get_json(
                f"{base}/query_range?" + urllib.parse.urlencode({"query": promql, **window})
            )
            assert result["status"] == "success", (title, result)
            series = result["data"]["result"]
            points = sum(len(s["values"]) for s in series)
            print(f"{promql[:90]:90s} {len(series):6d} {points:6d}")
            assert points > 0, f"panel {title!r} query returned no data: {promql}"
            answers[expr] = series

        rules = get_json(f"{base}/rules")["data"]["groups"][0]["rules"]
        for rule in rules:
            print(f"alert {rule['name']:28s} health {rule['health']:4s} state {rule['state']}")
            assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
            instant = get_json(f"{base}/query?" + urllib.parse.urlencode({"query": rule["query"]}))
            assert instant["status"] == "success"
        assert len(rules) == 5
        _draw(answers, workdir / "dashboard.png")
        docs = os.environ.get("DPO_DOCS_DIR")
        if docs:
            shutil.copy(workdir / "dashboard.png", Path(docs) / "dashboard.png")
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _sweep_of(plane: ControlPlane, trial: dict[str, Any], name: str) -> None:
    """A DPOSweep `name` of one trial, `<name>-1`, with `trial`'s spec."""
    namespace = trial["metadata"]["namespace"]
    plane.kubectl("create", "namespace", namespace)
    sweep = {
        "apiVersion": "dpo.dev/v1alpha1",
        "kind": "DPOSweep",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "template": trial["spec"],
            "parameters": [{"field": "dpo.beta", "values": [trial["spec"]["dpo"]["beta"]]}],
        },
    }
    plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(sweep))


def _drive_dpojobs(plane: ControlPlane, kubelet: Kubelet) -> None:
    manifest = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    for namespace in ("dash-promoted", "dash-rejected"):
        manifest["metadata"]["namespace"] = namespace
        plane.kubectl("create", "namespace", namespace)
        plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
    kubelet.terminated(kubelet.wait_for_pods("dash-promoted", "quickstart-train-1", 1)[0], 137)
    kubelet.succeeded(kubelet.wait_for_pods("dash-promoted", "quickstart-train-2", 1)[0])
    kubelet.succeeded(kubelet.wait_for_pods("dash-promoted", "quickstart-eval-2", 1)[0], PASSED)
    kubelet.succeeded(
        kubelet.wait_for_pods("dash-promoted", "quickstart-promote-2", 1)[0], PROMOTED
    )
    kubelet.succeeded(kubelet.wait_for_pods("dash-rejected", "quickstart-train-1", 1)[0])
    kubelet.terminated(
        kubelet.wait_for_pods("dash-rejected", "quickstart-eval-1", 1)[0], 3, REJECTED
    )


def _draw(answers: dict[str, list[Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = {
        "reward accuracy": "dpo_train_reward_accuracy",
        "reward margin": "dpo_train_reward_margin",
        "loss": "dpo_train_loss",
        "chosen vs rejected reward": "dpo_train_reward_chosen",
    }
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for axis, (title, metric) in zip(axes, wanted.items(), strict=True):
        for expr, series in answers.items():
            if not expr.startswith(metric) and f"({metric}" not in expr:
                continue
            for one in series:
                name = one["metric"].get("__name__", metric).replace("dpo_", "")
                t0 = float(one["values"][0][0])
                axis.plot(
                    [float(t) - t0 for t, _ in one["values"]],
                    [float(v) for _, v in one["values"]],
                    label=name,
                )
        if metric == "dpo_train_reward_chosen":
            for expr, series in answers.items():
                if expr.startswith("dpo_train_reward_rejected"):
                    for one in series:
                        t0 = float(one["values"][0][0])
                        axis.plot(
                            [float(t) - t0 for t, _ in one["values"]],
                            [float(v) for _, v in one["values"]],
                            label="train_reward_rejected",
                        )
        axis.set(title=title, xlabel="seconds (Prometheus samples)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("DPO training, as the dashboard shows it (Prometheus query_range)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
