"""The memory plan: the bytes each GPU holds for a DPOJob, by part, under each strategy that could
run it; the cheapest strategy that fits; and the GPUs the eval gate needs to hold the model.

Pure: everything comes from the spec. The model's size comes from `spec.model.parameters`, the
builtin presets, or a table of well-known models (matched in the model name, also inside a
storage URI such as s3://bucket/llama-3.3-70b-sft); GPU memory from `spec.resources.gpuMemory`
or a GPU product named by a node label in `spec.scheduling.nodeSelector`.

The estimates follow what the trainer does, per GPU, with N parameters sharded S ways:
- full fine-tune, replicated (ddp): bf16 weights, gradients and AdamW moments, 8 B/param;
- full fine-tune, sharded (fsdp/hsdp): fp32 master weights, gradients and AdamW moments,
  16 B/param / S (gradients stay sharded under accumulation: each micro-batch reduce-scatters),
  plus three gathered bf16 layers in flight (see GATHERED_LAYERS) and one layer's gradients
  reduced in fp32;
- LoRA: frozen bf16 base, 2 B/param (/ S when sharded), and fp32 adapter weights, gradients and
  moments, 16 B per adapter parameter;
- reference: none with LoRA (the base with the adapter disabled), with SimPO, or when
  precomputed; otherwise a bf16 copy, sharded per layer like the policy under fsdp/hsdp (its
  forward, before the policy's backward, gathers fewer layers than that backward does);
- activations of one micro-batch (chosen and rejected: 2 x batch sequences of maxLength), with
  one saved layer input per layer under activation checkpointing; TRL projects the LM head in
  tiles, so the logits never exist whole;
- 3 GiB for the CUDA context, NCCL buffers and allocator slack.
A plan fits when the total is at most 90% of the GPU's memory.

Host memory per pod at load: under fsdp/hsdp each process reads only its slice of each tensor
(a transient buffer of one slice) into its GPU, so a pod needs its processes' own memory plus
what `cpuOffload` keeps there; otherwise every process reads the whole bf16 model (and a
separate reference) into host memory first. It is checked against `resources.memory`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from dpo_contract.config import Strategy
from dpo_contract.fields import SIMPO

from dpo_operator.api import DPOJobSpec
from dpo_operator.api.grammar import parse_quantity
from dpo_operator.core.plan.shapes import (
    GIB,
    RUNTIME_BYTES,
    USABLE_FRACTION,
    GpuMemory,
    ModelShape,
    gpu_memory,
    model_shape,
)

EVAL_BATCH = 16
Device = Literal["cuda", "cpu"]
# The width of the loaded weights: bf16 on GPUs, fp32 on CPUs.
WEIGHT_BYTES: dict[Device, int] = {"cuda": 2, "cpu": 4}
# Layers gathered at once under FSDP2: in the backward pass one layer computes while the next is
# prefetched, and a gather lands in one buffer that is then copied into the layer's parameters.
# Gloo (CPU) stages each all-gather's output in one more buffer of its own.
GATHERED_LAYERS: dict[Device, int] = {"cuda": 3, "cpu": 4}
# A training process's own host memory: Python, torch, CUDA's host side, NCCL, the data.
HOST_PROCESS_BYTES = 4 * GIB


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
    host_model_memory: int | None = None


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
    spec: DPOJobSpec, shape: ModelShape, layout: Layout, budget: int, *, device: Device = "cuda"
) -> Estimate:
    """Bytes on each GPU (or, with `device` cpu, each CPU process over gloo), by part, for
    `layout`."""
    n, w = shape.parameters, WEIGHT_BYTES[device]
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
    reference = reference_parameters(spec, shape)
    gathered = GATHERED_LAYERS[device] * n * w // shape.layers if sharded else 0
    parts = {
        "weights": weights * on_gpu,
        "gradients": gradients * on_gpu,
        "optimizer": optimizer * on_gpu,
        "gathered layers": gathered,
        "reduce buffers": 4 * (adapter if lora else n) // shape.layers if sharded else 0,
        "reference": w * reference // shard,
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


def plan(
    spec: DPOJobSpec,
    model_config: Mapping[str, Any] | None = None,
    shape: ModelShape | None = None,
) -> Plan:
    """Estimate every allowed layout and choose the first that fits; the model initializer's
    `shape`, or `model_config` (the model's config.json), makes the model's size exact."""
    shape = shape or model_shape(spec, model_config)
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
    )
    fitting = next((e for e in estimates if e.fits), None)
    chosen_or_smallest = fitting or min(estimates, key=lambda e: e.total)
    model_part = host_model_memory(spec, shape, chosen_or_smallest)
    processes = max(spec.resources.gpus_per_node, 1)
    result = replace(
        result,
        host_memory=model_part + processes * HOST_PROCESS_BYTES,
        host_model_memory=model_part,
    )
    if fitting is not None:
        rejected = estimates[: estimates.index(fitting)]
        why = "; ".join(
            f"{e.layout.describe(world_size_of(spec), spec.resources.gpus_per_node)} needs "
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
    host_problem = _host_problem(spec, result)
    if host_problem:
        result = replace(result, problems=[*result.problems, host_problem])
    return result


def host_model_memory(spec: DPOJobSpec, shape: ModelShape, chosen: Estimate) -> int:
    """What the model puts in one pod's host memory while its processes load it (see the module
    docstring), for the chosen layout; the processes' own memory comes on top."""
    processes = max(spec.resources.gpus_per_node, 1)
    if chosen.layout.strategy in ("fsdp", "hsdp"):
        slice_buffer = 4 * shape.largest_tensor // chosen.layout.shard
        offloaded = _offloaded(spec, shape, chosen.layout) if spec.parallelism.cpu_offload else 0
        return processes * (slice_buffer + offloaded)
    copies = 1 + (1 if reference_parameters(spec, shape) else 0)
    return processes * 2 * shape.parameters * copies


