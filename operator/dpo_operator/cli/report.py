"""The human report: what a finished `dpo run` and `dpo compare` print. One line per gate
criterion, one description of what the trainer ran on, one plotter of reward curves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpo_contract.config import DistributedRun
from dpo_contract.reports import GateCriterion, GateReport, TrainingReport

from dpo_operator.local.executor import LocalRun


def summarize(ran: LocalRun) -> None:
    """Where `dpo run` stopped: phase, training, what ran, health, the gate, the promotion."""
    job, status, say = ran.job, ran.status, ran.say
    say("")
    say(f"DPOJob {job.namespace}/{job.name}: {status.phase}")
    if status.message:
        say(f"  {status.message}")
    if status.phase == "AwaitingApproval":
        say(
            "  promotion is manual: run again with --approve to promote (training is not "
            "repeated; the gate is re-checked)"
        )
    train_report = ran.artifacts_dir / "train.json"
    if train_report.exists():
        summary = TrainingReport.model_validate_json(train_report.read_text())
        metrics = summary.metrics
        say(
            f"training   step {summary.step}  loss {metrics.get('dpo_train_loss', 0):.4f}  "
            f"reward accuracy {metrics.get('dpo_train_reward_accuracy', 0):.3f}  "
            f"margin {metrics.get('dpo_train_reward_margin', 0):.4f}"
        )
        say(f"ran        {describe_distributed_run(summary.distributed)}")
        for signal in summary.health:
            say(f"health     {signal.reason}: {signal.message}")
        if summary.stopped_early is not None:
            stopped = summary.stopped_early
            say(
                f"  stopped early at step {stopped.step} (spec.health.action: stop); the adapter "
                f"is checkpoint-{stopped.kept_step}'s weights"
            )
        plot = plot_curves([("", summary.log_history)], ran.workdir / "rewards.png", REWARD_CURVES)
        if plot:
            say(f"plot       {plot}")
    gate_report = ran.artifacts_dir / "eval.json"
    if status.evaluation is not None and gate_report.exists():
        gate = GateReport.model_validate_json(gate_report.read_text())
        say(f"gate       {gate.verdict}")
        if gate.held_out is not None:
            held = gate.held_out
            say(
                f"  on {held.pairs} pairs ({held.prompts} prompts) held out of {held.source}: "
                f"{held.fraction:.0%} of its prompts, at most {held.max_pairs} pairs"
            )
        for criterion in gate.criteria:
            say(f"  {describe_criterion(criterion, gate.confidence)}")
        if gate.message:
            say(f"  {gate.message}")
    if status.promotion is not None:
        say(f"promoted   {status.promotion.version} -> {status.promotion.uri}")
        if status.promotion.vllm_serve:
            say(f"serve      {status.promotion.vllm_serve}")
            say(f"  or load  {status.promotion.vllm_load_request}")
    say(f"artifacts  {ran.artifacts_dir}")


def describe_distributed_run(ran: DistributedRun) -> str:
    """One line from train.json's `distributed`: what the trainer really ran on."""
    kind = ran.distributed_type
    if kind == "FSDP":
        shape = ran.mesh_shape or []
        mesh = "x".join(str(size) for size in shape)
        over = (
            f"a {mesh} mesh ({', '.join(ran.mesh_dims or [])})"
            if len(shape) > 1
            else (f"{mesh} ranks")
        )
        kind = f"FSDP{ran.fsdp_version} sharded over {over}"
    return f"{kind}, world size {ran.world_size}, parameters on {ran.device}"


REWARD_CURVES = (
    ("reward accuracy", "rewards/accuracies"),
    ("reward margin (chosen - rejected)", "rewards/margins"),
)
CURVES = (("loss", "loss"), *REWARD_CURVES)


def plot_curves(
    runs: Sequence[tuple[str, list[dict[str, Any]]]],
    path: Path,
    curves: Sequence[tuple[str, str]] = CURVES,
) -> Path | None:
    """Each run's logged `curves` against steps, one panel each (training solid, held-out
    dashed), as a PNG; None without matplotlib or without any curve. `runs` are (label, log
    history); a lone run may have no label."""
    runs = [(label, history) for label, history in runs if history]
    if not runs:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, panels = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.8), squeeze=False)
    for (title, key), axes in zip(curves, panels[0], strict=True):
        for index, (label, history) in enumerate(runs):
            color = f"C{index % 10}"
            for prefix, style, name in (
                ("", "-", label or "train"),
                ("eval_", "--o", f"{label} held-out".strip()),
            ):
                points = [(e["step"], e[prefix + key]) for e in history if prefix + key in e]
                if points:
                    steps, values = zip(*points, strict=True)
                    axes.plot(steps, values, style, color=color, markersize=3, label=name)
        if key == "rewards/accuracies":
            axes.axhline(0.5, color="grey", linestyle=":", linewidth=1)
            axes.set(ylim=(0, 1.02))
        axes.set(title=title, xlabel="step")
        axes.grid(alpha=0.3)
    panels[0][0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def describe_criterion(criterion: GateCriterion, confidence: float) -> str:
    """One line: name, estimate, its interval and n, threshold, outcome."""
    if criterion.value is None:
        return f"{criterion.name:18s} {'n/a':>9s}  threshold {criterion.threshold:<8} pass"
    interval = (
        f"[{criterion.low:.4f}, {criterion.high:.4f}] {confidence:.0%} {criterion.method}"
        if criterion.low is not None and criterion.high is not None
        else ""
    )
    outcome = "pass" if criterion.passed else "INCONCLUSIVE" if criterion.inconclusive else "FAIL"
    return (
        f"{criterion.name:18s} {criterion.value:>9.4f}  {interval}  n={criterion.n}  "
        f"threshold {criterion.threshold:<8} {outcome}"
    )
