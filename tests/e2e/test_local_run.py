"""`dpo run`: the quickstart trains, passes the gate and is promoted; bad runs are stopped."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dpo_contract.config import HoldOut
from dpo_contract.fields import ColumnMapping, DataSource
from dpo_contract.manifest import verify_manifest
from dpo_contract.pod import EXIT_GATE_REJECTED
from dpo_operator.cli.main import main
from dpo_trainer.io.builtin import builtin_model_path
from dpo_trainer.io.data import load_preferences, split_held_out
from dpo_trainer.io.models import cache_dir
from dpo_trainer.publish.targets import read_current

from tests.conftest import REPO, dpo_run, promotion_target, quickstart
from tests.oci_registry import OciRegistry

BIN = Path(sys.executable).parent


def test_the_quickstart_passes_the_gate_and_is_promoted(tmp_path: Path) -> None:
    code, output = dpo_run(quickstart(), tmp_path)
    assert code == 0
    assert "DPOJob default/quickstart: Succeeded" in output
    assert "gate       Passed" in output
    accuracy = next(line for line in output.splitlines() if line.startswith("  rewardAccuracy"))
    assert "95% wilson  n=128" in accuracy, "the estimate comes with its interval and n"
    assert (tmp_path / "rewards.png").stat().st_size > 10_000
    current = read_current(str(promotion_target(tmp_path)))
    assert current is not None
    assert f"promoted   {current.version}" in output
    # Ready for vLLM as it is: the adapter names the served base model; the serve line is shown.
    promoted = Path(current.uri)
    adapter_config = json.loads((promoted / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "builtin:tiny-llama"
    assert verify_manifest(promoted) == current.digest
    assert (
        f"serve      vllm serve builtin:tiny-llama --enable-lora --max-lora-rank 8 "
        f"--lora-modules {current.version}={current.uri}"
    ) in output
    summary = json.loads(next(tmp_path.rglob("train.json")).read_text())
    assert summary["metrics"]["dpo_eval_reward_accuracy"] > 0.8


def test_flipped_labels_are_rejected_and_nothing_is_promoted(tmp_path: Path) -> None:
    manifest = quickstart(
        **{
            "data.train": {"uri": "builtin:synthetic-preferences/train?flip=true"},
            "dpo.maxSteps": 30,
        }
    )
    code, output = dpo_run(manifest, tmp_path)
    assert code == EXIT_GATE_REJECTED
    assert "DPOJob default/quickstart: Rejected" in output
    rejection = next(line for line in output.splitlines() if "gate rejected:" in line)
    assert "rewardAccuracy 0.0" in rejection
    assert "needs >= 0.6" in rejection
    assert not promotion_target(tmp_path).exists()


def test_manual_promotion_waits_for_approval(tmp_path: Path) -> None:
    manifest = quickstart(**{"promotion.mode": "manual", "dpo.maxSteps": 20})
    code, output = dpo_run(manifest, tmp_path)
    assert code == 0
    assert "AwaitingApproval" in output
    assert read_current(str(promotion_target(tmp_path))) is None

    code, output = dpo_run(manifest, tmp_path, approve=True)
    assert code == 0
    assert "Succeeded" in output
    assert "step 1/" not in output, "training is not repeated"
    assert read_current(str(promotion_target(tmp_path))) is not None


def test_an_adapter_promoted_to_an_oci_registry_is_pulled_back_verified_for_vllm(
    oci_registry: OciRegistry, tmp_path: Path
) -> None:
    target = f"oci://{oci_registry.host}/adapters/quickstart"
    manifest = quickstart(
        **{"promotion.target": target, "promotion.plainHttp": True, "dpo.maxSteps": 20}
    )
    code, output = dpo_run(manifest, tmp_path)
    assert code == 0
    serve = next(line for line in output.splitlines() if line.startswith("serve "))
    pull, vllm = serve.removeprefix("serve").strip().split(" && ")
    command = shlex.split(pull)
    assert command[:2] == ["dpo", "pull"]
    assert command[2].startswith(f"{target}@sha256:"), "pulled by digest, not by a moving tag"
    assert vllm.startswith("vllm serve builtin:tiny-llama --enable-lora")

    pulled = subprocess.run(
        [BIN / "dpo", *command[1:]], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert pulled.returncode == 0, pulled.stderr
    assert "gate Passed on 128 pairs" in pulled.stdout, pulled.stdout
    adapter = tmp_path / command[3]
    digest = verify_manifest(adapter)
    assert f"adapter {digest}, every file verified" in pulled.stdout
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "builtin:tiny-llama"
    )
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    version = Path(command[3]).name
    assert version.startswith("quickstart-"), "served under its version's name"
    assert shlex.split(vllm)[-1] == f"{version}={command[3]}"


def test_a_two_node_job_on_a_bucket_model_is_initialized_once_then_runs_as_two_processes(
    tmp_path: Path,
) -> None:
    """The initializer stage runs as a process: it counts the model, copies it from the bucket
    onto the run's volume once, and both training processes read that copy."""
    bucket = tmp_path / "bucket"
    shutil.copytree(
        builtin_model_path("builtin:tiny-llama", cache_dir() / "models"), bucket / "sft"
    )
    (bucket / "sft" / ".complete").unlink()
    model = f"file://{bucket}/sft"
    manifest = quickstart(**{"resources.nodes": 2, "dpo.maxSteps": 20, "model.name": model})
    code, output = dpo_run(manifest, tmp_path / "run")
    assert code == 0, output
    tmp_path = tmp_path / "run"
    assert "[Initializing] resolving " in output
    resolved = next(line for line in output.splitlines() if "ModelResolved" in line)
    assert f"{model}: 0." in resolved
    assert "B parameters" in resolved
    assert "; copied to " in resolved
    (staged,) = (tmp_path / "volumes" / "dpo-runs").glob("default/quickstart/*/base-model")
    assert (staged / ".complete").exists()
    for rank in (0, 1):
        log = (tmp_path / "logs" / f"quickstart-train-1-{rank}.log").read_text()
        assert f"reading the initializer's copy at {staged}" in log, log[-2000:]
    assert "  ddp on 2 pod(s) x 1 cpu process(es)" in output
    assert (tmp_path / "logs" / "quickstart-train-1-1.log").exists(), "one log per pod"
    ranks = [
        json.loads((tmp_path / "logs" / f"quickstart-train-1-{r}.termination.json").read_text())
        for r in (0, 1)
    ]
    assert [r["worldSize"] for r in ranks] == [2, 2]
    assert ranks[0]["parametersDigest"] == ranks[1]["parametersDigest"]


