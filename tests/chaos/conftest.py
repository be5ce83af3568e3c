"""The chaos tier: faults injected on a real control plane of its own (the API server is killed
here, which no other tier should see). Each test records what it injected; the session ends
with the table of faults injected, survived and data lost."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster.control_plane import ControlPlane, Kubelet, Operator


@dataclass
class Outcome:
    fault: str
    injected: int
    survived: bool = False
    lost: int = 0  # runs whose result (phase, gate verdict, promotion record) was lost or wrong


LEDGER: list[Outcome] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.chaos)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not LEDGER:
        return
    width = max(len(o.fault) for o in LEDGER)
    terminalreporter.section("chaos: faults injected on the real control plane")
    terminalreporter.write_line(f"{'fault':<{width}}  injected  survived  data lost")
    for o in LEDGER:
        survived = "yes" if o.survived else "NO"
        terminalreporter.write_line(
            f"{o.fault:<{width}}  {o.injected:>8}  {survived:>8}  {o.lost:>9}"
        )
    total = sum(o.injected for o in LEDGER)
    held = sum(o.injected for o in LEDGER if o.survived)
    lost = sum(o.lost for o in LEDGER)
    terminalreporter.write_line(f"{'total':<{width}}  {total:>8}  {held:>8}  {lost:>9}")


@pytest.fixture(scope="session")
def chaos_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with ControlPlane.with_crd(tmp_path_factory.mktemp("chaos-plane")) as plane:
        yield plane


@pytest.fixture(scope="session")
def kubelet(chaos_plane: ControlPlane) -> Kubelet:
    return Kubelet(chaos_plane)


@pytest.fixture(scope="session")
def operator(chaos_plane: ControlPlane) -> Iterator[Operator]:
    running = Operator(chaos_plane, log="chaos-operator.log").start()
    try:
        yield running
    finally:
        running.kill()


@pytest.fixture
def outcome(request: pytest.FixtureRequest) -> Outcome:
    """The test's row of the table; the test marks it survived once every check held."""
    callspec = getattr(request.node, "callspec", None)
    name = callspec.id if callspec else request.node.name.removeprefix("test_").replace("_", " ")
    row = Outcome(name, 0)
    LEDGER.append(row)
    return row
