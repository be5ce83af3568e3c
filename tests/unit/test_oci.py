"""OCI references as `dpo pull` and `promotion.target` read them."""

from __future__ import annotations

from pathlib import Path

import pytest
from dpo_contract.config import JobIdentity
from dpo_contract.oci import Reference
from dpo_contract.pod import BadInputError
from dpo_trainer.publish.oci import push_adapter
from dpo_trainer.publish.registry import fallback_tag
from dpo_trainer.publish.target import Publication

from tests.reports import gate_report


def test_a_reference_names_registry_repository_tag_and_digest() -> None:
    digest = "sha256:" + "a" * 64
    parsed = Reference.parse(f"oci://r.example:5000/team/adapters:v1@{digest}")
    assert parsed == Reference("r.example:5000", "team/adapters", "v1", digest)
    assert str(parsed) == f"oci://r.example:5000/team/adapters:v1@{digest}"
    other = "sha256:" + "b" * 64
    assert parsed.at(other) == f"oci://r.example:5000/team/adapters@{other}"
    assert fallback_tag(digest) == "sha256-" + "a" * 64


@pytest.mark.parametrize(
    "bad",
    [
        "oci://r.example/Team",
        "oci://r.example",
        "s3://bucket/x",
        "oci://r/x@md5:00",
        "oci://r/a//b",
    ],
)
def test_a_bad_reference_says_how_one_is_written(bad: str) -> None:
    with pytest.raises(BadInputError, match=r"is not an OCI reference: use oci://REGISTRY"):
        Reference.parse(bad)


def test_a_promotion_target_names_the_repository_and_no_tag() -> None:
    push = Publication(
        adapter=Path("."),
        adapter_digest="sha256:00",
        version="v1",
        served_model_name="m",
        report=gate_report("sha256:00"),
        job=JobIdentity(name="j", namespace="n", uid="u"),
    )
    with pytest.raises(BadInputError, match="name the repository only; the version is the tag"):
        push_adapter("oci://r.example/team/adapters:v1", push)
