"""The memory plan: the bytes each GPU holds for a DPOJob, by part, under each strategy that could
run it; the cheapest strategy that fits; and the GPUs the eval gate needs to hold the model.

Pure: everything comes from the spec. The model's size comes from `spec.model.parameters`, the
builtin presets, or a table of well-known models (matched in the model name, also inside a
storage URI such as s3://bucket/llama-3.3-70b-sft); GPU memory from `spec.resources.gpuMemory`
or a GPU product named by a node label in `spec.scheduling.nodeSelector`.

The estimates follow what the trainer does, per GPU, with N parameters sharded S ways:
- full fine-tune, replicated (ddp): bf16 weights, gradients and AdamW moments, 8 B/param;
- full fine-tune, sharded (fsdp/hsdp): accelerate keeps fp32 master weights for FSDP2 mixed
  precision, so 16 B/param / S, plus two gathered bf16 layers in flight;
- LoRA: frozen bf16 base, 2 B/param (/ S when sharded), and fp32 adapter weights, gradients and
  moments, 16 B per adapter parameter;
- reference: none with LoRA (the base with the adapter disabled), with SimPO, or when
  precomputed; otherwise a bf16 copy, sharded like the policy under fsdp/hsdp;
- activations of one micro-batch (chosen and rejected: 2 x batch sequences of maxLength), with
  one saved layer input per layer under activation checkpointing; TRL projects the LM head in
  tiles, so the logits never exist whole;
- 3 GiB for the CUDA context, NCCL buffers and allocator slack.
A plan fits when the total is at most 90% of the GPU's memory.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Literal

from dpo_trainer.config import SIMPO, Strategy
from dpo_trainer.presets import BUILTIN_PREFIX, MODEL_PRESETS, VOCABULARY

from dpo_operator.api import DPOJobSpec, parse_parameter_count, parse_quantity

GIB = 1 << 30
RUNTIME_BYTES = 3 * GIB
USABLE_FRACTION = 0.9
ASSUMED_GPU_MEMORY = 80 * GIB
# The gate scores this many pairs at once (dpo_trainer.evaluate.BATCH_SIZE).
EVAL_BATCH = 16


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


@dataclass(frozen=True)
class Layout:
    """One way to spread the job: a strategy and how many GPUs share one copy of the model."""

    strategy: Strategy
    shard: int

    def describe(self, world: int, gpus_per_node: int) -> str:
        if self.strategy in ("single", "ddp"):
            return self.strategy
        if self.strategy == "fsdp":
            return f"fsdp {self.shard}"
        return f"hsdp {world // self.shard}x{self.shard}"


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    parts: dict[str, int]
    budget: int

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


@dataclass(frozen=True)
class Plan:
    """The estimates of every layout considered, and the one to run."""

    shape: ModelShape | None
    gpu: GpuMemory | None
    estimates: list[Estimate] = field(default_factory=list)
    choice: Layout | None = None
    reason: str = ""
    problems: list[str] = field(default_factory=list)
    eval_gpus: int = 0
    eval_memory: int | None = None
    host_memory: int | None = None


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


def layouts(spec: DPOJobSpec) -> list[Layout]:
    """The layouts the spec's strategy allows, cheapest in communication first."""
    nodes, gpus = spec.resources.nodes, spec.resources.gpus_per_node
    world = nodes * max(gpus, 1)
    wanted = spec.parallelism.strategy
    if world == 1:
        return [Layout("single", 1)]
    hsdp = [
        Layout("hsdp", group * gpus)
        for group in range(1, nodes)
        if nodes % group == 0 and group * gpus > 1
    ]
    candidates = {
        "ddp": [Layout("ddp", 1)],
        "fsdp": [Layout("fsdp", world)],
        "hsdp": hsdp,
        "auto": [Layout("ddp", 1), *hsdp, Layout("fsdp", world)],
    }[wanted]
    if gpus == 0 and wanted == "auto":
        return [Layout("ddp", 1)]  # CPU pods: one process each, replicated over gloo
    return candidates


