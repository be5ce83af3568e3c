"""The model initializer (`dpo-trainer init`), as its pod runs it: the model resolved where it
lives, counted on the meta device without reading a weight, copied once into the run's storage,
and read from there by training; a model that is not there fails in seconds, exit 2, named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dpo_contract.config import TrainerConfig
from dpo_contract.pod import EXIT_BAD_INPUT
from dpo_contract.reports import Failure, ModelReport
from dpo_operator.core.plan.configs import count_config, known_configs
from dpo_trainer.io.models import model_location
from transformers import AutoModelForCausalLM

from tests.trainer.conftest import BIN, local_config, tiny_job, trainer_cli, write_config

# Runs a command and prints the peak RSS (KiB) of what it ran, so the initializer's own
# footprint is measured, not the test process's other children.
PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(code)\n"
)


def init_config(model: str, workdir: Path, staged: str | None = None) -> TrainerConfig:
    config = local_config(tiny_job(model={"name": model}), workdir)
    return config.model_copy(update={"model": config.model.model_copy(update={"staged": staged})})


def test_a_bucket_model_is_counted_staged_once_and_trained_from_the_copy(
    bucket: Path, tmp_path: Path
) -> None:
    staged = tmp_path / "artifacts" / "base-model"
    config = init_config(f"file://{bucket}/sft", tmp_path, str(staged))
    started = time.monotonic()
    code, message = trainer_cli("init", config, tmp_path, {"HOME": str(tmp_path)})
    print(f"init: {time.monotonic() - started:.1f} s")
    assert code == 0, message
    report = ModelReport.model_validate(message)
    loaded = AutoModelForCausalLM.from_pretrained(bucket / "sft")
    assert report.parameters == sum(p.numel() for p in loaded.parameters())
    assert report.largest_tensor == max(p.numel() for p in loaded.parameters())
    assert report.bytes_on_disk == (bucket / "sft" / "model.safetensors").stat().st_size
    assert report.config["model_type"] == "llama"
    assert report.staged == str(staged)
    assert (staged / ".complete").exists()
    assert (staged / "model.safetensors").read_bytes() == (
        bucket / "sft" / "model.safetensors"
    ).read_bytes()
    recorded = json.loads((tmp_path / "artifacts" / "model.json").read_text())
    assert recorded["parameters"] == report.parameters

    # Training reads the copy: the bucket can go.
    (bucket / "sft" / "model.safetensors").rename(bucket / "moved.safetensors")
    assert model_location(config.model) == str(staged)
    again, _ = trainer_cli("init", config, tmp_path, {"HOME": str(tmp_path)})
    assert again == EXIT_BAD_INPUT, "the source is what the initializer checks, every time"


def test_a_model_is_counted_from_its_config_without_reading_a_weight(tmp_path: Path) -> None:
    """Qwen3-8B's published config.json beside 16 GB of (sparse) shards: the meta-device count is
    the published 8.19B and the planner's own formula, and the initializer's peak memory is
    what building on the meta device takes, not the weights'."""
    folder = tmp_path / "qwen3-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(known_configs()["qwen3-8b"]))
    for shard in range(1, 5):
        with (folder / f"model-0000{shard}-of-00004.safetensors").open("wb") as sparse:
            sparse.truncate(4 * 10**9)
    config = init_config(str(folder), tmp_path)
    termination = tmp_path / "termination.json"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PEAK_RSS,
            str(BIN / "dpo-trainer"),
            "init",
            "--config",
            str(write_config(config, tmp_path)),
        ],
        env={**os.environ, "DPO_TERMINATION_LOG": str(termination)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    peak_mib = int(result.stdout.split()[-1]) / 1024
    report = ModelReport.model_validate_json(termination.read_text())
    print(f"Qwen3-8B counted: {report.parameters}; initializer peak RSS {peak_mib:.0f} MiB")
    assert report.parameters == 8_190_735_360
    assert report.parameters == count_config(known_configs()["qwen3-8b"]).parameters
    assert report.bytes_on_disk == 16 * 10**9
    assert report.files == 4
    assert report.revision is None
    assert peak_mib < 2048, "16 GB of weights were never read"


def test_a_model_that_is_not_there_fails_in_seconds_naming_it(tmp_path: Path) -> None:
    missing = f"file://{tmp_path}/no-such-bucket/sft"
    started = time.monotonic()
    code, message = trainer_cli("init", init_config(missing, tmp_path), tmp_path)
    took = time.monotonic() - started
    failure = Failure.model_validate(message)
    print(f"failed in {took:.1f} s: {failure.message}")
    assert code == EXIT_BAD_INPUT
    assert failure.status == "bad-input"
    assert failure.message.startswith(f"model {missing}: nothing there")

    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    (weights_only / "model.safetensors").write_bytes(b"\0" * 64)
    code, message = trainer_cli("init", init_config(str(weights_only), tmp_path), tmp_path)
    assert code == EXIT_BAD_INPUT
    assert "no config.json among its 1 file(s)" in Failure.model_validate(message).message
