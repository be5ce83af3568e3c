"""Models and data in an object store are downloaded to local disk, with progress, then loaded.

A `file://` URI stands in for a bucket: the trainer reaches it only through fsspec, exactly as it
reaches s3:// or gs://.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dpo_contract.fields import ModelRef
from dpo_trainer.io.models import model_location
from dpo_trainer.train.run import train

from tests.object_store import ObjectStore
from tests.throttle import throttled
from tests.trainer.conftest import local_config, tiny_job


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


DOWNLOAD = """
import sys
from pathlib import Path
from dpo_trainer.io.fetch import download
print(download(sys.argv[1], Path(sys.argv[2]), chunk_bytes=int(sys.argv[3])))
"""
CHUNK = 256 * 1024


def test_a_model_download_reads_ranges_in_parallel_and_resumes_where_it_was_cut_off(
    object_store: ObjectStore, s3_env: ObjectStore, tmp_path: Path
) -> None:
    """6 MiB of weights on the S3 server, read over links of 400 KB/s per connection. The
    first download is killed once a few ranges are in; the second reads only what is missing,
    and the file is the one in the store. Ranges were read over several connections at once."""
    bucket = object_store.bucket()
    weights = os.urandom(6 * 2**20)
    store = object_store.fs()
    store.pipe_file(f"{bucket}/sft/model.safetensors", weights)
    store.pipe_file(f"{bucket}/sft/config.json", b"{}")
    destination = tmp_path / "sft"
    ranges = destination / ".model.safetensors.ranges"
    command = [sys.executable, "-c", DOWNLOAD, f"s3://{bucket}/sft", str(destination), str(CHUNK)]
    with throttled(object_store.port, rate=400_000) as link:
        env = os.environ | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{link.port}"}
        first = subprocess.Popen(command, env=env)
        deadline = time.monotonic() + 60
        while not ranges.exists() or len(ranges.read_text().split()) < 4:
            assert first.poll() is None, "the first download ended before it was cut off"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first.kill()
        first.wait()
        kept = len(ranges.read_text().split())
        second = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    read_again = int(second.stdout.split()[-1])
    print(
        f"cut off after {kept} of {len(weights) // CHUNK} ranges; the second read {read_again} "
        f"bytes of {len(weights) + 2}; {link.most_at_once} connections at once"
    )
    assert (destination / "model.safetensors").read_bytes() == weights
    assert read_again <= len(weights) + 2 - kept * CHUNK
    assert not ranges.exists()
    assert link.most_at_once >= 4
