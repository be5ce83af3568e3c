"""Preference data: column mapping, formats, cleaning with counts, and errors that name the row."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dpo_contract.fields import ColumnMapping, DataSource
from dpo_contract.pod import EXIT_BAD_INPUT, BadInputError
from dpo_trainer.io.data import load_preferences

from tests.trainer.conftest import local_config, tiny_job, trainer_cli

STANDARD = ColumnMapping()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load(path: Path | str, columns: ColumnMapping = STANDARD, data_format: str = "auto") -> Any:
    return load_preferences(DataSource(uri=str(path)), columns, data_format)  # type: ignore[arg-type]


def test_a_dataset_with_its_own_column_names_is_mapped(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        [{"input": "2+2?", "accepted": " 4", "rejected": " 5", "source": "math"}],
    )
    rows, _ = load(path, ColumnMapping(prompt="input", chosen="accepted", rejected="rejected"))
    assert rows == [{"prompt": "2+2?", "chosen": " 4", "rejected": " 5"}]


def test_cleaning_drops_and_counts_bad_pairs(tmp_path: Path) -> None:
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            good,
            good,  # exact duplicate
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "  ", "rejected": "b"},
            {"prompt": "", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "a", "rejected": "b"},
        ],
    )
    rows, report = load(path)
    assert len(rows) == 2
    assert (report.read, report.duplicates, report.identical, report.empty, report.kept) == (
        6,
        1,
        1,
        2,
        2,
    )


def test_a_wrong_value_names_file_row_and_column(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2
        + [{"prompt": "p", "chosen": 7, "rejected": "b"}],
    )
    with pytest.raises(BadInputError, match=r"prefs.jsonl: row 3, column 'chosen': expected text"):
        load(path)


def test_broken_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": \n')
    with pytest.raises(BadInputError, match=r"prefs.jsonl: line 2: not valid JSON"):
        load(path)


def test_a_missing_column_lists_what_the_data_has(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"question": "p", "good": "a", "bad": "b"}])
    with pytest.raises(BadInputError) as caught:
        load(path)
    message = str(caught.value)
    assert "row 1 has no column prompt, chosen, rejected" in message
    assert "(it has bad, good, question)" in message
    assert "spec.data.columns" in message


def test_parquet_is_read_through_an_fsspec_uri(tmp_path: Path) -> None:
    table = pa.table({"prompt": ["p1", "p2"], "chosen": ["a", "c"], "rejected": ["b", "d"]})
    pq.write_table(table, tmp_path / "prefs.parquet")
    rows, report = load(f"file://{tmp_path}/prefs.parquet")
    assert [row["chosen"] for row in rows] == ["a", "c"]
    assert report.kept == 2


def test_conversational_pairs_are_recognised(tmp_path: Path) -> None:
    user = [{"role": "user", "content": "hi"}]
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "prompt": user,
                "chosen": [{"role": "assistant", "content": "hello!"}],
                "rejected": [{"role": "assistant", "content": "go away"}],
            }
        ],
    )
    rows, _ = load(path, data_format="conversational")
    assert rows[0]["prompt"] == user
    expected = "spec.data.format is standard but row 1 is conversational"
    with pytest.raises(BadInputError, match=re.escape(expected)):
        load(path, data_format="standard")


def test_a_missing_file_says_to_check_the_volume(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no such file"):
        load(tmp_path / "absent.jsonl")


def test_bad_data_exits_2_with_the_reason_in_the_termination_message(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "a"}])
    config = local_config(tiny_job(), tmp_path).model_copy(deep=True)
    config.data.train.uri = str(data)
    config.data.eval = None
    code, message = trainer_cli("train", config, tmp_path)
    assert code == EXIT_BAD_INPUT
    assert message["status"] == "bad-input"
    assert f"{data}: row 1 has no column rejected" in message["message"]
