"""The house of docs/architecture.md, measured: import-linter's contracts hold and catch breaks,
no module imports itself back through others, and no source module outgrows a room."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from tests.conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("dpo_operator", "dpo_trainer", "dpo_contract")
MAX_MODULE_LINES = 600


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
        ("operator/dpo_operator/core/render/training.py", "import torch", "the ML stack"),
        ("operator/dpo_operator/api/job.py", "import trl", "the ML stack"),
        ("operator/dpo_operator/controller/executor.py", "import kubernetes", "Kubernetes client"),
        ("trainer/dpo_contract/config.py", "import dpo_operator", "never import the operator"),
        ("trainer/dpo_trainer/io/data.py", "import dpo_operator.api", "never import the operator"),
        ("operator/dpo_operator/core/plan/memory.py", "import dpo_trainer.io.fetch", "only the"),
        ("trainer/dpo_contract/reports.py", "import torch", "pydantic only"),
        ("trainer/dpo_contract/manifest.py", "import dpo_trainer.io.artifacts", "pydantic only"),
        ("operator/dpo_operator/core/render/pod.py", "import kopf", "never talk to Kubernetes"),
        ("operator/dpo_operator/api/meta.py", "import aiohttp", "never talk to Kubernetes"),
        ("operator/dpo_operator/core/lifecycle/machine.py", "import dpo_operator.cli", "layered"),
        ("operator/dpo_operator/api/status.py", "import dpo_operator.core.names", "layered"),
        ("operator/dpo_operator/local/executor.py", "import dpo_operator.controller", "layered"),
        ("trainer/dpo_trainer/train/run.py", "import dpo_trainer.gate.evaluate", "stages"),
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
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in " ".join(broken.split()), result.stdout


def import_cycles(packages: tuple[str, ...]) -> list[list[str]]:
    """Every set of modules that import one another round in a circle (the import graph's
    strongly connected components of more than one module), function-level imports included."""
    graph = grimp.build_graph(*packages, cache_dir=None)
    modules = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in modules:
        if module not in index:
            visit(module)
    return cycles


def test_no_module_imports_itself_back_through_others() -> None:
    assert import_cycles(PACKAGES) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "circle"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from circle import b\n")
    (package / "b.py").write_text("def f():\n    from circle import a\n")
    (package / "c.py").write_text("from circle import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles(("circle",)) == [["circle.a", "circle.b"]]


def test_no_source_module_is_over_600_lines() -> None:
    sources = [*(REPO / "operator").rglob("*.py"), *(REPO / "trainer").rglob("*.py")]
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in sources}
    assert sizes, "no sources found"
    assert {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES} == {}
