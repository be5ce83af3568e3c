"""The `dpo` command line: validate, render, crd."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import pytest
import yaml
from dpo_operator.cli.main import main
from dpo_operator.core.plan.configs import known_configs

from tests.conftest import EXAMPLES, REPO


def test_validate_accepts_every_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", *map(str, EXAMPLES)]) == 0
    out = capsys.readouterr().out
    assert out.count("is valid") == len(EXAMPLES)


def test_validate_reports_one_line_per_problem_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    manifest = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    manifest["spec"]["resources"]["nodes"] = 0
    manifest["spec"]["dpo"]["lossType"] = ["dpo"]
    bad.write_text(yaml.safe_dump(manifest))
    assert main(["validate", str(bad)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"{bad}: spec.") for line in lines)
    assert any("spec.resources.nodes: must be >= 1, got 0" in line for line in lines)
    assert any("spec.dpo.lossType.0:" in line and "'sigmoid'" in line for line in lines)


def test_validate_checks_every_file_even_after_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.yaml"
    assert main(["validate", str(missing), str(EXAMPLES[0])]) == 1
    captured = capsys.readouterr()
    assert f"{missing}: no such file" in captured.err
    assert "is valid" in captured.out


def test_validate_points_at_broken_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: dpo.dev/v1alpha1\nkind: DPOJob\nspec: [unclosed\n")
    assert main(["validate", str(broken)]) == 1
    err = capsys.readouterr().err
    assert f"{broken}: line" in err
    assert "not valid YAML" in err


def test_validate_rejects_other_kinds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "pod.yaml"
    other.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")
    assert main(["validate", str(other)]) == 1
    assert "kind: expected DPOJob or DPOSweep, got 'Pod'" in capsys.readouterr().err


def test_render_prints_every_child_as_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(REPO / "examples" / "quickstart.yaml")]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("ConfigMap", "quickstart-config"),
        ("Service", "quickstart-nodes"),
        ("NetworkPolicy", "dpo-trainers"),
        ("Job", "quickstart-train-1"),
        ("Job", "quickstart-eval-1"),
        ("Job", "quickstart-promote-1"),
    ]


def test_render_of_an_invalid_manifest_prints_nothing_on_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: dpo.dev/v1alpha1\nkind: DPOJob\nmetadata: {name: x}\nspec: {}\n")
    assert main(["render", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "spec.model: required field is missing" in captured.err


def test_crd_prints_the_custom_resource_definition(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crd"]) == 0
    crd = yaml.safe_load(capsys.readouterr().out)
    assert crd["kind"] == "CustomResourceDefinition"


def test_plan_prints_each_part_the_choice_and_the_gate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(REPO / "examples" / "full-finetune-hsdp-efa.yaml"), "--offline"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "70.55B parameters (known model llama-3.3-70b); full fine-tune" in out
    assert "node label node.kubernetes.io/instance-type=p5.48xlarge" in out
    for part in ("weights", "gradients", "optimizer", "reference", "activations", "total"):
        assert f"  {part}" in out
    assert "choice     fsdp 32: the first that fits 72.0 GiB per GPU" in out
    assert "eval gate  3 GPU(s)" in out


def test_plan_shows_why_a_job_fits_nowhere_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = yaml.safe_load((REPO / "examples" / "full-finetune-hsdp-efa.yaml").read_text())
    manifest["spec"]["resources"]["nodes"] = 1
    one_node = tmp_path / "one-node.yaml"
    one_node.write_text(yaml.safe_dump(manifest))
    assert main(["plan", str(one_node), "--offline"]) == 1
    out = capsys.readouterr().out
    assert "fsdp 8" in out
    assert "problem    resources: this 70.6B-parameter full fine-tune fits on no strategy" in out
    assert main(["validate", str(one_node)]) == 1
    assert "spec.resources: this 70.6B-parameter" in capsys.readouterr().err


def test_the_seed_recipes_are_planned_by_memory_from_their_exact_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Qwen3-8B LoRA on one node fits as ddp; Qwen3-32B full fine-tune on 2 x 8 does not fit
    as hsdp 2x8 (each node a whole copy) and is sharded over all 16 GPUs instead."""
    assert main(["plan", str(REPO / "examples" / "qwen3-8b-lora.yaml"), "--offline"]) == 0
    out = capsys.readouterr().out
    assert "8.19B parameters (known model qwen3-8b); LoRA r=16" in out
    assert "choice     ddp: the first that fits" in out
    assert main(["plan", str(REPO / "examples" / "qwen3-32b-full.yaml"), "--offline"]) == 0
    out = capsys.readouterr().out
    assert "32.76B parameters (known model qwen3-32b); full fine-tune" in out
    assert "choice     fsdp 16: the first that fits 72.0 GiB per GPU" in out
    assert "hsdp 2x8 needs 72.3 GiB" in out
    manifest = yaml.safe_load((REPO / "examples" / "qwen3-32b-full.yaml").read_text())
    manifest["spec"]["parallelism"]["strategy"] = "hsdp"
    hsdp = tmp_path / "hsdp.yaml"
    hsdp.write_text(yaml.safe_dump(manifest))
    assert main(["plan", str(hsdp), "--offline"]) == 1
    assert "the smallest, hsdp 2x8, needs 72.3 GiB per GPU" in capsys.readouterr().out


