"""The builtin models' shapes and vocabulary: data shared by the trainer, which builds the
models (`dpo_trainer.io.builtin`), and the operator, which plans their memory. No torch here."""

from __future__ import annotations

from typing import Any

BUILTIN_PREFIX = "builtin:"

_SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]
PROMPT_WORDS = [f"q{i}" for i in range(32)]
GOOD_WORDS = [f"g{i}" for i in range(16)]
BAD_WORDS = [f"b{i}" for i in range(16)]
_MARKERS = ["->", "user", "assistant", ":"]
VOCABULARY = _SPECIAL + _MARKERS + PROMPT_WORDS + GOOD_WORDS + BAD_WORDS

# Deterministic model sizes. `tiny-llama` trains in seconds on a laptop CPU.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    },
    # For benchmarks: big enough that a second copy of the weights shows in memory.
    "small-llama": {
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": 1024,
    },
    # For GPU benchmarks: ~0.5B parameters, randomly initialised (no weights are downloaded).
    "llama-0.5b": {
        "hidden_size": 1536,
        "intermediate_size": 4096,
        "num_hidden_layers": 20,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "max_position_embeddings": 4096,
    },
}
