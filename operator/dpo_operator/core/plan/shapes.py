"""What the planner knows of the hardware and the model: GPU memory (from the spec or a node label)
and the model's shape (from spec.model.parameters, the builtin presets, or well-known models
matched in the model name, also inside a storage URI such as s3://bucket/llama-3.3-70b-sft).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dpo_contract.presets import BUILTIN_PREFIX, MODEL_PRESETS, VOCABULARY

from dpo_operator.api import DPOJobSpec, parse_parameter_count, parse_quantity

GIB = 1 << 30
RUNTIME_BYTES = 3 * GIB
USABLE_FRACTION = 0.9
ASSUMED_GPU_MEMORY = 80 * GIB
# The gate scores this many pairs at once (dpo_trainer.gate.evaluate.BATCH_SIZE).


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know of a decoder-only transformer."""

    parameters: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    kv_ratio: float = 1.0  # key/value width over hidden width (grouped-query attention)
    source: str = ""

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest weight: the embeddings or an MLP projection."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)


def _llama_like(
    hidden: int,
    layers: int,
    intermediate: int,
    vocab: int,
    kv_heads_ratio: float,
    *,
    tied: bool = False,
) -> int:
    """Parameter count of a Llama-style decoder: attention (with grouped KV heads), SwiGLU MLP,
    norms, embeddings and (unless tied) the LM head."""
    attention = hidden * hidden * (2 + 2 * kv_heads_ratio)
    mlp = 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if tied else 2)
    return int(layers * (attention + mlp + 2 * hidden) + embeddings + hidden)


def _known(
    name: str,
    hidden: int,
    layers: int,
    intermediate: int,
    vocab: int,
    kv_heads_ratio: float,
    *,
    tied: bool = False,
) -> tuple[str, ModelShape]:
    parameters = _llama_like(hidden, layers, intermediate, vocab, kv_heads_ratio, tied=tied)
    return name, ModelShape(
        parameters, hidden, layers, intermediate, vocab, kv_heads_ratio, f"known model {name}"
    )


# Well-known open models, matched anywhere in the model name (lower case). Longer keys first, so
# "llama-3.1-70b" is not taken for "llama-3.1-7".
KNOWN_MODELS: dict[str, ModelShape] = dict(
    sorted(
        [
            _known("llama-3.2-1b", 2048, 16, 8192, 128256, 0.25, tied=True),
            _known("llama-3.2-3b", 3072, 28, 8192, 128256, 1 / 3, tied=True),
            _known("llama-3.1-8b", 4096, 32, 14336, 128256, 0.25),
            _known("llama-3-8b", 4096, 32, 14336, 128256, 0.25),
            _known("llama-3.1-70b", 8192, 80, 28672, 128256, 0.125),
            _known("llama-3.3-70b", 8192, 80, 28672, 128256, 0.125),
            _known("llama-3-70b", 8192, 80, 28672, 128256, 0.125),
            _known("llama-3.1-405b", 16384, 126, 53248, 128256, 0.0625),
            _known("qwen2.5-0.5b", 896, 24, 4864, 151936, 1 / 7, tied=True),
            _known("qwen2.5-1.5b", 1536, 28, 8960, 151936, 1 / 6, tied=True),
            _known("qwen2.5-7b", 3584, 28, 18944, 152064, 1 / 7),
            _known("qwen2.5-14b", 5120, 48, 13824, 152064, 0.2),
            _known("qwen2.5-32b", 5120, 64, 27648, 152064, 0.2),
            _known("qwen2.5-72b", 8192, 80, 29568, 152064, 0.125),
            _known("mistral-7b", 4096, 32, 14336, 32768, 0.25),
            _known("gemma-2-9b", 3584, 42, 14336, 256000, 0.5, tied=True),
            _known("gemma-2-27b", 4608, 46, 36864, 256000, 0.5, tied=True),
        ],
        key=lambda item: -len(item[0]),
    )
)

# GPU memory by the product a node label names. GPU feature discovery's nvidia.com/gpu.product
# and GKE's accelerator label carry the size ("...-80GB..."); cloud instance types do not.
GPU_LABELS = (
    "nvidia.com/gpu.product",
    "cloud.google.com/gke-accelerator",
    "node.kubernetes.io/instance-type",
)
INSTANCE_GPU_MEMORY = {
    "p4d.24xlarge": 40 * GIB,
    "p4de.24xlarge": 80 * GIB,
    "p5.48xlarge": 80 * GIB,
    "p5e.48xlarge": 141 * GIB,
    "p5en.48xlarge": 141 * GIB,
    "a3-highgpu-8g": 80 * GIB,
    "a3-megagpu-8g": 80 * GIB,
    "a2-highgpu-8g": 40 * GIB,
    "a2-ultragpu-8g": 80 * GIB,
    "standard_nd96isr_h100_v5": 80 * GIB,
    "standard_nd96amsr_a100_v4": 80 * GIB,
}
_GB_IN_LABEL = re.compile(r"(\d+)\s*gb", re.IGNORECASE)


@dataclass(frozen=True)
class GpuMemory:
    bytes: int
    source: str
    assumed: bool = False


def model_shape(spec: DPOJobSpec) -> ModelShape | None:
    """The model's size: the spec's parameter count, a builtin preset, or a known model."""
    name = spec.model.name
    if name.startswith(BUILTIN_PREFIX):
        preset = MODEL_PRESETS.get(name.removeprefix(BUILTIN_PREFIX))
        if preset is None:
            return None
        hidden, layers = preset["hidden_size"], preset["num_hidden_layers"]
        ratio = preset["num_key_value_heads"] / preset["num_attention_heads"]
        parameters = _llama_like(
            hidden, layers, preset["intermediate_size"], len(VOCABULARY), ratio
        )
        return ModelShape(
            parameters, hidden, layers, preset["intermediate_size"], len(VOCABULARY), ratio, name
        )
    lowered = name.lower()
    known = next((shape for key, shape in KNOWN_MODELS.items() if key in lowered), None)
    if spec.model.parameters is None:
        return known
    parameters = parse_parameter_count(spec.model.parameters)
    # The layer shape of the known model nearest in size: activations scale with it.
    like = known or min(KNOWN_MODELS.values(), key=lambda s: abs(s.parameters - parameters))
    return ModelShape(
        parameters,
        like.hidden,
        like.layers,
        like.intermediate,
        like.vocab,
        like.kv_ratio,
        f"spec.model.parameters ({spec.model.parameters})",
    )


def gpu_memory(spec: DPOJobSpec) -> GpuMemory | None:
    """Memory of one GPU: the spec's, or the product a node-selector label names."""
    if spec.resources.gpus_per_node == 0:
        return None
    if spec.resources.gpu_memory is not None:
        given = parse_quantity(spec.resources.gpu_memory)
        return GpuMemory(given, f"resources.gpuMemory ({spec.resources.gpu_memory})")
    for label in GPU_LABELS:
        value = spec.scheduling.node_selector.get(label)
        if value is None:
            continue
        match = _GB_IN_LABEL.search(value)
        size = INSTANCE_GPU_MEMORY.get(value.lower())
        if size is None and match is not None:
            size = int(match.group(1)) * GIB
        if size is not None:
            return GpuMemory(size, f"node label {label}={value}")
    return GpuMemory(ASSUMED_GPU_MEMORY, "assumed: set resources.gpuMemory", assumed=True)