def test_a_model_under_any_name_is_planned_from_its_config_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fine-tune under its own name: its config.json, given or in its directory, makes the
    size exact; an architecture the planner cannot count says so."""
    qwen3 = known_configs()["qwen3-8b"]
    config = tmp_path / "config.json"
    config.write_text(json.dumps(qwen3))
    manifest = yaml.safe_load((REPO / "examples" / "qwen3-8b-lora.yaml").read_text())
    manifest["spec"]["model"]["name"] = "acme/code-assistant-v2"
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(yaml.safe_dump(manifest))
    assert main(["plan", str(renamed), "--model-config", str(config)]) == 0
    assert "8.19B parameters (the model's config.json)" in capsys.readouterr().out
    manifest["spec"]["model"]["name"] = str(tmp_path)  # a local directory holding config.json
    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump(manifest))
    assert main(["plan", str(local)]) == 0
    assert "8.19B parameters (the model's config.json)" in capsys.readouterr().out
    config.write_text(json.dumps({"model_type": "mamba", "hidden_size": 768}))
    assert main(["plan", str(local)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}/config.json: cannot count the model's parameters: model_type mamba" in err


def test_a_dpojob_without_output_takes_the_installations_default_or_says_where_to_set_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = yaml.safe_load((REPO / "examples" / "qwen3-8b-lora.yaml").read_text())
    del manifest["spec"]["output"]
    bare = tmp_path / "no-output.yaml"
    bare.write_text(yaml.safe_dump(manifest))
    assert main(["validate", str(bare)]) == 1
    err = capsys.readouterr().err
    assert "spec.output: missing, and this installation sets no default output" in err
    assert "--default-output" in err
    assert main(["validate", str(bare), "--default-output", "s3://acme-runs/dpo"]) == 0
    capsys.readouterr()
    flags = ["--default-output", "s3://acme-runs/dpo", "--default-output-secret", "s3-writer"]
    assert main(["render", str(bare), *flags]) == 0
    rendered = list(yaml.safe_load_all(capsys.readouterr().out))
    config = next(o for o in rendered if o["kind"] == "ConfigMap")
    trainer = json.loads(config["data"]["trainer.json"])
    assert trainer["artifactsDir"].startswith("s3://acme-runs/dpo/ml-training/qwen3-8b-lora/")
    train = next(o for o in rendered if o["kind"] == "Job")
    container = train["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-writer"}}]


class HubMirror:
    """A local HTTP server laid out as the hub serves raw files (HF_ENDPOINT points at it)."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_hub_model_is_planned_from_the_hubs_config_json_as_the_initializer_will_count_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub model under a name no table knows: `dpo plan` reads its config.json where the hub
    serves it (HF_ENDPOINT: a mirror here), at the spec's revision; a model the hub does not
    have is an error naming the field; an unreachable hub is a warning, and the plan goes on."""
    served = tmp_path / "hub" / "acme" / "code-assistant-v2" / "resolve" / "v1.2"
    served.mkdir(parents=True)
    (served / "config.json").write_text(json.dumps(known_configs()["qwen3-8b"]))
    mirror = HubMirror(tmp_path / "hub")
    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    manifest = yaml.safe_load((REPO / "examples" / "qwen3-8b-lora.yaml").read_text())
    manifest["spec"]["model"] = {"name": "acme/code-assistant-v2", "revision": "v1.2"}
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(yaml.safe_dump(manifest))
    assert main(["plan", str(renamed)]) == 0
    out = capsys.readouterr().out
    assert "8.19B parameters (config.json of acme/code-assistant-v2@v1.2 from the hub)" in out
    assert "choice     ddp: the first that fits" in out

    manifest["spec"]["model"]["revision"] = "v9"
    renamed.write_text(yaml.safe_dump(manifest))
    assert main(["plan", str(renamed)]) == 1
    assert "spec.model.name: acme/code-assistant-v2@v9: no config.json on the hub (404)" in (
        capsys.readouterr().err
    )

    mirror.server.shutdown()
    mirror.server.server_close()
    assert main(["plan", str(renamed)]) == 0
    captured = capsys.readouterr()
    assert f"acme/code-assistant-v2: cannot reach {mirror.url}" in captured.err
    assert "size unknown" in captured.out
    assert main(["plan", str(renamed), "--offline"]) == 0
    assert capsys.readouterr().err == ""
