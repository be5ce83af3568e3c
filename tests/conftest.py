"""Shared test helpers: the repository's examples and a minimal valid DPOJob manifest."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from dpo_operator.api import DPOJob
from dpo_operator.cli.report import summarize
from dpo_operator.core.validate import parse_dpojob
from dpo_operator.local.executor import LocalOptions, run
from dpo_operator.local.kubelet import free_port

pytest_plugins = [
    "tests.cluster.pod_plane",
    "tests.cluster.kueue",
    "tests.object_store",
    "tests.oci_registry",
]

REPO = Path(__file__).resolve().parent.parent
# The DPOJob examples; a DPOSweep example holds a DPOJob template instead.
EXAMPLES = sorted(
    path
    for path in (REPO / "examples").glob("*.yaml")
    if yaml.safe_load(path.read_text())["kind"] == "DPOJob"
)
SWEEP_EXAMPLES = sorted(set((REPO / "examples").glob("*.yaml")) - set(EXAMPLES))

MINIMAL: dict[str, Any] = {
    "apiVersion": "dpo.dev/v1alpha1",
    "kind": "DPOJob",
    "metadata": {"name": "demo", "namespace": "ml"},
    "spec": {
        "model": {"name": "org/model-7b"},
        "data": {
            "train": {"uri": "pvc://datasets/train.jsonl"},
            "eval": {"uri": "pvc://datasets/eval.jsonl"},
        },
        "output": {"uri": "pvc://checkpoints"},
    },
}


def minimal_manifest() -> dict[str, Any]:
    """A fresh copy of the smallest valid DPOJob, for tests to modify."""
    return copy.deepcopy(MINIMAL)


def set_fields(manifest: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """Set dotted paths under `spec` (creating groups on the way); returns the manifest."""
    for path, value in changes.items():
        node = manifest["spec"]
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return manifest


def example_manifest(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
    return loaded


def example(name: str) -> DPOJob:
    return parse_dpojob(yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text()))


def job_with(**spec_overrides: Any) -> DPOJob:
    """The minimal DPOJob with some spec groups replaced."""
    manifest = minimal_manifest()
    manifest["spec"].update(spec_overrides)
    return parse_dpojob(manifest)


@pytest.fixture(params=EXAMPLES, ids=lambda path: path.stem)
def example_job(request: pytest.FixtureRequest) -> DPOJob:
    return parse_dpojob(yaml.safe_load(request.param.read_text()))


def quickstart(**changes: Any) -> dict[str, Any]:
    """The quickstart example's manifest with dotted spec fields changed."""
    return set_fields(example_manifest("quickstart"), **changes)


def dpo_run(manifest: dict[str, Any], workdir: Path, **options: Any) -> tuple[int, str]:
    """`dpo run` on a manifest; its exit code and everything it printed (its summary too)."""
    out = io.StringIO()
    code = run(
        parse_dpojob(manifest),
        LocalOptions(workdir=workdir, metrics_port=free_port(), **options),
        out=out,
        summarize=summarize,
    )
    print(out.getvalue())
    return code, out.getvalue()


def promotion_target(workdir: Path) -> Path:
    """Where `dpo run` puts the quickstart's promotion target (pvc://dpo-runs/promoted/...)."""
    return workdir / "volumes" / "dpo-runs" / "promoted" / "quickstart"
