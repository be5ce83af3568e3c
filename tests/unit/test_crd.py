"""The generated CustomResourceDefinition: current, structural, documented and strict."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, get_args

import pytest
import yaml
from dpo_operator.api import DPOJob
from dpo_operator.api.crd import crd_manifest, openapi_schema
from dpo_operator.cli.main import main
from pydantic import BaseModel

from tests.conftest import REPO

# The keys of apiextensions.k8s.io/v1 JSONSchemaProps a generated schema may use. Anything else
# (propertyNames, $defs, const, ...) makes the API server refuse the whole CRD.
JSON_SCHEMA_PROPS = {
    "description",
    "type",
    "format",
    "default",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "maxItems",
    "minItems",
    "multipleOf",
    "enum",
    "maxProperties",
    "minProperties",
    "required",
    "items",
    "anyOf",
    "properties",
    "additionalProperties",
    "nullable",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-map-type",
}


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from walk(schema[key], f"{path}[]")


def test_committed_crd_is_what_dpo_crd_generates(capsys: Any) -> None:
    assert main(["crd"]) == 0
    generated = capsys.readouterr().out
    committed = (REPO / "crds" / "dpojob.yaml").read_text()
    assert committed == generated, "crds/ is stale: run `dpo crd > crds/dpojob.yaml`"


def test_crd_names_group_version_and_short_name() -> None:
    crd = crd_manifest()
    assert crd["metadata"]["name"] == "dpojobs.dpo.dev"
    assert crd["spec"]["group"] == "dpo.dev"
    assert crd["spec"]["names"]["kind"] == "DPOJob"
    assert crd["spec"]["names"]["shortNames"] == ["dpo"]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}


def test_printer_columns_show_progress_and_gate() -> None:
    (version,) = crd_manifest()["spec"]["versions"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(columns) == [
        "Phase",
        "Nodes",
        "Step",
        "Progress",
        "Accuracy",
        "Margin",
        "Gate",
        "Age",
    ]
    assert columns["Progress"] == ".status.progress.summary"
    assert columns["Accuracy"] == ".status.metrics.rewardAccuracy"
    assert columns["Gate"] == ".status.evaluation.verdict"


def test_schema_uses_only_what_the_api_server_accepts() -> None:
    for path, node in walk(openapi_schema()):
        unknown = set(node) - JSON_SCHEMA_PROPS
        assert not unknown, f"{path or '<root>'} uses {unknown}"
        assert node.get("additionalProperties") is not False, f"{path}: not structural"


def test_every_node_is_typed_as_structural_schemas_require() -> None:
    for path, node in walk(openapi_schema()):
        if path == ".metadata":
            continue
        assert (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        ), f"{path} has no type"


def test_every_spec_field_is_documented_for_kubectl_explain() -> None:
    spec = openapi_schema()["properties"]["spec"]
    undocumented = [
        path
        for path, node in walk(spec, ".spec")
        if path.count(".") <= 3 and "[]" not in path and "description" not in node
    ]
    # Toleration and env entries mirror core Kubernetes types users already know.
    assert undocumented == [], undocumented


def test_status_is_strict_so_kopf_progress_lives_in_annotations() -> None:
    status = openapi_schema()["properties"]["status"]
    for path, node in walk(status, ".status"):
        assert not node.get("x-kubernetes-preserve-unknown-fields"), path
    assert "kopf" not in status["properties"]


def test_settings_groups_default_to_empty_so_their_defaults_apply() -> None:
    spec = openapi_schema()["properties"]["spec"]["properties"]
    for group in ("dpo", "peft", "resources", "parallelism", "network", "evalGate", "runPolicy"):
        assert spec[group]["default"] == {}, group
    assert "default" not in spec["promotion"], "promotion is optional and stays absent"
    assert spec["dpo"]["properties"]["beta"]["default"] == 0.1
    assert spec["dpo"]["properties"]["lossType"]["default"] == ["sigmoid"]


def test_cross_field_rules_are_enforced_by_the_api_server_too() -> None:
    schema = openapi_schema()
    spec_rules = " ".join(
        r["rule"] for r in schema["properties"]["spec"]["x-kubernetes-validations"]
    )
    for needle in (
        "'hsdp'",
        "self.resources.nodes > 1",
        "self.promotion.target.startsWith('s3://')",
        "has(self.promotion)",
    ):
        assert needle in spec_rules
    root_rules = [r["rule"] for r in schema["x-kubernetes-validations"]]
    assert any("self.metadata.name.size() <= 49" in r for r in root_rules)
    immutable = next(r for r in root_rules if "oldSelf" in r)
    assert "oldSelf.status.startTime" in immutable
    assert "self.spec.dpo == oldSelf.spec.dpo" in immutable
    assert "runPolicy" not in immutable, "suspend must stay changeable"


def test_crd_file_is_a_single_yaml_document() -> None:
    documents = list(yaml.safe_load_all((REPO / "crds" / "dpojob.yaml").read_text()))
    assert len(documents) == 1
    assert documents[0]["kind"] == "CustomResourceDefinition"


@pytest.mark.parametrize("name", ["dpojob.yaml", "dposweep.yaml"])
def test_the_charts_crds_are_the_generated_ones(name: str) -> None:
    chart_crd = REPO / "charts" / "dpo-operator" / "crds" / name
    assert chart_crd.read_text() == (REPO / "crds" / name).read_text(), (
        f"copy crds/{name} into charts/dpo-operator/crds/ (make crd does both)"
    )


def test_a_field_the_operator_may_write_as_null_is_nullable_or_optional() -> None:
    """The API server drops a null where the schema is not nullable: a required field written as
    null (a gate criterion with nothing to measure) failed every status write with "Required
    value"."""
    schema = openapi_schema()
    for path in _required_but_none_allowed(DPOJob, ""):
        node, parent, name = schema, schema, ""
        for name in path.strip(".").replace("[]", "").split("."):
            parent = node
            node = node["properties"][name]
            while "items" in node and "properties" not in node:
                node = node["items"]
        assert node.get("nullable") or name not in parent.get("required", []), path


def _required_but_none_allowed(model: type[BaseModel], path: str) -> Iterator[str]:
    for name, field in model.model_fields.items():
        at = f"{path}.{field.alias or name}"
        if field.is_required() and type(None) in get_args(field.annotation):
            yield at
        for nested in _models_in(field.annotation):
            if nested is not model:
                yield from _required_but_none_allowed(nested, at)


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from _models_in(arg)
