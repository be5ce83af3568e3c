"""Adapters as OCI artifacts on a real registry (Debian's docker-registry): what a promotion
pushes follows ORAS' conventions and carries its gate report as a referrer; what `dpo pull`
fetches is verified blob by blob, file by file, and refused when altered or never gated."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from dpo_contract.config import JobIdentity
from dpo_contract.manifest import write_manifest
from dpo_contract.oci import (
    ADAPTER_ARTIFACT_TYPE,
    ADAPTER_DIGEST,
    ARTIFACT_CHECKS,
    BASE_MODEL,
    GATE_REPORT_ARTIFACT_TYPE,
    GATE_VERDICT,
    LORA_RANK,
    TITLE,
)
from dpo_contract.pod import BadInputError
from dpo_trainer.publish.oci import pull_adapter, push_adapter
from dpo_trainer.publish.registry import Registry, fallback_tag
from dpo_trainer.publish.target import Publication

from tests.oci_registry import PASSWORD, USERNAME, OciRegistry
from tests.reports import gate_report
from tests.trainer.conftest import BIN

JOB = JobIdentity(name="quickstart", namespace="ml", uid="0f3c")
SERVED = "Qwen/Qwen2.5-0.5B-Instruct"


def adapter_folder(root: Path, seed: int = 0) -> tuple[Path, str]:
    """An adapter as training leaves it: config, weights, manifest.json; and its digest."""
    folder = root / f"adapter-{seed}"
    folder.mkdir(parents=True)
    settings = {"r": 16, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": SERVED}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(300_000))
    (folder / "tokenizer" / "nested").mkdir(parents=True)
    (folder / "tokenizer" / "nested" / "vocab.json").write_text(json.dumps({"seed": seed}))
    return folder, write_manifest(folder)


def push(adapter: Path, digest: str, version: str = "quickstart-v1") -> Publication:
    return Publication(
        adapter=adapter,
        adapter_digest=digest,
        version=version,
        served_model_name=SERVED,
        report=gate_report(digest),
        job=JOB,
    )


def repository(oci_registry: OciRegistry, name: str) -> str:
    return f"oci://{oci_registry.host}/adapters/{name}"


def test_a_promoted_adapter_is_an_oras_artifact_with_its_gate_report_as_a_referrer(
    oci_registry: OciRegistry, tmp_path: Path
) -> None:
    adapter, digest = adapter_folder(tmp_path)
    target = repository(oci_registry, "layout")
    pointer = push_adapter(target, push(adapter, digest), plain_http=True)

    registry = Registry(oci_registry.host, plain_http=True)
    assert pointer.uri.startswith(f"{target}@sha256:")
    manifest_digest = pointer.uri.rsplit("@", 1)[1]
    for reference in ("quickstart-v1", "current", manifest_digest):
        found = registry.fetch_manifest("adapters/layout", reference)
        assert found is not None, reference
        assert found[1] == manifest_digest, reference
    manifest = found[0]
    assert manifest["artifactType"] == ADAPTER_ARTIFACT_TYPE
    assert manifest["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    titles = {layer["annotations"][TITLE] for layer in manifest["layers"]}
    assert titles == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
        "tokenizer/nested/vocab.json",
    }
    annotations = manifest["annotations"]
    assert annotations[BASE_MODEL] == SERVED
    assert annotations[ADAPTER_DIGEST] == digest
    assert annotations[GATE_VERDICT] == "Passed"
    assert annotations[LORA_RANK] == "16"
    assert annotations[ARTIFACT_CHECKS] == (
        "shapes=pass,matchesTrained=pass,loraBTrained=pass,changesLogits=pass,baseModel=pass"
    )

    # distribution 2.8 has no referrers API: the report is indexed under the fallback tag.
    index = registry.fetch_manifest("adapters/layout", fallback_tag(manifest_digest))
    assert index is not None
    referrers = index[0]["manifests"]
    assert [r["artifactType"] for r in referrers] == [GATE_REPORT_ARTIFACT_TYPE]
    report = registry.fetch_manifest("adapters/layout", referrers[0]["digest"])
    assert report is not None
    assert report[0]["subject"]["digest"] == manifest_digest

    again = push_adapter(target, push(adapter, digest), plain_http=True)
    assert again.uri == pointer.uri, "the same adapter promoted twice is one artifact"


def test_dpo_pull_fetches_the_current_adapter_verified_and_names_its_gate(
    oci_registry: OciRegistry, tmp_path: Path
) -> None:
    target = repository(oci_registry, "pull")
    first, first_digest = adapter_folder(tmp_path, seed=1)
    second, second_digest = adapter_folder(tmp_path, seed=2)
    old = push_adapter(target, push(first, first_digest, "quickstart-one"), plain_http=True)
    push_adapter(target, push(second, second_digest, "quickstart-two"), plain_http=True)

    pulled = subprocess.run(
        [BIN / "dpo", "pull", target, str(tmp_path / "served"), "--plain-http"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert pulled.returncode == 0, pulled.stderr
    assert second_digest in pulled.stdout, pulled.stdout
    assert "gate Passed" in pulled.stdout, pulled.stdout
    for path in second.rglob("*"):
        if path.is_file():
            relative = path.relative_to(second)
            assert (tmp_path / "served" / relative).read_bytes() == path.read_bytes(), relative

    earlier = pull_adapter(old.uri, tmp_path / "earlier", plain_http=True)
    assert earlier.adapter_digest == first_digest
    assert earlier.version == "quickstart-one"
    assert earlier.gate.adapter_digest == first_digest


def test_a_blob_altered_in_the_registry_is_refused_and_nothing_is_left(
    oci_registry: OciRegistry, tmp_path: Path
) -> None:
    adapter, digest = adapter_folder(tmp_path, seed=3)
    target = repository(oci_registry, "damaged")
    push_adapter(target, push(adapter, digest), plain_http=True)
    manifest, _ = Registry(oci_registry.host, plain_http=True).fetch_manifest(
        "adapters/damaged", "current"
    ) or pytest.fail("nothing promoted")
    weights = next(
        layer
        for layer in manifest["layers"]
        if layer["annotations"][TITLE] == "adapter_model.safetensors"
    )
    stored = oci_registry.blob_file(weights["digest"])
    data = bytearray(stored.read_bytes())
    data[1000] ^= 0xFF
    stored.write_bytes(bytes(data))

    with pytest.raises(BadInputError, match=r"adapter_model\.safetensors.*damaged"):
        pull_adapter(target, tmp_path / "served", plain_http=True)
    assert not (tmp_path / "served").exists()
    assert not list(tmp_path.glob(".served-*")), "the staging folder was removed"


def test_an_adapter_without_a_passing_gate_report_cannot_be_pulled(
    oci_registry: OciRegistry, tmp_path: Path
) -> None:
    adapter, digest = adapter_folder(tmp_path, seed=4)
    target = repository(oci_registry, "ungated")
    rejected = push(adapter, digest)
    rejected = Publication(**{**rejected.__dict__, "report": gate_report(digest, "Rejected")})
    push_adapter(target, rejected, plain_http=True)
    with pytest.raises(BadInputError, match=r"no gate report passed .*found: Rejected"):
        pull_adapter(target, tmp_path / "served", plain_http=True)
    assert not (tmp_path / "served").exists()


def test_a_registry_with_a_login_refuses_anonymous_pushes_and_takes_the_credentials(
    oci_registry_with_login: OciRegistry, tmp_path: Path
) -> None:
    adapter, digest = adapter_folder(tmp_path, seed=5)
    target = f"oci://{oci_registry_with_login.host}/adapters/private"
    anonymous = Registry(oci_registry_with_login.host, plain_http=True, username=None)
    with pytest.raises(BadInputError, match="OCI_USERNAME and OCI_PASSWORD"):
        push_adapter(target, push(adapter, digest), registry=anonymous)

    signed_in = Registry(
        oci_registry_with_login.host, plain_http=True, username=USERNAME, password=PASSWORD
    )
    pointer = push_adapter(target, push(adapter, digest), registry=signed_in)
    wrong = Registry(
        oci_registry_with_login.host, plain_http=True, username=USERNAME, password="wrong"
    )
    with pytest.raises(BadInputError, match="401"):
        pull_adapter(pointer.uri, tmp_path / "nope", registry=wrong)
    pulled = pull_adapter(pointer.uri, tmp_path / "served", registry=signed_in)
    assert pulled.adapter_digest == digest
