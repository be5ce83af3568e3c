"""Tiny models and preference data built locally and deterministically (no hub access).

`builtin:tiny-llama` is a small Llama with a word-level tokenizer; `builtin:synthetic-preferences/
<split>` are pairs in which the chosen response uses "good" words and the rejected one "bad"
words. A model can only separate them by learning the rule, so held-out reward accuracy rising
above 0.5 means DPO works end to end. Used by the tests and the quickstart.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from dpo_contract.presets import (
    BAD_WORDS,
    BUILTIN_PREFIX,
    GOOD_WORDS,
    MODEL_PRESETS,
    PROMPT_WORDS,
    VOCABULARY,
)

from dpo_trainer.io.fetch import cached

SYNTHETIC_PREFERENCES = "synthetic-preferences"

MODEL_FORMAT = 2  # bump when the builtin models change, so cached copies are rebuilt
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)
_SPLIT_SEEDS = {"train": 1, "eval": 2, "test": 3, "anchor": 4}


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def builtin_model_path(name: str, cache_dir: Path) -> Path:
    """Build `builtin:<preset>` once into `cache_dir` and return its path.

    The model is saved like any checkpoint and then loaded through the ordinary path-loading
    code, so tests exercise what real runs do. Every process of a job may ask at once: see
    `dpo_trainer.io.fetch.cached`.
    """
    preset = name.removeprefix(BUILTIN_PREFIX)
    if preset not in MODEL_PRESETS:
        raise KeyError(
            f"unknown builtin model {name!r}; available: "
            + ", ".join(BUILTIN_PREFIX + p for p in sorted(MODEL_PRESETS))
        )

    def build(staging: Path) -> None:
        # A fresh interpreter: once torch.distributed is initialized, transformers writes model
        # files on global rank 0 only, so a build by any other rank would save no weights.
        subprocess.run(
            [sys.executable, "-m", __name__, preset, str(staging)], check=True, capture_output=True
        )
        missing = [f for f in ("config.json", "model.safetensors") if not (staging / f).exists()]
        if missing:
            raise RuntimeError(f"building {name} into {staging} wrote no {', '.join(missing)}")

    return cached(cache_dir, f"{preset}-v{MODEL_FORMAT}", build)


def save_preset(preset: str, directory: Path) -> None:
    """Save the model and tokenizer of `preset` into `directory` (run in a fresh process)."""
    _build_model(MODEL_PRESETS[preset]).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)


def _build_model(preset: dict[str, Any]) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCABULARY),
        pad_token_id=VOCABULARY.index("<pad>"),
        bos_token_id=VOCABULARY.index("<bos>"),
        eos_token_id=VOCABULARY.index("<eos>"),
        tie_word_embeddings=False,
        **preset,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(
        models.WordLevel({word: i for i, word in enumerate(VOCABULARY)}, unk_token="<unk>")
    )
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer_class: Any = PreTrainedTokenizerFast  # untyped constructor
    tokenizer = tokenizer_class(
        tokenizer_object=word_level,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def synthetic_preferences(spec: str) -> list[dict[str, str]]:
    """Pairs for `synthetic-preferences/<split>[?n=N&words=W&flip=true&noise=P]`.

    Each split has its own seed, so eval prompts and responses are unseen combinations. `words`
    sets the response length (default 3; benchmarks use longer ones). `flip=true` swaps chosen
    and rejected: a run trained on it must fail the gate. `noise=P` swaps each pair with
    probability P: at 0.5 the labels are coin flips and there is nothing to learn. The `anchor`
    split's chosen responses
    are neutral continuations (prompt words) that preference training should leave alone: an
    anchor set for the gate's drift check.
    """
    path, _, query = spec.partition("?")
    name, _, split = path.partition("/")
    if name != SYNTHETIC_PREFERENCES or split not in _SPLIT_SEEDS:
        raise KeyError(
            f"unknown builtin dataset {BUILTIN_PREFIX}{spec!r}; use "
            f"{BUILTIN_PREFIX}{SYNTHETIC_PREFERENCES}/<{'|'.join(_SPLIT_SEEDS)}>[?n=512]"
        )
    options = {key: values[-1] for key, values in parse_qs(query).items()}
    count = int(options.get("n", 512 if split == "train" else 128))
    flip = options.get("flip", "false").lower() == "true"
    words = int(options.get("words", 3))
    noise = float(options.get("noise", 0))
    rng = random.Random(_SPLIT_SEEDS[split])
    pairs = []
    for _ in range(count):
        prompt = " ".join(rng.choices(PROMPT_WORDS, k=4)) + " ->"
        chosen_words = PROMPT_WORDS if split == "anchor" else GOOD_WORDS
        good = " " + " ".join(rng.choices(chosen_words, k=words))
        bad = " " + " ".join(rng.choices(BAD_WORDS, k=words))
        swapped = flip != (noise > 0 and rng.random() < noise)
        chosen, rejected = (bad, good) if swapped else (good, bad)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


if __name__ == "__main__":
    save_preset(sys.argv[1], Path(sys.argv[2]))
