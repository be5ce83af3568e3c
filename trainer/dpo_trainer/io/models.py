"""Loading the policy, the optional separate reference, the tokenizer and the LoRA settings.

With LoRA the reference is the policy with its adapter disabled, so no second copy is loaded.
A separate frozen reference is loaded only when `model.reference` asks for one. Hub ids and
local paths go to `from_pretrained`; builtin models are built and object-store models
downloaded to the local cache first.
"""

from __future__ import annotations

import logging
import os
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from dpo_contract.fields import LoraSettings, ModelRef, PolicyRef
from dpo_contract.pod import BadInputError
from torch import nn

from dpo_trainer.io.builtin import builtin_model_path, is_builtin
from dpo_trainer.io.fetch import COMPLETE_MARKER, cached, download, is_remote, remote_entry

log = logging.getLogger(__name__)

ENV_CACHE = "DPO_CACHE"


def cache_dir() -> Path:
    """Where builtin models are built: $DPO_CACHE or ~/.cache/dpo-operator."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "dpo-operator")


def model_location(ref: ModelRef) -> str:
    """A path or hub id that `from_pretrained` can load: the model initializer's copy where
    trainer.json names one, else the model where it lives."""
    staged = ref.staged if isinstance(ref, PolicyRef) else None
    if staged:
        copy = _staged_copy(staged)
        if copy is not None:
            log.info("model %s: reading the initializer's copy at %s", ref.name, staged)
            return copy
        log.warning("no complete copy of the model at %s; reading %s itself", staged, ref.name)
    if is_builtin(ref.name):
        try:
            return str(builtin_model_path(ref.name, cache_dir() / "models"))
        except KeyError as error:
            raise BadInputError(f"model.name: {error.args[0]}") from None
    if is_remote(ref.name):
        entry = remote_entry(ref.name, ref.revision)
        return str(
            cached(cache_dir() / "models", entry, lambda staging: download(ref.name, staging))
        )
    return ref.name


def _staged_copy(staged: str) -> str | None:
    """A local path of the initializer's complete copy at `staged` (an object-store copy is
    downloaded once into the local cache; the store is asked only until it is), or None."""
    if not is_remote(staged):
        return staged if (Path(staged) / COMPLETE_MARKER).exists() else None
    import fsspec

    models, entry = cache_dir() / "models", remote_entry(staged)
    if not (models / entry / COMPLETE_MARKER).exists():
        fs, path = fsspec.core.url_to_fs(f"{staged.rstrip('/')}/{COMPLETE_MARKER}")
        if not fs.exists(path):
            return None
    return str(cached(models, entry, lambda into: download(staged, into)))


def torch_dtype(mixed_precision: str) -> Any:
    """bf16 only where the hardware has it, so the same config also runs on CPU."""
    import torch

    if mixed_precision == "bf16" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(
    ref: ModelRef, *, trust_remote_code: bool, dtype: Any, device_map: str | None = None
) -> Any:
    """The model; `device_map="auto"` spreads its layers over every visible GPU."""
    from transformers import AutoModelForCausalLM

    options: dict[str, Any] = {"device_map": device_map} if device_map else {}
    return _load(
        AutoModelForCausalLM, ref, trust_remote_code=trust_remote_code, dtype=dtype, **options
    )


def load_tokenizer(ref: ModelRef, *, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer, ref, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load(loader: Any, ref: ModelRef, **kwargs: Any) -> Any:
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    location = model_location(ref)
    try:
        return loader.from_pretrained(location, revision=ref.revision, **kwargs)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, HFValidationError) as e:
        raise BadInputError(
            f"model {ref.name!r} (revision {ref.revision or 'default'}) cannot be loaded: "
            f"{type(e).__name__}; check the name and revision, and for gated models the HF_TOKEN "
            "secret"
        ) from None
    except OSError as error:
        if Path(location).is_absolute() or location.startswith("."):
            raise BadInputError(
                f"model {ref.name!r}: no loadable checkpoint at {location} ({error}); check the "
                "path and that the volume is mounted"
            ) from None
        raise


def lora_config(settings: LoraSettings) -> Any:
    from peft import LoraConfig

    targets: str | list[str] = settings.target_modules
    if settings.target_modules == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
    )


def build_on_meta(ref: ModelRef, *, trust_remote_code: bool, dtype: torch.dtype) -> nn.Module:
    """The model's modules with parameters on the meta device (nothing allocated) and its
    buffers (rotary frequencies) computed for real, as `from_pretrained` would build them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    location = model_location(ref)
    config = AutoConfig.from_pretrained(
        location, revision=ref.revision, trust_remote_code=trust_remote_code
    )
    with init_empty_weights(include_buffers=False):
        model: Any = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    model.config._name_or_path = location
    # Without a generation_config.json, the one from_config derived stays.
    with suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(
            location, revision=ref.revision or "main"
        )
    model.eval()
    built: nn.Module = model
    return built