def estimate(
    spec: DPOJobSpec, shape: ModelShape, layout: Layout, budget: int, *, dtype_bytes: int = 2
) -> Estimate:
    """Bytes on each GPU, by part, for `layout`; `dtype_bytes` is the width of the loaded
    weights (2 for bf16 on GPUs, 4 for fp32 on CPUs)."""
    n, w = shape.parameters, dtype_bytes
    shard = layout.shard
    sharded = layout.strategy in ("fsdp", "hsdp")
    lora = spec.peft.enabled
    adapter = lora_parameters(spec, shape) if lora else 0
    offload = sharded and spec.parallelism.cpu_offload
    on_gpu = 0 if offload else 1
    if lora:
        weights = (w * n + 4 * adapter) // shard
        gradients = 4 * adapter // shard
        optimizer = 8 * adapter // shard
    elif sharded:
        weights, gradients, optimizer = 4 * n // shard, 4 * n // shard, 8 * n // shard
    else:
        weights, gradients, optimizer = w * n, w * n, 2 * w * n
    parts = {
        "weights": weights * on_gpu,
        "gradients": gradients * on_gpu,
        "optimizer": optimizer * on_gpu,
        "gathered layers": 2 * w * n // shape.layers if sharded else 0,
        "reference": w * reference_parameters(spec, shape) // shard,
        "activations": activation_bytes(spec, shape, w),
        "runtime": RUNTIME_BYTES,
    }
    return Estimate(layout, parts, budget)


def lora_parameters(spec: DPOJobSpec, shape: ModelShape) -> int:
    """Adapter parameters: r x (inputs + outputs) of each adapted linear layer."""
    h, i, layers = shape.hidden, shape.intermediate, shape.layers
    kv = int(h * shape.kv_ratio)
    linears = {
        "q_proj": 2 * h,
        "k_proj": h + kv,
        "v_proj": h + kv,
        "o_proj": 2 * h,
        "gate_proj": h + i,
        "up_proj": h + i,
        "down_proj": h + i,
    }
    targets = spec.peft.target_modules
    adapted = (
        sum(linears.values())
        if targets == ["all-linear"]
        else (sum(size for name, size in linears.items() if name in targets))
    )
    return spec.peft.r * adapted * layers


def reference_parameters(spec: DPOJobSpec, shape: ModelShape) -> int:
    """Parameters of the frozen reference held while training (before sharding): a copy of the
    model, or none."""
    if SIMPO in spec.dpo.loss_type or spec.dpo.precompute_ref_log_probs:
        return 0
    if spec.peft.enabled and spec.model.reference is None:
        return 0  # the base with the adapter disabled
    return shape.parameters


def activation_bytes(spec: DPOJobSpec, shape: ModelShape, dtype_bytes: int = 2) -> int:
    """One micro-batch of chosen and rejected sequences."""
    tokens = 2 * spec.dpo.per_device_batch_size * spec.dpo.max_length
    per_layer = dtype_bytes * (10 * shape.hidden + 3 * shape.intermediate)
    if spec.parallelism.activation_checkpointing:
        return tokens * (shape.layers * dtype_bytes * shape.hidden + per_layer)
    return tokens * shape.layers * per_layer


def plan(spec: DPOJobSpec) -> Plan:
    """Estimate every allowed layout and choose the first that fits."""
    shape = model_shape(spec)
    gpu = gpu_memory(spec)
    if gpu is None:
        return Plan(shape, None, choice=layouts(spec)[0], reason="CPU pods: ddp over gloo")
    if shape is None:
        return Plan(
            None,
            gpu,
            choice=_without_size(spec),
            reason="the model's size is unknown (set spec.model.parameters, e.g. 70B): chosen "
            "by rule, not by memory",
        )
    budget = int(gpu.bytes * USABLE_FRACTION)
    estimates = [estimate(spec, shape, layout, budget) for layout in layouts(spec)]
    eval_gpus, eval_memory, eval_problem = _gate(spec, shape, gpu)
    result = Plan(
        shape,
        gpu,
        estimates,
        eval_gpus=eval_gpus,
        eval_memory=eval_memory,
        host_memory=max(spec.resources.gpus_per_node, 1) * 2 * shape.parameters,
    )
    fitting = next((e for e in estimates if e.fits), None)
    if fitting is not None:
        rejected = estimates[: estimates.index(fitting)]
        why = "; ".join(
            f"{e.layout.describe(_world(spec), spec.resources.gpus_per_node)} needs "
            f"{e.total / GIB:.1f} GiB"
            for e in rejected
        )
        result = replace(
            result,
            choice=fitting.layout,
            reason=f"the first that fits {budget / GIB:.1f} GiB per GPU"
            + (f" ({why})" if why else ""),
        )
    elif gpu.assumed:
        result = replace(
            result,
            choice=estimates[-1].layout,
            reason="fits nowhere at the assumed 80 GiB per GPU: set resources.gpuMemory",
        )
    else:
        result = replace(result, problems=[_fits_nowhere(spec, shape, gpu, estimates)])
    if eval_problem and not gpu.assumed:
        result = replace(result, problems=[*result.problems, eval_problem])
    return result


