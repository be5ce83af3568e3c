"""`dpo-trainer choose`: the sweep's chooser pod reads each gated trial's eval.json where the
trial's artifacts are (a mounted path, or an object store: `file://` stands in for one), and
says the winner in its termination message; the operator renders it to reach them."""

from __future__ import annotations

from pathlib import Path

import pytest
from dpo_contract.pod import ENV_TERMINATION_LOG, EXIT_BAD_INPUT
from dpo_contract.sweep import SweepChoice
from dpo_contract.termination import parse_termination_message
from dpo_operator.api.sweep import DPOSweep
from dpo_operator.core.render.chooser import CHOOSER_LABEL, render_chooser
from dpo_operator.core.resolve import resolve
from dpo_operator.core.settings import Settings
from dpo_operator.core.sweep import trials
from dpo_trainer.cli import main as trainer_main

from tests.reports import gate_report
from tests.unit.test_sweep_lifecycle import sweep_manifest


def write_eval(directory: Path, margins: list[float]) -> None:
    directory.mkdir(parents=True)
    report = gate_report("sha256:ab").model_copy(update={"pair_margins": margins})
    (directory / "eval.json").write_text(report.model_dump_json(by_alias=True))


def test_the_chooser_compares_per_beta_wherever_the_reports_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mounted, bucket = tmp_path / "volume" / "trial-1", tmp_path / "bucket" / "trial-2"
    # Trial 1 (beta 0.1) has the smaller raw margins but the larger margins per unit of beta.
    write_eval(mounted, [0.05 + 0.001 * (i % 3) for i in range(30)])
    write_eval(bucket, [0.09 + 0.001 * (i % 3) for i in range(30)])
    termination = tmp_path / "termination-log"
    monkeypatch.setenv(ENV_TERMINATION_LOG, str(termination))
    code = trainer_main(["choose", f"--trial=1={mounted}@0.1", f"--trial=2=file://{bucket}@0.3"])
    assert code == 0
    choice = parse_termination_message(termination.read_text())
    assert isinstance(choice, SweepChoice)
    assert choice.winner == 1
    assert not choice.tied

    code = trainer_main(["choose", f"--trial=1={mounted}@0.1", f"--trial=3={tmp_path}/none@0.1"])
    assert code == EXIT_BAD_INPUT
    failure = termination.read_text()
    assert f"trial 3: no held-out pair margins in {tmp_path}/none/eval.json" in failure


def test_the_chooser_pod_is_the_sweeps_and_reads_each_trials_artifacts() -> None:
    manifest = sweep_manifest()
    sweep = DPOSweep.model_validate(manifest)
    found = {t.number: t for t in trials(manifest)}
    settings = Settings(cpu=True)
    resolved = {}
    for number in (2, 5):
        job = found[number].job
        job = job.model_copy(
            update={"metadata": job.metadata.model_copy(update={"uid": f"uid-{number}"})}
        )
        resolved[number] = resolve(job, settings)
    chooser = render_chooser(sweep, resolved)
    assert chooser["metadata"]["name"] == "beta-sweep-choose"
    assert chooser["metadata"]["ownerReferences"][0]["kind"] == "DPOSweep"
    assert chooser["metadata"]["ownerReferences"][0]["uid"] == "sweep-uid"
    pod = chooser["spec"]["template"]
    for labels in (chooser["metadata"]["labels"], pod["metadata"]["labels"]):
        assert labels[CHOOSER_LABEL] == "beta-sweep"
        assert "dpo.dev/job-name" not in labels, "no trial's controller reads it"
    (container,) = pod["spec"]["containers"]
    assert container["command"] == [
        "dpo-trainer",
        "choose",
        "--trial=2=/mnt/pvc/dpo-runs/team/beta-sweep-2/uid-2@0.05",
        "--trial=5=/mnt/pvc/dpo-runs/team/beta-sweep-5/uid-5@0.3",
    ]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/mnt/pvc/dpo-runs" in mounts
    assert not container["resources"].get("limits", {}).get("nvidia.com/gpu")
