"""Helpers for real CPU training runs: configs rendered from DPOJobs, and local launches."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from dpo_contract.config import TrainerConfig
from dpo_contract.pod import (
    ACCELERATE_CONFIG_FILE,
    ACCELERATE_CONFIG_PATH,
    DEFAULT_MASTER_PORT,
    TRAINER_CONFIG_PATH,
)
from dpo_operator.api import DPOJob
from dpo_operator.core.render import render_config_map, render_training_job, trainer_config
from dpo_operator.core.resolve import resolve
from dpo_operator.core.settings import Settings
from dpo_operator.local.kubelet import free_port, kubelet_process
from dpo_trainer.io.builtin import builtin_model_path, synthetic_preferences
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import job_with

BIN = Path(sys.executable).parent

# A run that learns the synthetic rule in seconds on a 2-core CPU.
FAST_DPO: dict[str, Any] = {
    "learningRate": 5e-4,
    "maxSteps": 40,
    "perDeviceBatchSize": 8,
    "maxLength": 64,
    "loggingSteps": 5,
    "saveSteps": 20,
}
TINY_SPEC: dict[str, Any] = {
    "model": {"name": "builtin:tiny-llama"},
    "data": {
        "train": {"uri": "builtin:synthetic-preferences/train"},
        "eval": {"uri": "builtin:synthetic-preferences/eval"},
    },
    "resources": {"nodes": 1, "gpusPerNode": 0},
    "peft": {"r": 8, "alpha": 16},
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.trainer)


def tiny_job(**spec: Any) -> DPOJob:
    """A CPU DPOJob on the builtin model and data; `spec` groups replace or extend the defaults."""
    merged = {**TINY_SPEC, "dpo": dict(FAST_DPO)}
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return job_with(**merged)


def local_config(job: DPOJob, workdir: Path, *, cpu: bool = False) -> TrainerConfig:
    """The rendered trainer config with artifacts (and the reference cache) under `workdir` and
    a free metrics port; `cpu` runs a GPU job's process layout on CPUs."""
    config = trainer_config(resolve(job, Settings(cpu=cpu)))
    cache = str(workdir / "reference-logps") if config.reference_cache else None
    return config.model_copy(
        update={
            "artifacts_dir": str(workdir / "artifacts"),
            "reference_cache": cache,
            "metrics_port": free_port(),
        }
    )


def write_config(config: TrainerConfig, workdir: Path) -> Path:
    path = workdir / "trainer.json"
    path.write_text(config.model_dump_json(by_alias=True, indent=2))
    return path


def pod_process(
    job: DPOJob,
    rank: int,
    workdir: Path,
    config: TrainerConfig,
    master_port: int | None = None,
    *,
    cpu: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """The command and env of training pod `rank`, exactly as rendered, run on this machine
    the way `dpo run` starts it (see dpo_operator.local.kubelet_process)."""
    container = render_training_job(resolve(job, Settings(cpu=cpu)), 1)["spec"]["template"]["spec"][
        "containers"
    ][0]
    accelerate_yaml = workdir / "accelerate.yaml"
    accelerate_yaml.write_text(
        render_config_map(resolve(job, Settings(cpu=cpu)))["data"][ACCELERATE_CONFIG_FILE]
    )
    files = {
        ACCELERATE_CONFIG_PATH: accelerate_yaml,
        TRAINER_CONFIG_PATH: write_config(config, workdir),
    }
    return kubelet_process(
        container,
        rank,
        master_port or DEFAULT_MASTER_PORT,
        files,
        workdir / f"termination-{rank}.json",
        workdir / f"pod-{rank}" / "tmp",
        print,
    )


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


Samples = list[tuple[str, dict[str, str], float]]


def watch_metrics(
    process: subprocess.Popen[bytes], port: int, until: Callable[[Samples], bool]
) -> Samples:
    """Rank 0's /metrics, read while `process` runs, until `until` holds of its samples (name,
    labels, value) or the process ends; the last samples read."""
    samples: Samples = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as page:
                text = page.read().decode()
        except OSError:  # not serving yet
            time.sleep(0.2)
            continue
        samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]
        if until(samples):
            break
        time.sleep(0.2)
    return samples


def trainer_cli(
    command: str, config: TrainerConfig, workdir: Path, env: Mapping[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """`dpo-trainer COMMAND --config` in a process (with `env` added to its environment); its
    exit code and termination message."""
    termination = workdir / f"{command}.termination.json"
    result = subprocess.run(
        [str(BIN / "dpo-trainer"), command, "--config", str(write_config(config, workdir))],
        env={"DPO_TERMINATION_LOG": str(termination), "PATH": str(BIN), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    message = json.loads(termination.read_text()) if termination.exists() else {}
    return result.returncode, message


def trained(workdir: Path, **spec: Any) -> TrainerConfig:
    """A tiny run trained in this process; its config."""
    from dpo_trainer.train.run import train

    config = local_config(tiny_job(**spec), workdir)
    train(config)
    return config


def with_promotion(config: TrainerConfig, target: str, **gate: Any) -> TrainerConfig:
    """The config with a promotion target (and gate settings) changed, validated again."""
    assert config.gate is not None
    return TrainerConfig.model_validate(
        {
            **config.model_dump(),
            "promotion": {
                "target": target,
                "mode": "auto",
                "served_model_name": config.model.name,
            },
            "gate": {**config.gate.model_dump(), **gate},
        }
    )


def report_digest(config: TrainerConfig) -> str:
    """The adapter digest the run's gate report names."""
    digest: str = json.loads((Path(config.artifacts_dir) / "eval.json").read_text())[
        "adapterDigest"
    ]
    return digest


def challengers(workdir: Path, target: str) -> list[TrainerConfig]:
    """Two different adapters (seeds 1 and 2), each gated with mustBeatPromoted against the same
    target while nothing is promoted there yet."""
    from dpo_trainer.gate.evaluate import evaluate

    runs = [
        with_promotion(
            trained(workdir / f"run{seed}", dpo={"maxSteps": 10, "seed": seed}),
            target,
            must_beat_promoted=True,
        )
        for seed in (1, 2)
    ]
    for run in runs:
        report = evaluate(run)
        assert report.verdict == "Passed"
        assert report.champion_digest == "", "both beat 'nothing promoted'"
    return runs


@pytest.fixture
def bucket(tmp_path: Path) -> Path:
    """A model and preference files laid out as in a bucket."""
    root = tmp_path / "bucket"
    shutil.copytree(builtin_model_path("builtin:tiny-llama", tmp_path / "build"), root / "sft")
    (root / "sft" / ".complete").unlink()
    pairs = synthetic_preferences("synthetic-preferences/train?n=96")
    (root / "prefs").mkdir()
    for part in range(2):
        rows = pairs[part::2]
        text = "".join(json.dumps(row) + "\n" for row in rows)
        (root / "prefs" / f"train-{part}.jsonl").write_text(text)
    return root