def _world(spec: DPOJobSpec) -> int:
    return spec.resources.nodes * max(spec.resources.gpus_per_node, 1)


def _without_size(spec: DPOJobSpec) -> Layout:
    """Without a size, the rule of thumb: LoRA replicates, a full fine-tune shards."""
    candidates = layouts(spec)
    if len(candidates) == 1:
        return candidates[0]
    if spec.peft.enabled:
        return next((c for c in candidates if c.strategy == "ddp"), candidates[0])
    within_a_node = spec.resources.gpus_per_node
    return next(
        (c for c in candidates if c.strategy == "hsdp" and c.shard == within_a_node),
        candidates[-1],
    )


def _gate(spec: DPOJobSpec, shape: ModelShape, gpu: GpuMemory) -> tuple[int, int, str | None]:
    """GPUs and host memory for the eval Job: it holds the bf16 policy (then the reference) and
    scores EVAL_BATCH pairs at once, spread over as many GPUs as the weights need."""
    weights = 2 * shape.parameters
    tokens = 2 * EVAL_BATCH * spec.dpo.max_length
    need = weights + tokens * 2 * (10 * shape.hidden + 3 * shape.intermediate) + RUNTIME_BYTES
    gpus = max(1, math.ceil(need / (gpu.bytes * USABLE_FRACTION)))
    memory = _round_up_gib(weights * 1.25 + 8 * GIB)
    problem = None
    if gpus > spec.resources.gpus_per_node:
        problem = (
            f"evalGate: holding the {shape.parameters / 1e9:.1f}B-parameter model in bf16 "
            f"({weights / GIB:.0f} GiB) takes {gpus} GPUs of {gpu.bytes / GIB:.0f} GiB, more than "
            f"one node's {spec.resources.gpus_per_node}; use nodes with more or larger GPUs "
            "(resources.gpusPerNode, resources.gpuMemory)"
        )
    return min(gpus, max(spec.resources.gpus_per_node, 1)), memory, problem


def _round_up_gib(size: float) -> int:
    return math.ceil(size / GIB) * GIB


