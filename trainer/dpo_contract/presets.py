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
    # For the memory tier: ~113M parameters, so each rank's share of the weights stands out from
    # the process's own few hundred MiB.
    "medium-llama": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "max_position_embeddings": 512,
    },
    # Llama 3.1 70B's depth (80 decoder layers, 8 query heads per key/value head, MLP 3.5x wide)
    # at a width a CPU trains in seconds: the layer-by-layer paths at the real layer count.
    "llama-70b-depth": {
        "hidden_size": 64,
        "intermediate_size": 224,
        "num_hidden_layers": 80,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "max_position_embeddings": 256,
    },
    # Llama 3.1 8B's layers (the vocabulary is the builtin one): for tools/gpu_fsdp_check.sh.
    "llama-8b-layers": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
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
