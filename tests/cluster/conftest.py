"""The cluster tier: one real control plane per test session, torn down even when tests fail."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.control_plane import ControlPlane, Kubelet


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane.start(tmp_path_factory.mktemp("control-plane"))
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kubelet(control_plane: ControlPlane) -> Kubelet:
    return Kubelet(control_plane)


@pytest.fixture(scope="session")
def crd_installed(control_plane: ControlPlane) -> ControlPlane:
    control_plane.install_crd()
    return control_plane
