"""What the planner knows of the hardware and the model: GPU memory (from the spec or a node label)
and the model's shape (from its config.json, exactly; the builtin presets; well-known models'
shipped configs matched in the model name, also inside a storage URI such as
s3://bucket/llama-3.3-70b-sft; or spec.model.parameters).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from dpo_contract.presets import BUILTIN_PREFIX, MODEL_PRESETS, VOCABULARY

from dpo_operator.api import DPOJobSpec, parse_parameter_count, parse_quantity
from dpo_operator.core.plan.configs import (
    UnknownArchitectureError,
    count_config,
    known_configs,
)

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
    intermediate: int  # the MLP width a token goes through (its experts' together, for MoE)
    vocab: int
    kv_ratio: float = 1.0  # key/value width over hidden width (grouped-query attention)
    source: str = ""
    largest_weight: int | None = None
    active_parameters: int | None = None  # per token, for mixtures of experts

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest weight: the embeddings, an MLP projection, or a layer's
        experts kept in one tensor."""
        if self.largest_weight is not None:
            return self.largest_weight
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)


def shape_of(config: Mapping[str, Any], source: str) -> ModelShape:
    """The shape a config.json describes (`configs.count_config`: exact, MoE experts included)."""
    count = count_config(config)
    return ModelShape(
        parameters=count.parameters,
        hidden=count.hidden,
        layers=count.layers,
        intermediate=count.intermediate,
        vocab=count.vocab,
        kv_ratio=count.kv_ratio,
        source=source,
        largest_weight=count.largest_tensor,
        active_parameters=count.active_parameters,
    )


def _llama_like(hidden: int, layers: int, intermediate: int, vocab: int, kv_ratio: float) -> int:
    """Parameter count of a Llama-style decoder with untied embeddings (the builtin presets)."""
    attention = hidden * hidden * (2 + 2 * kv_ratio)
    mlp = 3 * hidden * intermediate
    return int(layers * (attention + mlp + 2 * hidden) + 2 * vocab * hidden + hidden)


# Well-known open models, from the configs shipped with the operator, matched anywhere in the
# model name (lower case), longest name first.
KNOWN_MODELS: dict[str, ModelShape] = {
    name: shape_of(config, f"known model {name}") for name, config in known_configs().items()
}

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


def model_shape(spec: DPOJobSpec, config: Mapping[str, Any] | None = None) -> ModelShape | None:
    """The model's size: from its config.json when given (exact), a builtin preset, a known
    model, or the spec's parameter count."""
    if config is not None:
        return shape_of(config, "the model's config.json")
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


def counted_shape(config: Mapping[str, Any], parameters: int, largest_tensor: int) -> ModelShape:
    """The shape of a model the initializer counted on the meta device (`parameters`,
    `largest_tensor`: exact for any architecture) with its layers from config.json: counted
    where the planner knows the architecture, else read from the usual keys, else those of the
    known model nearest in size (activations scale with them)."""
    try:
        shape = shape_of(config, "the initializer's count")
        return replace(shape, parameters=parameters, largest_weight=largest_tensor)
    except (UnknownArchitectureError, KeyError, TypeError, ValueError, ZeroDivisionError):
        pass
    like = min(KNOWN_MODELS.values(), key=lambda s: abs(s.parameters - parameters))
    hidden = _positive(config, "hidden_size") or like.hidden
    heads = _positive(config, "num_attention_heads")
    kv_heads = _positive(config, "num_key_value_heads") or heads
    return ModelShape(
        parameters=parameters,
        hidden=hidden,
        layers=_positive(config, "num_hidden_layers") or like.layers,
        intermediate=_positive(config, "intermediate_size") or like.intermediate,
        vocab=_positive(config, "vocab_size") or like.vocab,
        kv_ratio=kv_heads / heads if heads and kv_heads else like.kv_ratio,
        source="the initializer's count",
        largest_weight=largest_tensor,
    )


def _positive(config: Mapping[str, Any], key: str) -> int | None:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


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
