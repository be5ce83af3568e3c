"""What the trainer's commands report in their pods' termination messages, built with the
trainer's own contract models and written as the trainer writes them (dpo_contract), for
tests that play the pods' part."""

from __future__ import annotations

from typing import get_args

from dpo_contract.config import DistributedRun, HealthSignal, JobIdentity, StoppedEarly
from dpo_contract.reports import (
    ArtifactCheck,
    ArtifactCheckName,
    DataReport,
    FabricSummary,
    Failure,
    GateCriterion,
    GateOutcome,
    GateReport,
    GateVerdict,
    ModelReport,
    PromotionResult,
    TrainingSummary,
)
from dpo_contract.sweep import SweepChoice, TrialComparison
from dpo_contract.termination import termination_message_json
from dpo_operator.core.plan.configs import known_configs

ACCURACY = GateCriterion(name="rewardAccuracy", value=0.93, threshold=0.6, passed=True)
GATE_PASSED = termination_message_json(
    GateVerdict(status="passed", verdict="Passed", adapter_digest="sha256:ab", criteria=[ACCURACY])
)
# mustBeatPromoted with nothing promoted yet: a criterion with nothing to measure.
GATE_PASSED_FIRST = termination_message_json(
    GateVerdict(
        status="passed",
        verdict="Passed",
        adapter_digest="sha256:ab",
        criteria=[ACCURACY, GateCriterion(name="beatsPromoted", threshold=0.0, passed=True)],
    )
)
GATE_REJECTED = termination_message_json(
    GateVerdict(
        status="rejected",
        verdict="Rejected",
        adapter_digest="sha256:ab",
        message="gate rejected: rewardAccuracy 0.0312 (needs >= 0.6)",
        criteria=[ACCURACY.model_copy(update={"value": 0.0312, "passed": False})],
    )
)
GATE_INCONCLUSIVE = termination_message_json(
    GateVerdict(
        status="inconclusive",
        verdict="Inconclusive",
        adapter_digest="sha256:ab",
        message="gate inconclusive (too few held-out pairs to be sure; nothing promoted): "
        "rewardAccuracy 0.6100 [0.5121, 0.6999] on 100 (needs >= 0.6 at 95%): about 9346 pairs "
        "would decide it",
        criteria=[
            ACCURACY.model_copy(
                update={
                    "value": 0.61,
                    "low": 0.5121,
                    "high": 0.6999,
                    "n": 100,
                    "method": "wilson",
                    "passed": False,
                    "inconclusive": True,
                    "needed_pairs": 9346,
                }
            )
        ],
    )
)
PROMOTED = termination_message_json(
    PromotionResult(
        version="quickstart-ab12",
        uri="/mnt/pvc/dpo-runs/promoted/quickstart/versions/quickstart-ab12",
        digest="sha256:ab12",
        promoted_at="2026-11-23T12:00:00+00:00",
        job=JobIdentity(name="quickstart", namespace="default", uid="u"),
    )
)
BAD_INPUT = termination_message_json(
    Failure(status="bad-input", message="prefs.jsonl: row 3, column 'chosen'")
)

NAN_LOSS = HealthSignal(
    reason="NonFiniteLoss",
    step=30,
    message="the loss is nan at step 30; lower learningRate, or train in bf16 rather than fp16",
)
_RAN = DistributedRun(
    distributed_type="NO",
    fsdp_version=None,
    mesh_shape=None,
    mesh_dims=None,
    world_size=1,
    device="cpu",
)
TRAINED = termination_message_json(
    TrainingSummary(step=40, world_size=1, distributed=_RAN, parameters_digest="sha256:cd")
)
TRAINED_DEGRADED = termination_message_json(
    TrainingSummary(
        step=40, world_size=1, distributed=_RAN, parameters_digest="sha256:cd", health=[NAN_LOSS]
    )
)
STOPPED_EARLY = termination_message_json(
    TrainingSummary(
        step=30,
        world_size=1,
        distributed=_RAN,
        parameters_digest="sha256:cd",
        health=[NAN_LOSS],
        stopped_early=StoppedEarly(reason="NonFiniteLoss", step=30, kept_step=20),
    )
)


