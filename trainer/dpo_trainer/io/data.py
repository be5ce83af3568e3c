"""Preference pairs: load, map columns, check every row, clean, and report what was dropped.

Sources are hub datasets (`name` + `split`), jsonl or parquet files at any fsspec URI (local
paths, s3://, gs://, ...), or `builtin:synthetic-preferences/<split>`. Rows come out as
`prompt`, `chosen`, `rejected` in the standard (text) or conversational (messages) format that
TRL takes. A bad row is bad input: the error names the source, row and column. Without eval
data, a deterministic, hash-based part of the training pairs is held out for evaluation and
the gate (`split_held_out`), and never trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from dpo_contract.config import HeldOutReport, HoldOut
from dpo_contract.fields import ColumnMapping, DataFormat, DataSource
from dpo_contract.pod import BadInputError
from dpo_contract.presets import BUILTIN_PREFIX
from dpo_contract.reports import DataReport

from dpo_trainer.io.builtin import is_builtin, synthetic_preferences
from dpo_trainer.io.fetch import COMPLETE_MARKER, cached, download, is_remote, remote_entry

log = logging.getLogger(__name__)

FIELDS = ("prompt", "chosen", "rejected")
Row = dict[str, Any]


def describe(source: DataSource) -> str:
    if source.uri is not None:
        return source.uri
    return f"{source.name} (split {source.split})"


def load_preferences(
    source: DataSource, columns: ColumnMapping, data_format: DataFormat
) -> tuple[list[Row], DataReport]:
    """Read, check and clean the pairs of one source."""
    label = describe(source)
    rows = _read(source, label)
    pairs = [_pair(row, index, columns, label) for index, row in enumerate(rows)]
    if not pairs:
        raise BadInputError(f"{label}: no rows; point the data source at a non-empty dataset")
    _check_format(pairs, data_format, label)
    kept, report = _clean(pairs, label)
    log.info(
        "%s: read %d pairs, dropped %d identical, %d with empty fields, %d duplicates; kept %d",
        label,
        report.read,
        report.identical,
        report.empty,
        report.duplicates,
        report.kept,
    )
    if not kept:
        raise BadInputError(
            f"{label}: every pair was dropped while cleaning ({report.model_dump_json()})"
        )
    return kept, report


def load_split(
    source: DataSource, hold_out: HoldOut, columns: ColumnMapping, data_format: DataFormat
) -> tuple[list[Row], list[Row], DataReport, HeldOutReport]:
    """The pairs of `source`, cleaned, split into (trained on, held out)."""
    pairs, report = load_preferences(source, columns, data_format)
    trained, held = split_held_out(pairs, hold_out)
    prompts = len({_prompt_key(p["prompt"]) for p in held})
    held_report = HeldOutReport(
        **hold_out.model_dump(), source=report.source, pairs=len(held), prompts=prompts
    )
    log.info(
        "%s: held out %d pairs (%d prompts) for evaluation and the gate; training on %d",
        report.source,
        len(held),
        prompts,
        len(trained),
    )
    return trained, held, report, held_report


def split_held_out(pairs: list[Row], hold_out: HoldOut) -> tuple[list[Row], list[Row]]:
    """(trained on, held out). A pair is held out when its prompt's sha256 falls below
    `fraction` of the hash space, so every pair of one prompt lands on one side, and the split
    is the same in every pod, run and process. Beyond `max_pairs`, the prompts that hash
    highest go back to training; at least one prompt is always held out, and one trained on."""
    by_prompt: dict[str, list[Row]] = {}
    for pair in pairs:
        by_prompt.setdefault(_prompt_key(pair["prompt"]), []).append(pair)
    if len(by_prompt) < 2:
        raise BadInputError(
            f"{len(pairs)} pair(s) with {len(by_prompt)} prompt(s): holding any out leaves "
            "nothing to train on; give data.eval or evalGate.data, or more training pairs"
        )
    ranked = sorted(by_prompt, key=_prompt_hash)
    held: set[str] = set()
    count = 0
    for key in ranked[:-1]:  # the last prompt is always trained on
        if held and (
            _prompt_hash(key) >= hold_out.fraction
            or count + len(by_prompt[key]) > hold_out.max_pairs
        ):
            break
        held.add(key)
        count += len(by_prompt[key])
    trained = [p for p in pairs if _prompt_key(p["prompt"]) not in held]
    return trained, [p for p in pairs if _prompt_key(p["prompt"]) in held]


def _prompt_key(prompt: object) -> str:
    """A prompt (text or messages) as canonical text."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def _prompt_hash(key: str) -> float:
    """Where a prompt falls in [0, 1): the first 8 bytes of its sha256."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _read(source: DataSource, label: str) -> list[Row]:
    if source.uri is not None and is_builtin(source.uri):
        try:
            return list(synthetic_preferences(source.uri.removeprefix(BUILTIN_PREFIX)))
        except KeyError as error:
            raise BadInputError(f"{label}: {error.args[0]}") from None
    if source.uri is not None:
        return _read_files(source.uri, label)
    if source.name is None:
        raise BadInputError("a data source has neither name nor uri; render trainer.json with dpo")
    return _read_hub(source, label)


def _read_files(uri: str, label: str) -> list[Row]:
    import fsspec

    if is_remote(uri):
        # Downloaded first (progress in the log), once per pod, into its temporary directory.
        local = cached(
            Path(tempfile.gettempdir()) / "dpo-data",
            remote_entry(uri),
            lambda staging: download(uri, staging),
        )
        files = [
            fsspec.open(str(path), mode="rb")
            for path in sorted(local.rglob("*"))
            if path.is_file() and path.name != COMPLETE_MARKER
        ]
    else:
        try:
            files = fsspec.open_files(uri, mode="rb")
        except (ValueError, ImportError) as error:
            raise BadInputError(f"{label}: cannot open ({error}); check the URI scheme") from None
    if not files:
        raise BadInputError(f"{label}: no such file; check the path and that its volume is mounted")
    rows: list[Row] = []
    for file in files:
        path = file.path
        if path.endswith(".parquet"):
            rows += _read_parquet(file, path)
        elif path.endswith((".jsonl", ".json")):
            rows += _read_jsonl(file, path)
        else:
            raise BadInputError(f"{path}: unsupported file type; use .jsonl or .parquet files")
    return rows


def _read_jsonl(file: Any, path: str) -> list[Row]:
    rows: list[Row] = []
    try:
        with file as stream:
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise BadInputError(
                        f"{path}: line {number}: not valid JSON ({error.msg}); each line must be "
                        "one JSON object"
                    ) from None
                if not isinstance(row, dict):
                    raise BadInputError(f"{path}: line {number}: expected a JSON object")
                rows.append(row)
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file; check the path and its volume") from None
    return rows


def _read_parquet(file: Any, path: str) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        with file as stream:
            table = pq.read_table(stream)
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file; check the path and its volume") from None
    except Exception as error:  # pyarrow raises many types for a damaged file
        raise BadInputError(f"{path}: not a readable parquet file ({error})") from None
    rows: list[Row] = table.to_pylist()
    return rows


def _read_hub(source: DataSource, label: str) -> list[Row]:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        dataset = datasets.load_dataset(source.name, split=source.split, revision=source.revision)
    except DatasetNotFoundError:
        raise BadInputError(
            f"{label}: dataset not found; check the name, and the HF_TOKEN secret if it is gated"
        ) from None
    except ValueError as error:
        # An unknown split is a ValueError naming the splits that exist.
        raise BadInputError(f"{label}: {error}") from None
    return list(dataset)


def _pair(row: Row, index: int, columns: ColumnMapping, label: str) -> Row:
    mapping = {"prompt": columns.prompt, "chosen": columns.chosen, "rejected": columns.rejected}
    missing = [column for column in mapping.values() if column not in row]
    if missing:
        raise BadInputError(
            f"{label}: row {index + 1} has no column {', '.join(missing)} (it has "
            f"{', '.join(sorted(row)) or 'none'}); map the dataset's columns with spec.data.columns"
        )
    return {field: row[column] for field, column in mapping.items()}


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )


def _check_format(pairs: list[Row], data_format: DataFormat, label: str) -> None:
    detected: DataFormat = "conversational" if _is_messages(pairs[0]["chosen"]) else "standard"
    if data_format != "auto" and data_format != detected:
        raise BadInputError(
            f"{label}: spec.data.format is {data_format} but row 1 is {detected} "
            "(text fields are standard, lists of {role, content} messages conversational)"
        )
    for index, pair in enumerate(pairs):
        for field in FIELDS:
            value = pair[field]
            ok = isinstance(value, str) if detected == "standard" else _is_messages(value)
            if not ok:
                expected = "text" if detected == "standard" else "a list of {role, content}"
                raise BadInputError(
                    f"{label}: row {index + 1}, column {field!r}: expected {expected} like row 1, "
                    f"got {type(value).__name__}; fix the row or drop it"
                )


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    return "\n".join(m["content"].strip() for m in value)


def _clean(pairs: list[Row], label: str) -> tuple[list[Row], DataReport]:
    identical = empty = duplicates = 0
    seen: set[str] = set()
    kept: list[Row] = []
    for pair in pairs:
        texts = [_text(pair[field]) for field in FIELDS]
        if not all(texts):
            empty += 1
            continue
        if json.dumps(pair["chosen"]) == json.dumps(pair["rejected"]):
            identical += 1
            continue
        key = json.dumps([pair[field] for field in FIELDS])
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append(pair)
    report = DataReport(
        source=label,
        read=len(pairs),
        identical=identical,
        empty=empty,
        duplicates=duplicates,
        kept=len(kept),
    )
    return kept, report
