"""A LoRA adapter's tensors, as PEFT saves them (`adapter_model.safetensors`), and the one
digest of their content that training records and the gate checks."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, shape, dtype and bytes, in name order: equal only for
    the same tensors, whatever file or process holds them."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_adapter_tensors(adapter: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter, by the names PEFT saved them under."""
    path = adapter / ADAPTER_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{path}: the adapter has no {ADAPTER_WEIGHTS}")
    return load_file(str(path))
