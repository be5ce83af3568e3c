"""Precomputed reference log-probs are kept by content under the output and reused by a later run
with the same key (a beta sweep); a run whose key changed computes its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from dpo_contract.reports import TrainingReport
from dpo_trainer.train.reference_cache import KEY_FILE, LOGPS_FILE, dataset_digest
from dpo_trainer.train.run import train

from tests.trainer.conftest import local_config, tiny_job

# Training barely matters here: the reference log-probs are computed before it starts.
SHORT = {"precomputeRefLogProbs": True, "maxSteps": 10, "loggingSteps": 5, "saveSteps": 10}


def run(workdir: Path, cache: Path, **spec: Any) -> TrainingReport:
    dpo = {**SHORT, **spec.pop("dpo", {})}
    config = local_config(tiny_job(dpo=dpo, **spec), workdir)
    return train(config.model_copy(update={"reference_cache": str(cache)}))


def reused(report: TrainingReport) -> dict[str, bool]:
    return {entry.split: entry.reused for entry in report.reference_log_probs}


def keys(report: TrainingReport) -> dict[str, str]:
    return {entry.split: entry.key for entry in report.reference_log_probs}


def losses(report: TrainingReport) -> list[object]:
    return [entry["loss"] for entry in report.log_history if "loss" in entry]


def test_a_beta_sweep_computes_the_reference_once_and_trains_as_if_it_had_not(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "reference-logps"
    first = run(tmp_path / "beta-0.1", cache, dpo={"beta": 0.1})
    assert reused(first) == {"train": False, "eval": False}
    for key in keys(first).values():
        assert (cache / key / LOGPS_FILE).exists()
        assert (cache / key / KEY_FILE).exists()

    second = run(tmp_path / "beta-0.5", cache, dpo={"beta": 0.5})
    assert reused(second) == {"train": True, "eval": True}
    assert keys(second) == keys(first), "beta is not part of the key"
    saved = sum(e.seconds for e in first.reference_log_probs) - sum(
        e.seconds for e in second.reference_log_probs
    )
    print(f"reference log-probs: {saved:.2f}s saved by the second run of the sweep")

    # The same run computing its own: the reused numbers train it exactly the same.
    alone = run(tmp_path / "beta-0.5-alone", tmp_path / "other-cache", dpo={"beta": 0.5})
    assert reused(alone) == {"train": False, "eval": False}
    assert losses(second) == losses(alone)
    measured = {k: v for k, v in second.eval.items() if not k.endswith(("runtime", "per_second"))}
    assert measured == {k: alone.eval[k] for k in measured}
    assert "eval_rewards/accuracies" in measured


def test_a_changed_key_never_reuses(tmp_path: Path) -> None:
    cache = tmp_path / "reference-logps"
    base = run(tmp_path / "base", cache)
    changed = {
        "maxLength": run(tmp_path / "max-length", cache, dpo={"maxLength": 16}),
        "lossType": run(tmp_path / "ipo", cache, dpo={"lossType": ["ipo"]}),
        "data": run(
            tmp_path / "data",
            cache,
            data={"train": {"uri": "builtin:synthetic-preferences/train?n=256"}},
        ),
    }
    for what, report in changed.items():
        assert reused(report)["train"] is False, f"a changed {what} reused the cache"
        assert keys(report)["train"] != keys(base)["train"]
    # The held-out pairs did not change with the training data: those are shared.
    assert reused(changed["data"])["eval"] is True
    assert len(list(cache.iterdir())) == 2 + 2 + 2 + 1, "one entry per key"


def test_the_data_digest_is_the_rows_not_how_they_are_stored() -> None:
    rows = {"prompt_ids": [[1, 2], [3]], "chosen_ids": [[4], [5, 6]], "text": ["a", "b"]}
    whole = pa.table(rows)
    chunked = pa.concat_tables([whole.slice(0, 1), whole.slice(1, 1)])
    assert dataset_digest(whole) == dataset_digest(chunked)
    swapped = pa.table({**rows, "chosen_ids": [[5, 6], [4]]})
    assert dataset_digest(swapped) != dataset_digest(whole)
    moved = pa.table({**rows, "prompt_ids": [[1], [2, 3]]})
    assert dataset_digest(moved) != dataset_digest(whole), "where a row ends matters"