def gate_report(digest: str, verdict: GateOutcome = "Passed") -> GateReport:
    """eval.json of a gate that judged the adapter `digest`."""
    passed = verdict == "Passed"
    return GateReport(
        status="passed" if passed else "rejected",
        verdict=verdict,
        adapter_digest=digest,
        criteria=[ACCURACY.model_copy(update={"passed": passed})],
        metrics={"eval/rewards/accuracies": 0.93},
        pairs=128,
        data=DataReport(source="eval", read=128, identical=0, empty=0, duplicates=0, kept=128),
        artifact_checks=[
            ArtifactCheck(name=name, passed=True, detail="held")
            for name in get_args(ArtifactCheckName)
        ],
    )


STRAGGLER = HealthSignal(
    reason="Straggler",
    step=12,
    message="rank 5 (pod run-train-1-2-x7 on node gpu-b-1) computes 3.1x slower than the median "
    "of the other ranks",
)
TRAINED_WITH_A_STRAGGLER = termination_message_json(
    TrainingSummary(
        step=40,
        world_size=8,
        distributed=_RAN,
        parameters_digest="sha256:cd",
        health=[STRAGGLER],
        fabric=FabricSummary(
            transport="IB",
            gpu_direct_rdma=True,
            nics=["mlx5_0:1"],
            bus_bandwidth_gbps=180.5,
            slowest_pair="run-train-1-0 <-> run-train-1-1 (gpu-a-0 <-> gpu-a-1): 44.1 GB/s",
        ),
    )
)
FABRIC_SLOW = termination_message_json(
    Failure(
        status="wrong-environment",
        reason="FabricSlow",
        message="the preflight all-reduce reached 3.1 GB/s of bus bandwidth, below "
        "network.preflight.minBusBandwidthGBps (150); the slowest pair of nodes is gpu-a-0 and "
        "gpu-a-1",
    )
)


def model_report(config_name: str, parameters: int, largest: int, **changes: object) -> str:
    """The initializer's report of a model whose config.json ships with the planner (as the
    trainer counts it on the meta device)."""
    config = known_configs()[config_name]
    report = ModelReport(
        name=f"Qwen/{config_name}",
        revision="0123456789abcdef0123456789abcdef01234567",
        parameters=parameters,
        largest_tensor=largest,
        dtype="bfloat16",
        bytes_on_disk=2 * parameters,
        files=17,
        config={k: v for k, v in config.items() if isinstance(v, int | float | bool)}
        | {"model_type": config["model_type"]},
    )
    return termination_message_json(report.model_copy(update=changes))


MODEL_BAD_INPUT = termination_message_json(
    Failure(
        status="bad-input",
        message="model Qwen/Qwen3-33B: not found on the hub (RepositoryNotFoundError); check the "
        "id, and for a private model the HF_TOKEN secret",
    )
)


def gate_passed_with_margin(margin: float) -> str:
    """A gate that passed, with the held-out reward margin it measured."""
    criterion = GateCriterion(name="rewardMargin", value=margin, threshold=0.0, passed=True)
    return termination_message_json(
        GateVerdict(
            status="passed",
            verdict="Passed",
            adapter_digest="sha256:ab",
            criteria=[ACCURACY, criterion],
        )
    )


# A sweep's chooser: trial 3 beats trial 1 clearly, pair against pair.
SWEEP_CHOICE = termination_message_json(
    SweepChoice(
        winner=3,
        confidence=0.95,
        compared=[
            TrialComparison(number=1, mean=0.8, difference=0.4, low=0.3, high=0.5),
            TrialComparison(number=3, mean=1.2),
        ],
    )
)