def _fits_nowhere(
    spec: DPOJobSpec, shape: ModelShape, gpu: GpuMemory, estimates: list[Estimate]
) -> str:
    smallest = min(estimates, key=lambda e: e.total)
    kind = "LoRA" if spec.peft.enabled else "full fine-tune"
    fixes = []
    # Sharded states shrink with more GPUs; find the node count at which they would fit.
    per_gpu_fixed = (
        smallest.parts["activations"]
        + smallest.parts["runtime"]
        + smallest.parts["gathered layers"]
    )
    sharded_total = (
        sum(smallest.parts[p] for p in ("weights", "gradients", "optimizer", "reference"))
        * smallest.layout.shard
    )
    room = smallest.budget - per_gpu_fixed
    if room > 0 and spec.resources.gpus_per_node > 0:
        gpus_needed = math.ceil(sharded_total / room)
        nodes_needed = math.ceil(gpus_needed / spec.resources.gpus_per_node)
        if nodes_needed > spec.resources.nodes:
            fixes.append(
                f"at least {nodes_needed} nodes (resources.nodes: {nodes_needed}) with "
                "parallelism.strategy auto or fsdp"
            )
    if not spec.peft.enabled:
        fixes.append("LoRA (peft.enabled: true)")
    if smallest.parts["reference"]:
        fixes.append("dpo.precomputeRefLogProbs: true (no reference copy while training)")
    if not spec.parallelism.cpu_offload:
        fixes.append("parallelism.cpuOffload: true")
    if not spec.parallelism.activation_checkpointing:
        fixes.append("parallelism.activationCheckpointing: true")
    if smallest.parts["activations"] > smallest.budget // 4:
        fixes.append("a smaller dpo.perDeviceBatchSize or dpo.maxLength")
    described = smallest.layout.describe(_world(spec), spec.resources.gpus_per_node)
    return (
        f"resources: this {shape.parameters / 1e9:.1f}B-parameter {kind} fits on no strategy "
        f"with {spec.resources.nodes} node(s) x {spec.resources.gpus_per_node} GPUs of "
        f"{gpu.bytes / GIB:.0f} GiB ({gpu.source}): the smallest, {described}, needs "
        f"{smallest.total / GIB:.1f} GiB per GPU of {smallest.budget / GIB:.1f} usable; use "
        + ", or ".join(fixes)
        + " (`dpo plan` shows every part)"
    )


Part = Literal[
    "weights", "gradients", "optimizer", "gathered layers", "reference", "activations", "runtime"
]
PARTS: tuple[Part, ...] = (
    "weights",
    "gradients",
    "optimizer",
    "gathered layers",
    "reference",
    "activations",
    "runtime",
)


def format_plan(spec: DPOJobSpec, result: Plan) -> str:
    """The table `dpo plan` prints: per-GPU GiB by part for each layout, the choice and why."""
    lines = []
    world = _world(spec)
    gpus = spec.resources.gpus_per_node
    if result.shape is not None:
        lines.append(
            f"model      {result.shape.parameters / 1e9:.2f}B parameters ({result.shape.source}); "
            + ("LoRA r=" + str(spec.peft.r) if spec.peft.enabled else "full fine-tune")
        )
    else:
        lines.append("model      size unknown: set spec.model.parameters (e.g. 70B) to plan memory")
    if result.gpu is not None:
        lines.append(
            f"hardware   {spec.resources.nodes} node(s) x {gpus} GPUs of "
            f"{result.gpu.bytes / GIB:.0f} GiB ({result.gpu.source})"
        )
    else:
        lines.append(f"hardware   {spec.resources.nodes} CPU pod(s)")
    if result.estimates:
        headers = [e.layout.describe(world, gpus) for e in result.estimates]
        width = max(12, *(len(h) + 2 for h in headers))
        lines.append("")
        lines.append(
            "layouts    ddp: a copy per GPU; fsdp S: sharded over S GPUs; hsdp RxS: R copies,"
        )
        lines.append("           each sharded over S GPUs")
        lines.append("GiB per GPU".ljust(18) + "".join(h.rjust(width) for h in headers))
        for part in PARTS:
            lines.append(
                f"  {part}".ljust(18)
                + "".join(f"{e.parts[part] / GIB:.2f}".rjust(width) for e in result.estimates)
            )
        lines.append(
            "  total".ljust(18)
            + "".join(f"{e.total / GIB:.2f}".rjust(width) for e in result.estimates)
        )
        lines.append(
            f"  fits (<= {result.estimates[0].budget / GIB:.1f})".ljust(18)
            + "".join(("yes" if e.fits else "no").rjust(width) for e in result.estimates)
        )
        lines.append("")
    if result.choice is not None:
        lines.append(f"choice     {result.choice.describe(world, gpus)}: {result.reason}")
    if result.eval_gpus and result.eval_memory:
        lines.append(
            f"eval gate  {result.eval_gpus} GPU(s), {result.eval_memory // GIB}Gi memory (the bf16 "
            "weights spread over the GPUs)"
        )
    if result.host_memory is not None:
        lines.append(
            f"host       each pod's processes read the bf16 weights when loading: up to "
            f"{result.host_memory / GIB:.0f} GiB"
        )
    lines += [f"problem    {problem}" for problem in result.problems]
    return "\n".join(lines)
