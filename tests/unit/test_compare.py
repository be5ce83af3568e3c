"""`dpo compare`: a sweep's runs side by side (only the settings that differ, metrics, the gate with
intervals, health) and one PNG of their curves."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from dpo_contract.config import DistributedRun, HealthSignal, JobIdentity
from dpo_contract.reports import DataReport, GateCriterion, GateReport, TrainingReport
from dpo_operator.cli.compare import RunNotFoundError, load_run
from dpo_operator.cli.main import main
from dpo_operator.core.render import trainer_config
from dpo_operator.core.resolve import resolve

from tests.conftest import job_with

RAN = DistributedRun(distributed_type="NO", world_size=1, device="cpu")
DATA = DataReport(source="builtin", read=512, identical=0, empty=0, duplicates=0, kept=512)


def history(rise: float) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for step in range(5, 45, 5):
        rows.append(
            {
                "step": step,
                "loss": 0.69 - rise * step / 100,
                "rewards/accuracies": min(0.5 + rise * step / 50, 1.0),
                "rewards/margins": rise * step / 10,
            }
        )
    rows.append({"step": 40, "eval_loss": 0.6, "eval_rewards/accuracies": 0.9})
    return rows


def write_run(directory: Path, beta: float, accuracy: float, **report: Any) -> Path:
    """A `dpo run` directory as `dpo run` leaves it: trainer.json and the run's artifacts."""
    artifacts = directory / "volumes" / "artifacts"
    artifacts.mkdir(parents=True)
    config = trainer_config(resolve(job_with(dpo={"beta": beta}))).model_copy(
        update={"artifacts_dir": str(artifacts)}
    )
    (directory / "trainer.json").write_text(config.model_dump_json(by_alias=True))
    training = TrainingReport(
        job=JobIdentity(name="demo", namespace="ml", uid=f"u-{beta}"),
        step=40,
        world_size=1,
        distributed=RAN,
        parameters_digest="sha256:00",
        metrics={"dpo_train_loss": 0.5, "dpo_train_reward_accuracy": accuracy},
        seconds=12.0,
        eval={"eval_rewards/accuracies": accuracy - 0.05},
        data={"train": DATA, "eval": None},
        adapter=str(artifacts / "adapter"),
        log_history=history(beta),
        memory={},
        **report,
    )
    (artifacts / "train.json").write_text(training.model_dump_json(by_alias=True))
    gate = GateReport(
        status="passed",
        verdict="Passed",
        adapter_digest="sha256:ab",
        criteria=[
            GateCriterion(
                name="rewardAccuracy",
                value=accuracy,
                low=accuracy - 0.06,
                high=accuracy + 0.03,
                n=128,
                method="wilson",
                threshold=0.6,
                passed=True,
            )
        ],
        metrics={},
        pairs=128,
        data=DATA,
    )
    (artifacts / "eval.json").write_text(gate.model_dump_json(by_alias=True))
    return directory


