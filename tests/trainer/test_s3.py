"""Promotion to a real S3 server (SeaweedFS): the pointer is swapped by a conditional write, so
of runs racing to beat one champion exactly one is promoted, and a promoted adapter is read
back only with its digests verified."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from dpo_contract.manifest import verify_manifest
from dpo_contract.pod import EXIT_CHAMPION_CHANGED, ChampionChangedError
from dpo_trainer.publish.object_store import ObjectStoreTarget
from dpo_trainer.publish.promote import promote
from dpo_trainer.publish.targets import promoted_adapter, read_current

from tests.object_store import ObjectStore
from tests.trainer.conftest import BIN, challengers, report_digest, write_config


def test_a_pointer_written_just_before_ours_is_not_overwritten(
    tmp_path: Path, s3_env: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = f"s3://{s3_env.bucket()}/models"
    first, second = challengers(tmp_path, target)
    write = ObjectStoreTarget.write_pointer

    def another_run_lands_first(*args: Any) -> None:
        monkeypatch.setattr(ObjectStoreTarget, "write_pointer", write)
        promote(first)  # between the second run's compare and its pointer write
        write(*args)

    monkeypatch.setattr(ObjectStoreTarget, "write_pointer", another_run_lands_first)
    with pytest.raises(ChampionChangedError, match="promoted meanwhile by another run"):
        promote(second)
    current = read_current(target)
    assert current is not None
    assert current.digest == report_digest(first), "the first run's pointer stands"


def test_runs_racing_to_beat_one_champion_on_s3_leave_exactly_one_promoted(
    tmp_path: Path, s3_env: ObjectStore
) -> None:
    target = f"s3://{s3_env.bucket()}/models"
    runs = challengers(tmp_path, target)
    racers = []
    for index, config in enumerate(runs * 2):  # each adapter twice, all at once
        workdir = tmp_path / f"racer{index}"
        workdir.mkdir()
        racers.append(
            subprocess.Popen(
                [
                    str(BIN / "dpo-trainer"),
                    "promote",
                    "--config",
                    str(write_config(config, workdir)),
                ],
                env={"DPO_TERMINATION_LOG": str(workdir / "t.json"), "PATH": str(BIN)}
                | s3_env.env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    codes = [racer.wait(timeout=300) for racer in racers]

    current = read_current(target)
    assert current is not None
    winner = next(i for i, run in enumerate(runs) if report_digest(run) == current.digest)
    # A repeat of the winner finds its own adapter promoted; the other adapter is refused.
    assert codes[winner] == codes[winner + 2] == 0, codes
    assert codes[1 - winner] == codes[3 - winner] == EXIT_CHAMPION_CHANGED, codes
    promoted = promoted_adapter(target)
    assert promoted is not None, "the promoted adapter reads back with its digests verified"
    local, digest = promoted
    assert digest == current.digest == verify_manifest(local)
