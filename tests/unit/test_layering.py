"""The layering of docs/architecture.md, enforced by import-linter: the contracts hold and catch
breaks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{root / 'operator'}{os.pathsep}{root / 'trainer'}"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_codebase_keeps_its_layers() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "forbidden_import", "contract"),
    [
        ("operator/dpo_operator/render.py", "import torch", "never imports the ML stack"),
        ("operator/dpo_operator/api.py", "import trl", "never imports the ML stack"),
        ("trainer/dpo_trainer/config.py", "import dpo_operator", "never imports the operator"),
        ("operator/dpo_operator/render.py", "import kubernetes", "never talk to Kubernetes"),
        ("operator/dpo_operator/network.py", "import kopf", "never talk to Kubernetes"),
    ],
)
def test_a_forbidden_import_breaks_the_build(
    tmp_path: Path, module: str, forbidden_import: str, contract: str
) -> None:
    for part in ("operator", "trainer"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    target = tmp_path / module
    target.write_text(f"{forbidden_import}  # noqa\n" + target.read_text())
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert contract in result.stdout
    assert "BROKEN" in result.stdout