def test_a_plain_recipe_without_eval_data_is_gated_on_a_hold_out_it_never_trained_on(
    tmp_path: Path,
) -> None:
    """TRL's recipes give only training pairs: the gate gets a hold-out of them."""
    manifest = quickstart(**{"dpo.maxSteps": 30})
    del manifest["spec"]["data"]["eval"]
    code, output = dpo_run(manifest, tmp_path)
    assert code == 0, output
    train = json.loads(next(tmp_path.rglob("train.json")).read_text())
    gate = json.loads(next(tmp_path.rglob("eval.json")).read_text())
    held = gate["heldOut"]
    assert held == train["heldOut"], "training and the gate split the pairs the same way"
    assert held["source"] == "builtin:synthetic-preferences/train"
    assert held["fraction"] == 0.05
    assert gate["pairs"] == held["pairs"] > 0
    assert f"on {held['pairs']} pairs ({held['prompts']} prompts) held out of" in output
    assert "eval_rewards/accuracies" in output, "the held-out pairs are the eval set too"

    pairs, _ = load_preferences(DataSource(uri=held["source"]), ColumnMapping(), "auto")
    trained, held_out = split_held_out(pairs, HoldOut(fraction=0.05, max_pairs=2000))
    assert len(held_out) == held["pairs"]
    assert len(trained) + len(held_out) == train["data"]["train"]["kept"]
    assert not {p["prompt"] for p in trained} & {p["prompt"] for p in held_out}


