"""Properties of the input grammar, one per kind of input and every field of that kind: any
credentials or '..' in any URI field is refused naming that field; any pod contract variable in
any env source is refused naming that source; any namespace `dpo validate` accepts, the API
server would, and `dpo run` keeps its files inside its work directory."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from dpo_contract.pod import CONTRACT_ENV
from dpo_operator.api import describe_errors
from dpo_operator.api.grammar import MAX_DURATION_SECONDS
from dpo_operator.api.meta import NAMESPACE_PATTERN
from dpo_operator.core.render import trainer_config
from dpo_operator.core.resolve import resolve
from dpo_operator.core.validate import parse_dpojob
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.conftest import minimal_manifest, set_fields

# Every URI field: where it is set, and the field an error names.
URI_FIELDS = {
    "model.name": "spec.model.name",
    "model.reference": "spec.model.reference.name",
    "data.train": "spec.data.train.uri",
    "data.eval": "spec.data.eval.uri",
    "evalGate.data": "spec.evalGate.data.uri",
    "evalGate.anchorData": "spec.evalGate.anchorData.uri",
    "output.uri": "spec.output.uri",
    "promotion.target": "spec.promotion.target",
}
SCHEMES = ("s3", "gs", "az", "pvc")
SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=8)
FAST = settings(max_examples=60, deadline=None, derandomize=True)


def with_uri(field: str, uri: str) -> dict[str, Any]:
    value: Any = uri
    if field in ("model.reference",):
        value = {"name": uri}
    elif field.startswith(("data.", "evalGate.")):
        value = {"uri": uri}
    return set_fields(minimal_manifest(), **{field: value})


def problems_of(manifest: dict[str, Any]) -> list[str]:
    try:
        parse_dpojob(manifest)
    except ValidationError as error:
        return describe_errors(error)
    return []


@FAST
@given(
    field=st.sampled_from(sorted(URI_FIELDS)),
    scheme=st.sampled_from(SCHEMES),
    user=SEGMENT,
    secret=SEGMENT,
    path=st.lists(SEGMENT, min_size=1, max_size=3),
)
def test_credentials_in_any_uri_field_are_refused_naming_it(
    field: str, scheme: str, user: str, secret: str, path: list[str]
) -> None:
    uri = f"{scheme}://{user}:{secret}@{'/'.join(path)}"
    said = [p for p in problems_of(with_uri(field, uri)) if p.startswith(URI_FIELDS[field])]
    assert said, f"{field}={uri} was accepted"


@FAST
@given(
    field=st.sampled_from(sorted(URI_FIELDS)),
    scheme=st.sampled_from(SCHEMES),
    before=st.lists(SEGMENT, min_size=1, max_size=3),
    after=st.lists(SEGMENT, max_size=3),
)
def test_a_dotdot_segment_in_any_uri_field_is_refused_naming_it(
    field: str, scheme: str, before: list[str], after: list[str]
) -> None:
    uri = f"{scheme}://" + "/".join([*before, "..", *after])
    said = [p for p in problems_of(with_uri(field, uri)) if p.startswith(URI_FIELDS[field])]
    assert said, f"{field}={uri} was accepted"


# Every env source, as a manifest that sets `name` through it.
ENV_SOURCES = {
    "spec.env": lambda name: {"env": [{"name": name, "value": "x"}]},
    "spec.secrets": lambda name: {
        "secrets": [{"name": name, "secretKeyRef": {"name": "s", "key": "k"}}]
    },
    "spec.network.env": lambda name: {"network.env": {"NCCL_DEBUG": "WARN", name: "x"}},
}


@pytest.mark.parametrize("source", sorted(ENV_SOURCES))
@pytest.mark.parametrize("name", CONTRACT_ENV)
def test_every_contract_variable_is_refused_in_every_env_source(source: str, name: str) -> None:
    manifest = set_fields(minimal_manifest(), **ENV_SOURCES[source](name))
    said = [p for p in problems_of(manifest) if p.startswith(f"{source}: ")]
    assert said, f"{source} may set {name}"
    assert "may not set the pod contract's variables" in said[0]


NAMESPACES = st.one_of(
    st.text(alphabet="abcz09-./_A ", max_size=70),
    st.sampled_from(["..", "../../..", "a/b", "-a", "a-", "default", "x" * 63, "x" * 64]),
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(namespace=NAMESPACES)
def test_a_namespace_dpo_validate_accepts_the_api_server_accepts_and_dpo_run_keeps_inside(
    namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    manifest = minimal_manifest()
    manifest["metadata"]["namespace"] = namespace
    said = problems_of(manifest)
    if said:
        assert any(p.startswith("metadata.namespace: ") for p in said), said
        return
    assert re.fullmatch(NAMESPACE_PATTERN, namespace)
    assert len(namespace) <= 63
    job = parse_dpojob(manifest)
    root = tmp_path_factory.getbasetemp() / "volumes"
    claim_paths = {claim: str(root / claim) for claim in resolve(job).claims}
    config = trainer_config(resolve(job), claim_paths)
    assert Path(config.artifacts_dir).resolve().is_relative_to(root.resolve())


# Every bounded integer, at its consumer's bound: (field, the last value taken, the error's field).
BOUNDS = [
    ("dpo.seed", 2**32 - 1, "spec.dpo.seed"),
    (
        "runPolicy.activeDeadlineSeconds",
        MAX_DURATION_SECONDS,
        "spec.runPolicy.activeDeadlineSeconds",
    ),
    (
        "runPolicy.ttlSecondsAfterFinished",
        MAX_DURATION_SECONDS,
        "spec.runPolicy.ttlSecondsAfterFinished",
    ),
    ("monitoring.port", 65535, "spec.monitoring.port"),
]


@pytest.mark.parametrize(("field", "bound", "named"), BOUNDS, ids=[b[0] for b in BOUNDS])
def test_every_bounded_integer_takes_its_bound_and_refuses_one_past_it(
    field: str, bound: int, named: str
) -> None:
    assert not problems_of(set_fields(minimal_manifest(), **{field: bound}))
    said = problems_of(set_fields(minimal_manifest(), **{field: bound + 1}))
    assert [p for p in said if p.startswith(f"{named}: ")], said


@pytest.mark.parametrize(("port", "taken"), [(65535, True), (65536, False), (0, False), (1, True)])
def test_a_registry_port_is_taken_only_within_1_to_65535(port: int, taken: bool) -> None:
    target = f"oci://registry.example:{port}/team/adapters"
    said = problems_of(set_fields(minimal_manifest(), promotion={"target": target}))
    assert (not said) is taken, said
