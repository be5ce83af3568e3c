"""The eval gate and promotion: intervals and inconclusive verdicts, drift, digests, races, and
beating the promoted adapter on the same pairs."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from dpo_contract.config import TrainerConfig
from dpo_contract.manifest import verify_manifest, write_manifest
from dpo_contract.pod import (
    EXIT_BAD_INPUT,
    EXIT_CHAMPION_CHANGED,
    EXIT_GATE_REJECTED,
    BadInputError,
)
from dpo_contract.reports import GateCriterion, GateReport
from dpo_trainer.gate.evaluate import evaluate
from dpo_trainer.publish.targets import read_current
from safetensors.torch import load_file, save_file

from tests.trainer.conftest import (
    BIN,
    challengers,
    report_digest,
    trained,
    trainer_cli,
    with_promotion,
    write_config,
)

ANCHOR = {"uri": "builtin:synthetic-preferences/anchor"}


@pytest.mark.parametrize(("beta", "drifts"), [(1.0, False), (0.01, True)])
def test_a_very_low_beta_trained_long_trips_the_drift_criterion(
    tmp_path: Path, beta: float, drifts: bool
) -> None:
    config = trained(
        tmp_path,
        peft={"enabled": False},
        dpo={
            "beta": beta,
            "maxSteps": 250,
            "learningRate": 1.5e-3,
            "saveSteps": 1000,
            "loggingSteps": 50,
        },
        evalGate={"anchorData": ANCHOR, "maxAnchorNllIncrease": 0.2},
    )
    report = evaluate(config)
    criteria = {c.name: c for c in report.criteria}
    drift = criteria["anchorNllIncrease"]
    assert drift.value is not None
    print(
        f"beta {beta}: anchor NLL {report.metrics['referenceAnchorNll']:.3f} -> "
        f"{report.metrics['anchorNll']:.3f} ({drift.value:+.1%}), "
        f"reward accuracy {criteria['rewardAccuracy'].value:.3f}"
    )
    assert criteria["rewardAccuracy"].passed, "the preference itself was learned either way"
    assert drift.passed is not drifts
    assert report.verdict == ("Rejected" if drifts else "Passed")
    if drifts:
        assert report.message is not None
        assert "anchorNllIncrease" in report.message
        assert "needs <= 0.2" in report.message


def test_a_corrupted_adapter_fails_eval_and_promote_with_a_digest_error(tmp_path: Path) -> None:
    config = with_promotion(trained(tmp_path, dpo={"maxSteps": 10}), str(tmp_path / "m"))
    passed = evaluate(config)
    assert passed.verdict == "Passed"
    assert [(c.name, c.passed) for c in passed.artifact_checks] == [
        ("shapes", True),
        ("matchesTrained", True),
        ("loraBTrained", True),
        ("baseModel", True),
        ("changesLogits", True),
    ]
    weights = Path(config.artifacts_dir) / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte changed
    weights.write_bytes(bytes(data))

    with pytest.raises(BadInputError, match="digest mismatch"):
        verify_manifest(weights.parent)
    for command in ("eval", "promote"):
        code, message = trainer_cli(command, config, tmp_path)
        assert code == EXIT_BAD_INPUT, command
        assert "adapter_model.safetensors: digest mismatch" in message["message"]
    assert not (tmp_path / "m" / "current").exists(), "nothing was promoted"


def rank_zero_slice(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What each rank keeping only its shard saves, from rank 0 of 2: the first half of each
    tensor's rows."""
    return {name: t[: -(-t.shape[0] // 2)].contiguous() for name, t in tensors.items()}


def untrained(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter as PEFT starts it: every lora_B zero."""
    return {name: torch.zeros_like(t) if ".lora_B." in name else t for name, t in tensors.items()}


@pytest.mark.parametrize(
    ("damage", "failing"),
    [
        (rank_zero_slice, {"shapes", "matchesTrained"}),
        (untrained, {"matchesTrained", "loraBTrained"}),
    ],
    ids=["one-ranks-slice", "untrained"],
)
def test_an_adapter_that_is_not_the_trained_one_passes_integrity_and_is_refused(
    tmp_path: Path, damage: Any, failing: set[str]
) -> None:
    """The save accelerate fixed in its PR #4206 kept only rank 0's slice of each FSDP2 LoRA
    tensor, and our manifest signs whatever was written. Reproduced (and an untrained adapter
    too): the saved tensors replaced, the manifest written again so integrity holds. The gate
    rejects the adapter before scoring it, naming each failed check; nothing is promoted."""
    config = with_promotion(trained(tmp_path, dpo={"maxSteps": 10}), str(tmp_path / "m"))
    adapter = Path(config.artifacts_dir) / "adapter"
    weights = adapter / "adapter_model.safetensors"
    save_file(damage(load_file(weights)), weights)
    write_manifest(adapter)  # integrity holds: the damaged files are signed

    report = evaluate(config)
    print(report.message)
    assert report.verdict == "Rejected"
    assert {c.name for c in report.artifact_checks if not c.passed} == failing
    assert report.criteria == [], "not scored"
    code, _ = trainer_cli("promote", config, tmp_path)
    assert code != 0
    assert not (tmp_path / "m" / "current").exists(), "nothing was promoted"


def test_a_gate_on_another_base_model_refuses_the_adapter(tmp_path: Path) -> None:
    config = trained(tmp_path, dpo={"maxSteps": 4})
    assert evaluate(config).verdict == "Passed"
    elsewhere = TrainerConfig.model_validate(
        {**config.model_dump(), "model": {**config.model.model_dump(), "revision": "v2"}}
    )
    (check,) = [c for c in evaluate(elsewhere).artifact_checks if not c.passed]
    assert check.name == "baseModel"
    assert check.detail.endswith("the gate loads builtin:tiny-llama@v2")


def test_racing_promotions_leave_a_consistent_current_and_repeats_are_no_ops(
    tmp_path: Path,
) -> None:
    target = str(tmp_path / "models")
    configs = []
    for seed in (1, 2):
        config = with_promotion(
            trained(tmp_path / f"run{seed}", dpo={"maxSteps": 10, "seed": seed}), target
        )
        assert evaluate(config).verdict == "Passed"
        configs.append(config)

    racers = []
    for index, config in enumerate(configs * 2):  # each adapter twice, all at once
        workdir = tmp_path / f"racer{index}"
        workdir.mkdir()
        racers.append(
            subprocess.Popen(
                [
                    str(BIN / "dpo-trainer"),
                    "promote",
                    "--config",
                    str(write_config(config, workdir)),
                ],
                env={"DPO_TERMINATION_LOG": str(workdir / "t.json"), "PATH": str(BIN)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    assert [racer.wait(timeout=300) for racer in racers] == [0, 0, 0, 0]

    current = read_current(target)
    assert current is not None
    digests = {
        json.loads((Path(c.artifacts_dir) / "eval.json").read_text())["adapterDigest"]
        for c in configs
    }
    assert current.digest in digests
    versions = sorted(p.name for p in (tmp_path / "models" / "versions").iterdir())
    assert len(versions) == 2, f"one directory per adapter, no leftovers: {versions}"
    assert verify_manifest(tmp_path / "models" / "versions" / current.version) == current.digest

    pointer = (tmp_path / "models" / "current").read_bytes()
    winner = next(
        c
        for c in configs
        if json.loads((Path(c.artifacts_dir) / "eval.json").read_text())["adapterDigest"]
        == current.digest
    )
    code, _ = trainer_cli("promote", winner, tmp_path)
    assert code == 0
    assert (tmp_path / "models" / "current").read_bytes() == pointer, "re-promoting is a no-op"


def test_must_beat_promoted_rejects_an_adapter_that_is_no_better(tmp_path: Path) -> None:
    target = str(tmp_path / "models")
    first = with_promotion(trained(tmp_path / "first", dpo={"maxSteps": 40}), target)
    assert evaluate(first).verdict == "Passed"
    assert trainer_cli("promote", first, tmp_path)[0] == 0

    second = with_promotion(
        trained(tmp_path / "second", dpo={"maxSteps": 40, "seed": 7}),
        target,
        must_beat_promoted=True,
        beat_margin=0.05,
    )
    report = evaluate(second)
    beats = next(c for c in report.criteria if c.name == "beatsPromoted")
    assert beats.value is not None
    print(
        f"second adapter vs promoted: reward accuracy {beats.value:+.4f} "
        f"(needs > {beats.threshold})"
    )
    assert report.verdict == "Rejected"
    assert not beats.passed
    assert report.message is not None
    assert "beatsPromoted" in report.message
    current = read_current(target)
    assert current is not None
    assert current.digest == report_digest(first)


def test_two_runs_that_beat_the_same_champion_leave_the_first_promoted(tmp_path: Path) -> None:
    """Both gates compared with what was promoted then (nothing); the first to promote wins
    and the second is refused instead of replacing it unseen."""
    target = str(tmp_path / "models")
    runs = challengers(tmp_path, target)
    assert trainer_cli("promote", runs[0], tmp_path / "run1")[0] == 0
    code, message = trainer_cli("promote", runs[1], tmp_path / "run2")
    assert code == EXIT_CHAMPION_CHANGED
    assert message["status"] == "champion-changed"
    assert "promoted meanwhile by another run" in message["message"]
    current = read_current(target)
    assert current is not None
    assert current.digest == report_digest(runs[0])


def test_a_damaged_champion_is_never_scored_against(tmp_path: Path) -> None:
    target = str(tmp_path / "models")
    first = with_promotion(trained(tmp_path / "first", dpo={"maxSteps": 10}), target)
    assert evaluate(first).verdict == "Passed"
    assert trainer_cli("promote", first, tmp_path)[0] == 0
    current = read_current(target)
    assert current is not None
    weights = tmp_path / "models" / "versions" / current.version / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    second = with_promotion(
        trained(tmp_path / "second", dpo={"maxSteps": 10, "seed": 3}),
        target,
        must_beat_promoted=True,
    )
    code, message = trainer_cli("eval", second, tmp_path / "second")
    assert code == EXIT_BAD_INPUT
    assert (
        f"the promoted adapter at {tmp_path}/models/versions/{current.version} is damaged"
        in (message["message"])
    )


@pytest.mark.parametrize("command", ["eval", "promote"])
def test_sigterm_stops_eval_and_promote_at_once_with_a_reason(tmp_path: Path, command: str) -> None:
    """In a pod these run as PID 1, which the kernel shields from signals it does not handle:
    without a handler a deleted pod would wait out its whole grace period."""
    config = with_promotion(trained(tmp_path, dpo={"maxSteps": 10}), str(tmp_path / "m"))
    assert evaluate(config).verdict == "Passed"
    termination = tmp_path / "stopped.json"
    process = subprocess.Popen(
        [str(BIN / "dpo-trainer"), command, "--config", str(write_config(config, tmp_path))],
        env={"DPO_TERMINATION_LOG": str(termination), "PATH": str(BIN)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # As soon as the command handles SIGTERM (its SigCgt mask says so), while it still works.
    wait_until_catching(process.pid, signal.SIGTERM)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    stopped = json.loads(termination.read_text())
    assert stopped == {"status": "interrupted", "message": "stopped by signal SIGTERM"}
    assert not (tmp_path / "m" / "current").exists(), "nothing half-promoted"


def wait_until_catching(pid: int, signum: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(
            next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16
        )
        if caught & (1 << (signum - 1)):
            return
        time.sleep(0.005)
    raise TimeoutError(f"process {pid} never installed a handler for signal {signum}")


def with_gate(config: TrainerConfig, **gate: Any) -> TrainerConfig:
    """The config with gate settings changed, validated again."""
    assert config.gate is not None
    return TrainerConfig.model_validate(
        {**config.model_dump(), "gate": {**config.gate.model_dump(), **gate}}
    )


def criterion(report: GateReport, name: str) -> GateCriterion:
    return next(c for c in report.criteria if c.name == name)


def test_flipped_labels_are_rejected_with_the_whole_interval_below_the_threshold(
    tmp_path: Path,
) -> None:
    config = trained(tmp_path)
    flipped = {"uri": "builtin:synthetic-preferences/eval?flip=true"}
    report = evaluate(with_gate(config, data=flipped))
    accuracy = criterion(report, "rewardAccuracy")
    print(f"flipped: rewardAccuracy {accuracy.value} [{accuracy.low}, {accuracy.high}]")
    assert report.verdict == "Rejected"
    assert accuracy.method == "wilson"
    assert accuracy.n == report.pairs
    assert accuracy.high is not None
    assert accuracy.high < 0.6
    assert report.message is not None
    assert f"on {report.pairs} (needs >= 0.6 at 95%)" in report.message


def test_too_few_pairs_are_inconclusive_and_enough_of_them_decide(tmp_path: Path) -> None:
    config = with_gate(
        trained(tmp_path),
        min_reward_accuracy=0.8,
        min_reward_margin=None,
        max_anchor_nll_increase=None,
    )
    code, message = trainer_cli("eval", with_gate(config, max_samples=12), tmp_path)
    assert code == EXIT_GATE_REJECTED, message
    assert message["verdict"] == "Inconclusive"
    (few,) = message["criteria"]
    print(f"12 pairs: rewardAccuracy {few['value']} [{few['low']}, {few['high']}]")
    assert few["value"] >= 0.8 > few["low"], "the estimate passes, its interval does not"
    assert few["inconclusive"]
    assert few["neededPairs"] > 12
    assert f"about {few['neededPairs']} pairs would decide it" in message["message"]

    report = evaluate(config)  # the same adapter, all 128 held-out pairs
    assert report.verdict == "Passed", report.message
    assert criterion(report, "rewardAccuracy").low > 0.8  # type: ignore[operator]


def test_a_real_improvement_beats_the_champion_on_the_same_pairs(tmp_path: Path) -> None:
    target = str(tmp_path / "models")
    # The champion barely moved from the reference: about half its pairs are ranked right.
    champion = with_promotion(
        trained(tmp_path / "champion", dpo={"maxSteps": 1, "learningRate": 1e-7}),
        target,
        min_reward_accuracy=0.0,
        min_reward_margin=None,
    )
    assert evaluate(champion).verdict == "Passed"
    assert trainer_cli("promote", champion, tmp_path / "champion")[0] == 0

    challenger = with_promotion(trained(tmp_path / "challenger"), target, must_beat_promoted=True)
    report = evaluate(challenger)
    beats = criterion(report, "beatsPromoted")
    print(
        f"challenger vs champion: accuracy delta {beats.value:+.3f} "
        f"[{beats.low:+.3f}, {beats.high:+.3f}] on {beats.n} pairs"
    )
    assert report.verdict == "Passed", report.message
    assert beats.method == "paired-bootstrap"
    assert beats.low is not None
    assert beats.low > 0.0
    assert report.champion_digest == report_digest(champion)
    assert report.metrics["beatsPromotedMarginDeltaLow"] > 0.0
