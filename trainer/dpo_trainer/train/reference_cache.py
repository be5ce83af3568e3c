"""Precomputed reference log-probs, kept under the output and reused by any later run that would
compute the same numbers: a beta sweep, a rerun, another learning rate.

The key is a digest of everything those numbers depend on: the reference's weights, every column
of the tokenized pairs (the data, the tokenizer and its chat template), how sequences are cut
(maxLength, truncation mode), and the settings of TRL's reference forward that change a
log-prob (loss types, ld_alpha, padding-free, the dtype). Not beta, the learning rate or
anything else of training, which is why a sweep shares it. A changed key is a different entry:
it never reuses.

    <cache>/<key>/logps.safetensors   chosen and rejected log-probs, in the dataset's order
    <cache>/<key>/key.json            what the key was made of; written last, so an entry
                                      without it is incomplete and is computed again
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

log = logging.getLogger(__name__)

# TRL's settings that change a reference log-prob (beta, for one, does not).
LOG_PROB_SETTINGS = ("loss_type", "ld_alpha", "max_length", "truncation_mode", "padding_free")
LOGPS_FILE = "logps.safetensors"
KEY_FILE = "key.json"
# Columns TRL adds to the dataset it is given, which are not its content.
_ADDED_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def weights_digest(model: torch.nn.Module) -> tuple[str, bool]:
    """sha256 over the reference's weights, in name order: every parameter and buffer but a LoRA
    adapter's (with LoRA the reference is the base model with its adapter disabled); and whether
    they are sharded (DTensors), in which case the digest is of this rank's shards and their
    placements only, and the ranks' digests together are the weights' (see `combine`).

    Gathering the full tensors instead would hold the whole reference on every rank."""
    from torch.distributed.tensor import DTensor

    digest = hashlib.sha256()
    sharded = False
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        if "lora_" in name:
            continue
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        if isinstance(tensor, DTensor):
            sharded = True
            digest.update(f"{tuple(tensor.device_mesh.shape)} {tensor.placements}".encode())
            tensor = tensor.to_local()
        data = tensor.detach().to("cpu").contiguous()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest(), sharded


def combine(digests: list[str]) -> str:
    """One digest of the ranks' digests of their shards, in rank order."""
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def dataset_digest(table: pa.Table) -> str:
    """sha256 over every column of the tokenized pairs, in row order."""
    digest = hashlib.sha256()
    for name in sorted(table.column_names):
        if name in _ADDED_COLUMNS:
            continue
        digest.update(name.encode())
        _hash_array(digest, table.column(name).combine_chunks())
    return digest.hexdigest()


def _hash_array(digest: Any, array: pa.Array) -> None:
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        # Lengths and then the values: the same for any chunking or slicing of the same rows.
        digest.update(array.value_lengths().fill_null(-1).to_numpy().tobytes())
        _hash_array(digest, array.flatten())
    elif pa.types.is_integer(array.type) or pa.types.is_floating(array.type):
        digest.update(array.fill_null(0).to_numpy().tobytes())
    else:
        digest.update(json.dumps(array.to_pylist(), sort_keys=True, default=str).encode())


@dataclass(frozen=True)
class CachedLogProbs:
    chosen: torch.Tensor
    rejected: torch.Tensor
    reused: bool


class ReferenceCache:
    """The cache at `uri` (a mounted path or an object store)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.uri)

    @staticmethod
    def key(fields: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]

    def load(self, key: str, rows: int) -> CachedLogProbs | None:
        """The entry for `key`, or None when there is none (or it does not have `rows` rows)."""
        try:
            recorded = json.loads(self.fs.cat_file(f"{self.path}/{key}/{KEY_FILE}"))
            tensors = load_tensors(self.fs.cat_file(f"{self.path}/{key}/{LOGPS_FILE}"))
        except FileNotFoundError:
            return None
        if recorded.get("rows") != rows or tensors["chosen"].shape != (rows,):
            log.warning("%s/%s does not hold %d rows; computing them again", self.uri, key, rows)
            return None
        return CachedLogProbs(tensors["chosen"], tensors["rejected"], reused=True)

    def store(self, key: str, fields: dict[str, Any], logps: CachedLogProbs) -> None:
        directory = f"{self.path}/{key}"
        self.fs.makedirs(directory, exist_ok=True)
        tensors = {"chosen": logps.chosen.contiguous(), "rejected": logps.rejected.contiguous()}
        self.fs.pipe_file(f"{directory}/{LOGPS_FILE}", save_tensors(tensors))
        recorded = {"rows": int(logps.chosen.shape[0]), "fields": fields}
        self.fs.pipe_file(f"{directory}/{KEY_FILE}", json.dumps(recorded, indent=2).encode())