def test_a_beta_sweep_is_compared_in_one_command(tmp_path: Path) -> None:
    runs = []
    for beta in (0.1, 0.5):
        workdir = tmp_path / f"beta-{beta}"
        code, _ = dpo_run(quickstart(**{"dpo.beta": beta, "dpo.maxSteps": 20}), workdir)
        assert code == 0
        runs.append(str(workdir))
    plot = tmp_path / "sweep.png"
    compared = subprocess.run(
        [str(BIN / "dpo"), "compare", *runs, "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    print(compared.stdout, compared.stderr)
    assert compared.returncode == 0, compared.stderr
    beta = next(line for line in compared.stdout.splitlines() if "training.beta" in line)
    assert beta.split()[1:] == ["0.1", "0.5"]
    assert compared.stdout.count(": rewardAccuracy") == 2, "each run's gate, with its interval"
    assert "95% wilson  n=128" in compared.stdout
    assert plot.stat().st_size > 20_000


def test_coin_flip_pairs_are_reported_degraded_and_rejected(tmp_path: Path) -> None:
    manifest = quickstart(
        **{
            "data.train": {"uri": "builtin:synthetic-preferences/train?noise=0.5"},
            "dpo.maxSteps": 30,
        }
    )
    code, output = dpo_run(manifest, tmp_path)
    assert code == EXIT_GATE_REJECTED, "the gate still judges it"
    assert "Warning  Degraded: raised while training: AccuracyStuck" in output
    assert "health     AccuracyStuck" in output


def test_two_runs_on_one_machine_at_once_take_ports_of_their_own(tmp_path: Path) -> None:
    """Each `dpo run` serves rank 0's /metrics on a free port it prints (not the spec's 9400,
    which the second run would find taken) and rendezvouses on another: both succeed."""
    runs = []
    for name in ("first", "second"):
        manifest = quickstart(**{"dpo.maxSteps": 5, "evalGate.enabled": False})
        manifest["metadata"]["name"] = name
        del manifest["spec"]["promotion"]
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps(manifest))
        command = [str(BIN / "dpo"), "run", str(path), "--workdir", str(tmp_path / name)]
        runs.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    ports = {
        line.rsplit(":", 1)[1].split("/")[0]
        for output in outputs
        for line in output.splitlines()
        if "live metrics at http://127.0.0.1:" in line
    }
    assert len(ports) == 2, outputs
    assert "9400" not in ports


def test_a_sweep_runs_here_with_one_reference_pass_and_promotes_only_its_winner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dpo run` on a DPOSweep of two betas: each trial trains and is gated on one volume (the
    first computes the reference log-probs, the second reuses them), the winner is chosen pair
    against pair on the held-out pairs both gates scored, and only it is promoted."""
    sweep = yaml.safe_load((REPO / "examples" / "beta-sweep.yaml").read_text())
    sweep["spec"]["parameters"] = [{"field": "dpo.beta", "values": [0.1, 0.3]}]
    sweep["spec"]["template"]["dpo"]["maxSteps"] = 20
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    code = main(["run", str(path), "--workdir", str(tmp_path / "run")])
    output = capsys.readouterr().out
    print(output)
    assert code == 0, output
    assert "DPOSweep beta-sweep: 2 trials, one at a time on this machine" in output
    table = output[output.rindex("trial  settings") :].splitlines()
    assert "reference computed" in table[1]
    assert "dpo.beta=0.1" in table[1]
    assert "reference reused" in table[2]
    assert "dpo.beta=0.3" in table[2]
    winner = re.search(r"winner  trial (\d) \(dpo\.beta=([0-9.]+)\)", output)
    assert winner is not None, output
    number = r"[+-][0-9.e+-]+"
    assert re.search(rf"  trial \d: {number} \[{number}, {number}\]  (worse|tied)", output)
    volume = tmp_path / "run" / "volumes" / "dpo-runs"
    current = read_current(str(volume / "promoted" / "beta-sweep"))
    assert current is not None, "the winner is promoted"
    assert current.job.name == f"beta-sweep-{winner.group(1)}", "the winner, and only it"
    gates = sorted(volume.glob("default/beta-sweep-*/*/eval.json"))
    margins = [len(json.loads(gate.read_text())["pairMargins"]) for gate in gates]
    assert len(margins) == 2
    assert margins[0] == margins[1] > 0, "both gates scored the same pairs"
