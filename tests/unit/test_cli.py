"""The `dpo` command line: validate, render, crd."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dpo_operator.cli.main import main

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
    assert "kind: expected DPOJob, got 'Pod'" in capsys.readouterr().err


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
    assert main(["plan", str(REPO / "examples" / "full-finetune-hsdp-efa.yaml")]) == 0
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
    assert main(["plan", str(one_node)]) == 1
    out = capsys.readouterr().out
    assert "fsdp 8" in out
    assert "problem    resources: this 70.6B-parameter full fine-tune fits on no strategy" in out
    assert main(["validate", str(one_node)]) == 1
    assert "spec.resources: this 70.6B-parameter" in capsys.readouterr().err