def _offloaded(spec: DPOJobSpec, shape: ModelShape, layout: Layout) -> int:
    """What cpuOffload keeps in host memory per process: the sharded states."""
    on_gpu = spec.parallelism.model_copy(update={"cpu_offload": False})
    parts = estimate(spec.model_copy(update={"parallelism": on_gpu}), shape, layout, 0).parts
    return sum(parts[p] for p in ("weights", "gradients", "optimizer"))


def _host_problem(spec: DPOJobSpec, result: Plan) -> str | None:
    """A pod whose processes cannot load the model within `resources.memory`. Only the model's
    part is held against it: the processes' own memory is an estimate, the model's is not."""
    if result.host_model_memory is None or spec.resources.memory is None:
        return None
    asked = parse_quantity(spec.resources.memory)
    if result.host_model_memory <= asked:
        return None
    need = math.ceil((result.host_memory or result.host_model_memory) / GIB)
    sharded = result.choice is not None and result.choice.strategy in ("fsdp", "hsdp")
    fix = (
        "or turn parallelism.cpuOffload off (the sharded states then stay on the GPUs)"
        if sharded
        else "or shard the model (parallelism.strategy fsdp or hsdp: each process then reads "
        "only its slice of the weights)"
    )
    return (
        f"resources.memory: each pod's processes put "
        f"{result.host_model_memory / GIB:.0f} GiB of the model in host memory while loading it "
        f"(about {need} GiB with their own), more than the {spec.resources.memory} asked; raise "
        f"resources.memory to at least {need}Gi, {fix} (`dpo plan` shows the figure)"
    )


def world_size_of(spec: DPOJobSpec) -> int:
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
    described = smallest.layout.describe(world_size_of(spec), spec.resources.gpus_per_node)
    return (
        f"resources: this {shape.parameters / 1e9:.1f}B-parameter {kind} fits on no strategy "
        f"with {spec.resources.nodes} node(s) x {spec.resources.gpus_per_node} GPUs of "
        f"{gpu.bytes / GIB:.0f} GiB ({gpu.source}): the smallest, {described}, needs "
        f"{smallest.total / GIB:.1f} GiB per GPU of {smallest.budget / GIB:.1f} usable; use "
        + ", or ".join(fixes)
        + " (`dpo plan` shows every part)"
    )


Part = Literal[
    "weights",
    "gradients",
    "optimizer",
    "gathered layers",
    "reduce buffers",
    "reference",
    "activations",
    "runtime",
]
PARTS: tuple[Part, ...] = get_args(Part)  # in the order `dpo plan` prints them