def test_a_beta_sweep_is_compared_in_one_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    low = write_run(tmp_path / "beta-0.1", 0.1, 0.93)
    displaced = HealthSignal(reason="LikelihoodDisplacement", step=20, message="chosen fell")
    high = write_run(tmp_path / "beta-0.5", 0.5, 0.81, health=[displaced])
    plot = tmp_path / "sweep.png"
    assert main(["compare", str(low), str(high), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    print(out)
    settings = out[out.index("settings that differ") : out.index("final training metrics")]
    assert "training.beta" in settings
    assert "0.1" in settings
    assert "0.5" in settings
    assert settings.count("\n") == 2, "only beta differs: the job's uid and paths are not settings"
    assert "0.93" in out
    assert "0.81" in out
    assert "beta-0.1: rewardAccuracy" in out
    assert "[0.8700, 0.9600] 95% wilson  n=128" in out
    assert "beta-0.5: LikelihoodDisplacement (step 20)" in out
    assert "beta-0.1: no signal" in out
    with plot.open("rb") as png:
        header = png.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width > 3 * height, "one row of three panels"


def test_a_dpojob_is_compared_from_its_status_where_its_output_is_not_readable(
    tmp_path: Path,
) -> None:
    body = json.loads(job_with().model_dump_json(by_alias=True, exclude_none=True))
    body["status"] = {
        "phase": "Rejected",
        "evaluation": {
            "verdict": "Rejected",
            "criteria": [
                {"name": "rewardAccuracy", "value": 0.41, "threshold": 0.6, "passed": False}
            ],
        },
    }
    asked: list[list[str]] = []

    def kubectl(arguments: list[str]) -> str:
        asked.append(arguments)
        return json.dumps(body)

    run = load_run("dpojob/ml/demo", kubectl)
    assert asked == [["get", "dpojobs.dpo.dev", "demo", "-n", "ml", "-o", "json"]]
    assert run.phase == "Rejected"
    assert run.verdict == "Rejected"
    assert run.criteria[0].value == 0.41
    assert run.settings["training.beta"] == 0.1
    assert any("PVC" in note for note in run.notes)


def test_a_run_that_is_not_there_says_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(RunNotFoundError, match=r"no trainer.json .* or train.json"):
        load_run(str(tmp_path))


def test_a_dposweep_is_compared_trial_by_trial_with_its_stops_and_winner(tmp_path: Path) -> None:
    from dpo_operator.cli.compare import compare
    from dpo_operator.core.sweep import trials

    from tests.unit.test_sweep_lifecycle import sweep_manifest

    def row(number: int, phase: str, **said: Any) -> dict[str, Any]:
        beta = f"dpo.beta=0.{number}"
        named = {"number": number, "name": f"beta-sweep-{number}", "settings": beta}
        return {**named, "phase": phase, **said}

    sweep = sweep_manifest()
    sweep["spec"]["parameters"] = [{"field": "dpo.beta", "values": [0.1, 0.2, 0.3]}]
    stop = "held-out margin per beta at most 0.1 (upper bound at 95%), below trial 1's lower bound"
    sweep["status"] = {
        "phase": "Succeeded",
        "message": "trial 3 (dpo.beta=0.3) won and is promoted",
        "winner": 3,
        "trials": [
            row(1, "AwaitingApproval"),
            row(2, "Suspended", rewardMargin=0.015, rewardMarginLow=0.01, rewardMarginHigh=0.02,
                stopped=stop),
            row(3, "Succeeded"),
        ],
        "comparisons": [
            {"number": 1, "mean": 0.8, "difference": 0.4, "low": 0.3, "high": 0.5},
            {"number": 3, "mean": 1.2},
        ],
    }  # fmt: skip
    bodies = [t.manifest for t in reversed(trials(sweep))]  # kubectl lists by name, not number
    asked: list[list[str]] = []

    def kubectl(arguments: list[str]) -> str:
        asked.append(arguments)
        return json.dumps(sweep if arguments[1] == "dposweeps.dpo.dev" else {"items": bodies})

    text, _ = compare(["dposweep/team/beta-sweep"], tmp_path / "sweep.png", kubectl)
    print(text)
    assert asked[1] == [
        "get", "dpojobs.dpo.dev", "-l", "dpo.dev/sweep=beta-sweep", "-n", "team", "-o", "json",
    ]  # fmt: skip
    header = text.splitlines()[0].split()
    assert header == ["beta-sweep-1", "beta-sweep-2", "beta-sweep-3"], "in trial order"
    settings = text[text.index("settings that differ") : text.index("final training metrics")]
    assert "training.beta" in settings
    assert (
        f"trial 2 (dpo.beta=0.2): Suspended, held-out margin 0.015 [0.01, 0.02]; stopped: {stop}"
        in text
    )
    assert "winner: trial 3" in text
    assert "trial 1: +0.4 [+0.3, +0.5]  worse" in text

    with pytest.raises(RunNotFoundError, match="has no trials yet"):
        compare(
            ["dposweep/beta-sweep"],
            tmp_path / "none.png",
            lambda a: json.dumps(sweep if a[1] == "dposweeps.dpo.dev" else {"items": []}),
        )
