"""`dpo plan`'s table: the bytes per GPU by part for each layout, and the one chosen."""

from __future__ import annotations

from dpo_contract.reports import ModelReport

from dpo_operator.api import DPOJobSpec, ModelStatus, PlanStatus
from dpo_operator.core.plan.compute import describe_compute, estimate_compute
from dpo_operator.core.plan.memory import PARTS, Plan, world_size_of
from dpo_operator.core.plan.shapes import GIB, ModelShape, counted_shape
from dpo_operator.core.plan.transfer import training_disk, transfer_timeout_seconds


def format_plan(spec: DPOJobSpec, result: Plan) -> str:
    """The table `dpo plan` prints: per-GPU GiB by part for each layout, the choice and why."""
    lines = []
    world = world_size_of(spec)
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
            f"host       each pod holds up to {result.host_memory / GIB:.0f} GiB while its "
            "processes load the model"
            + (
                " (each reads only its slice of the weights)"
                if result.choice is not None and result.choice.strategy in ("fsdp", "hsdp")
                else " (each reads the whole bf16 weights)"
            )
        )
    if result.choice is not None:
        strategy = result.choice.strategy
        disk = training_disk(spec, result.shape, strategy)
        lines.append(
            f"disk       each training pod asks for {disk} of local disk (/tmp: the model's "
            "download, checkpoints staged for the object store, its part of the export)"
        )
        lines.append(
            f"timeouts   training steps {spec.network.collective_timeout_seconds} s; startup "
            f"and the end {transfer_timeout_seconds(spec, result.shape, strategy)} s"
        )
    if result.shape is not None:
        lines += describe_compute(estimate_compute(spec, result.shape))
    lines += [f"problem    {problem}" for problem in result.problems]
    return "\n".join(lines)


def plan_status(spec: DPOJobSpec, result: Plan, disk: str) -> PlanStatus:
    """The plan in short, for `status.plan`: the chosen layout and what it asks of each GPU,
    each pod's host memory and disk."""
    world = world_size_of(spec)
    chosen = next((e for e in result.estimates if e.layout == result.choice), None)
    shape = result.shape
    compute = estimate_compute(spec, shape) if shape is not None else None
    return PlanStatus(
        layout=result.choice.describe(world, spec.resources.gpus_per_node)
        if result.choice
        else "single",
        parameters=shape.parameters if shape else None,
        model_source=shape.source[:256] if shape else None,
        gpu_memory=f"{chosen.total / GIB:.1f}Gi" if chosen else None,
        gpu_budget=f"{chosen.budget / GIB:.1f}Gi" if chosen else None,
        host_memory=f"{result.host_memory / GIB:.0f}Gi" if result.host_memory else None,
        disk=disk,
        seconds_per_step=round(compute.seconds_per_step, 3)
        if compute is not None and compute.seconds_per_step is not None
        else None,
    )


# What status.model keeps of a ModelShape, under the same names.
_SHAPE_FIELDS = (
    "parameters",
    "active_parameters",
    "hidden",
    "layers",
    "intermediate",
    "vocab",
    "kv_ratio",
)


def model_status(report: ModelReport) -> ModelStatus:
    """`status.model` from the initializer's report: its exact count, the layers its config
    describes."""
    shape = counted_shape(report.config, report.parameters, report.largest_tensor)
    return ModelStatus(
        name=report.name,
        revision=report.revision,
        largest_tensor=report.largest_tensor,
        dtype=report.dtype,
        bytes_on_disk=report.bytes_on_disk,
        staged=report.staged,
        **{field: getattr(shape, field) for field in _SHAPE_FIELDS},
    )


def status_shape(model: ModelStatus) -> ModelShape:
    """The shape `status.model` recorded, for planning."""
    where = f"{model.name}@{model.revision}" if model.revision else model.name
    return ModelShape(
        source=f"counted by the initializer: {where}",
        largest_weight=model.largest_tensor,
        **{field: getattr(model, field) for field in _SHAPE_FIELDS},
    )
