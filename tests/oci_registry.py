"""A real OCI registry for the tests: Debian's docker-registry (distribution 2.8), installed by
`make test` (the Makefile's `registry` target), storing blobs on disk under the test's folder.

`oci_registry` is anonymous; `oci_registry_with_login` takes only the one htpasswd user, so a
push or pull without OCI_USERNAME/OCI_PASSWORD is refused as a user would be refused.
Distribution 2.8 has no referrers API: the gate report reaches the adapter through the
fallback tag, the path most registries in the field still need.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from dpo_operator.local.kubelet import free_port

from tests.servers import stop, wait_until_ready

DOCKER_REGISTRY = Path("/usr/bin/docker-registry")
USERNAME = "dpo-pusher"
PASSWORD = "dpo-test-registry-password"
START_TIMEOUT = 30


@dataclass
class OciRegistry:
    """A running docker-registry on 127.0.0.1:`port`."""

    workdir: Path
    port: int
    process: subprocess.Popen[bytes]
    login: bool

    @classmethod
    def start(cls, workdir: Path, *, login: bool = False) -> OciRegistry:
        if not DOCKER_REGISTRY.exists():
            pytest.fail(f"{DOCKER_REGISTRY} missing: `make registry` installs Debian's package")
        port = free_port()
        config: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "info"},
            "storage": {
                "filesystem": {"rootdirectory": str(workdir / "storage")},
                "delete": {"enabled": True},
            },
            "http": {"addr": f"0.0.0.0:{port}"},
        }
        if login:
            import bcrypt

            hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()
            (workdir / "htpasswd").write_text(f"{USERNAME}:{hashed}\n")
            config["auth"] = {"htpasswd": {"realm": "dpo-tests", "path": str(workdir / "htpasswd")}}
        (workdir / "config.yml").write_text(yaml.safe_dump(config))
        process = subprocess.Popen(
            [str(DOCKER_REGISTRY), "serve", str(workdir / "config.yml")],
            stdout=(workdir / "registry.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        registry = cls(workdir, port, process, login)
        registry._wait_ready()
        return registry

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait_ready(self) -> None:
        wait_until_ready("docker-registry", self.process, self._answers, self.log, START_TIMEOUT)

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2).close()
            return True
        except urllib.error.HTTPError as error:
            return error.code == 401  # up, and asking for the login it was given
        except OSError:
            return False

    def log(self) -> str:
        return (self.workdir / "registry.log").read_text(errors="replace")

    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps a blob on disk (distribution's filesystem layout)."""
        hex_digest = digest.removeprefix("sha256:")
        return (
            self.workdir
            / "storage/docker/registry/v2/blobs/sha256"
            / hex_digest[:2]
            / hex_digest
            / "data"
        )

    def stop(self) -> None:
        stop(self.process)
        shutil.rmtree(self.workdir / "storage", ignore_errors=True)


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OciRegistry]:
    registry = OciRegistry.start(tmp_path_factory.mktemp("oci-registry"))
    try:
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def oci_registry_with_login(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OciRegistry]:
    registry = OciRegistry.start(tmp_path_factory.mktemp("oci-registry-login"), login=True)
    try:
        yield registry
    finally:
        registry.stop()
