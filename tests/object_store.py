"""A real S3 server for the tests: SeaweedFS, built from the Go module proxy by
tools/build-control-plane.sh, with one identity (access key and secret) and nothing anonymous.

One per test session (`object_store`, registered in tests/conftest.py). It listens on every
address, so pods on the pod runner's bridge reach it through the bridge's gateway.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError
from dpo_operator.local.kubelet import free_port

from tests.cluster.control_plane import WEED, ensure_binaries
from tests.servers import stop, wait_until_ready

ACCESS_KEY = "dpo-test-access-key"
SECRET_KEY = "dpo-test-secret-key"
REGION = "us-east-1"
START_TIMEOUT = 60


@dataclass
class ObjectStore:
    """A running SeaweedFS with its S3 gateway on `port`."""

    workdir: Path
    port: int
    process: subprocess.Popen[bytes]

    @classmethod
    def start(cls, workdir: Path) -> ObjectStore:
        ensure_binaries()
        data = workdir / "data"
        data.mkdir(parents=True)
        identities = {
            "identities": [
                {
                    "name": "dpo",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (workdir / "s3.json").write_text(json.dumps(identities))
        ports = {
            flag: free_port()
            for flag in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port",
                "s3.port.grpc",
            )
        }
        process = subprocess.Popen(
            [
                str(WEED),
                "server",
                f"-dir={data}",
                "-ip=127.0.0.1",
                "-ip.bind=0.0.0.0",
                *(f"-{flag}={port}" for flag, port in ports.items()),
                "-s3",
                f"-s3.config={workdir / 's3.json'}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                # Volumes are made lazily, several per bucket (a collection each): room for many.
                "-volume.max=200",
                "-master.volumeSizeLimitMB=64",
            ],
            stdout=(workdir / "weed.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        store = cls(workdir, ports["s3.port"], process)
        store._wait_ready()
        return store

    def _wait_ready(self) -> None:
        wait_until_ready("SeaweedFS", self.process, self._answers, self.log, START_TIMEOUT)

    def _answers(self) -> bool:
        """A bucket round trip, not just an open port: the filer and volume servers behind the
        gateway must be up too."""
        try:
            probe = f"ready-{uuid.uuid4().hex[:8]}"
            self.fs().mkdir(probe)
            self.fs().rm(probe, recursive=True)
            return True
        except (OSError, BotoCoreError):  # refused, or the gateway still starting
            return False

    def log(self) -> str:
        return (self.workdir / "weed.log").read_text(errors="replace")

    def stop(self) -> None:
        stop(self.process)
        shutil.rmtree(self.workdir / "data", ignore_errors=True)

    def env(self, host: str = "127.0.0.1") -> dict[str, str]:
        """What a pod's credentials Secret holds: the AWS SDK's own variables (the endpoint
        too, which botocore reads from AWS_ENDPOINT_URL), for the store reached at `host`."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": f"http://{host}:{self.port}",
        }

    def fs(self, *, anonymous: bool = False) -> Any:
        """An s3fs filesystem on this store, as the tests' own client (with the identity's
        credentials, or none)."""
        import s3fs

        credentials: dict[str, Any] = (
            {"anon": True} if anonymous else {"key": ACCESS_KEY, "secret": SECRET_KEY}
        )
        return s3fs.S3FileSystem(
            endpoint_url=f"http://127.0.0.1:{self.port}",
            client_kwargs={"region_name": REGION},
            skip_instance_cache=True,
            **credentials,
        )

    def bucket(self) -> str:
        """A new, empty bucket."""
        name = f"dpo-{uuid.uuid4().hex[:12]}"
        self.fs().mkdir(name)
        return name


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    store = ObjectStore.start(tmp_path_factory.mktemp("object-store"))
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture
def s3_env(object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    """This process's AWS variables pointed at the store, as a pod's Secret points it."""
    for name, value in object_store.env().items():
        monkeypatch.setenv(name, value)
    return object_store
