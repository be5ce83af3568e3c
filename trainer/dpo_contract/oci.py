"""The OCI artifact format of a promoted adapter: references (oci://REGISTRY/REPOSITORY[:TAG]
[@DIGEST]), media types and annotation keys. The operator validates promotion targets with these
patterns; the trainer's OCI client (`dpo_trainer.publish.oci`) pushes and pulls with them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dpo_contract.pod import BadInputError

SCHEME = "oci://"
ADAPTER_ARTIFACT_TYPE = "application/vnd.dpo.lora-adapter.v1"
GATE_REPORT_ARTIFACT_TYPE = "application/vnd.dpo.gate-report.v1+json"
IMAGE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
IMAGE_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG_DATA = b"{}"
JSON_FILE = "application/json"
BINARY_FILE = "application/octet-stream"

TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"
VERSION = "org.opencontainers.image.version"
BASE_MODEL = "dev.dpo.base-model"
ADAPTER_DIGEST = "dev.dpo.adapter-digest"
GATE_VERDICT = "dev.dpo.gate-verdict"
LORA_RANK = "dev.dpo.lora-rank"
JOB = "dev.dpo.job"
JOB_UID = "dev.dpo.job-uid"
ARTIFACT_CHECKS = "dev.dpo.artifact-checks"

CURRENT_TAG = "current"
EVAL_REPORT_TITLE = "eval.json"
USERNAME_ENV = "OCI_USERNAME"
PASSWORD_ENV = "OCI_PASSWORD"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REGISTRY_PATTERN = r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?"
REPOSITORY_PATTERN = rf"{_COMPONENT}(?:/{_COMPONENT})*"
REFERENCE_PATTERN = re.compile(
    rf"^oci://(?P<registry>{REGISTRY_PATTERN})/(?P<repository>{REPOSITORY_PATTERN})"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)
REFERENCE_HINT = "oci://REGISTRY[:PORT]/REPOSITORY[:TAG][@sha256:DIGEST], lower-case repository"


def is_oci(uri: str) -> bool:
    return uri.startswith(SCHEME)


@dataclass(frozen=True)
class Reference:
    """oci://registry/repository, optionally one tag or digest of it."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, uri: str) -> Reference:
        match = REFERENCE_PATTERN.match(uri)
        if match is None:
            raise BadInputError(f"{uri!r} is not an OCI reference: use {REFERENCE_HINT}")
        return cls(match["registry"], match["repository"], match["tag"], match["digest"])

    @property
    def repository_uri(self) -> str:
        return f"{SCHEME}{self.registry}/{self.repository}"

    def at(self, digest: str) -> str:
        return f"{self.repository_uri}@{digest}"

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{self.repository_uri}{tag}{digest}"
