"""Models and data in an object store are downloaded to local disk, with progress, then loaded.

A `file://` URI stands in for a bucket: the trainer reaches it only through fsspec, exactly as it
reaches s3:// or gs://.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from dpo_contract.fields import ModelRef
from dpo_trainer.io.builtin import builtin_model_path, synthetic_preferences
from dpo_trainer.io.models import model_location
from dpo_trainer.train.run import train

from tests.trainer.conftest import local_config, tiny_job


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


def test_a_model_and_data_from_a_bucket_are_downloaded_then_trained_on(
    bucket: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "pod-tmp"))
    (tmp_path / "pod-tmp").mkdir()
    job = tiny_job(
        model={"name": f"file://{bucket}/sft"},
        data={"train": {"uri": f"file://{bucket}/prefs/train-*.jsonl"}, "eval": None},
        dpo={"maxSteps": 4, "saveSteps": 100},
        evalGate={"enabled": False},
    )
    caplog.set_level(logging.INFO, logger="dpo_trainer")
    summary = train(local_config(job, tmp_path))
    downloads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("download")]
    print("\n".join(downloads))
    files = len(list((bucket / "sft").iterdir()))
    assert any(m.startswith(f"downloading file://{bucket}/sft: {files} file(s)") for m in downloads)
    assert any(m.startswith(f"downloading file://{bucket}/sft: 100%") for m in downloads)
    assert any("prefs/train-*.jsonl: 2 file(s)" in m for m in downloads)
    assert summary.status == "completed"
    train_data = summary.data["train"]
    assert train_data is not None
    assert train_data.read == 96, "both files of the glob"

    caplog.clear()
    cached = model_location(ModelRef(name=f"file://{bucket}/sft"))
    assert Path(cached).parent == tmp_path / "cache" / "models"
    assert not [r for r in caplog.records if "downloading" in r.getMessage()], "downloaded once"


def test_hub_ids_and_local_paths_go_to_from_pretrained_unchanged(tmp_path: Path) -> None:
    assert model_location(ModelRef(name="meta-llama/Llama-3.1-8B-Instruct")) == (
        "meta-llama/Llama-3.1-8B-Instruct"
    )
    assert model_location(ModelRef(name=str(tmp_path))) == str(tmp_path)
