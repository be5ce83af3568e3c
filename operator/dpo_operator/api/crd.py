"""Generates the CustomResourceDefinitions (DPOJob, DPOSweep) from the pydantic models in `api`.

Pydantic writes JSON Schema 2020-12; the API server wants a structural OpenAPI v3 schema. This
module inlines `$ref`s, turns optional unions into plain optional fields (nullable where null
is not the default), keeps scalar defaults
(so `kubectl get -o yaml` shows effective values) and gives nested groups a `{}` default so that
their own defaults, and the CEL rules that read them, always apply.
"""

from __future__ import annotations

from typing import Any

from dpo_operator.api import API_VERSION, GROUP, KIND, PLURAL, VERSION, DPOJob, RuledModel
from dpo_operator.api.sweep import SWEEP_KIND, SWEEP_PLURAL, DPOSweep

Schema = dict[str, Any]

_DROPPED_KEYS = {"title", "$defs", "discriminator"}

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Nodes", "type": "integer", "jsonPath": ".spec.resources.nodes"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.metrics.step"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
    {
        "name": "Accuracy",
        "type": "number",
        "jsonPath": ".status.metrics.rewardAccuracy",
        "description": "Latest training reward accuracy (share of pairs ranked correctly).",
    },
    {
        "name": "Margin",
        "type": "number",
        "jsonPath": ".status.metrics.rewardMargin",
        "description": "Latest mean reward margin (chosen - rejected).",
    },
    {"name": "Gate", "type": "string", "jsonPath": ".status.evaluation.verdict"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


SWEEP_PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Trials", "type": "integer", "jsonPath": ".status.total"},
    {"name": "Done", "type": "integer", "jsonPath": ".status.done"},
    {"name": "Running", "type": "integer", "jsonPath": ".status.running"},
    {
        "name": "Stopped",
        "type": "integer",
        "jsonPath": ".status.stopped",
        "description": "Trials stopped early: clearly worse than the best at an evaluation.",
    },
    {
        "name": "Best",
        "type": "string",
        "jsonPath": ".status.best",
        "description": "The gated trial with the highest held-out margin per beta so far.",
    },
    {"name": "Winner", "type": "integer", "jsonPath": ".status.winner"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd_manifest(kind: str = KIND) -> dict[str, Any]:
    """The CustomResourceDefinition object of `kind` (DPOJob or DPOSweep)."""
    if kind == SWEEP_KIND:
        return _crd(
            SWEEP_KIND, SWEEP_PLURAL, "dposweep", DPOSweep, SWEEP_PRINTER_COLUMNS, {"status": {}}
        )
    return _crd(KIND, PLURAL, "dpo", DPOJob, PRINTER_COLUMNS, {"status": {}})


def _crd(
    kind: str,
    plural: str,
    short_name: str,
    model: type[RuledModel],
    columns: list[dict[str, Any]],
    subresources: dict[str, Any],
) -> dict[str, Any]:
    version: dict[str, Any] = {"name": VERSION, "served": True, "storage": True}
    if subresources:
        version["subresources"] = subresources
    version["additionalPrinterColumns"] = columns
    version["schema"] = {"openAPIV3Schema": openapi_schema(model, kind)}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short_name],
            },
            "scope": "Namespaced",
            "versions": [version],
        },
    }


def openapi_schema(model: type[RuledModel] = DPOJob, kind: str = KIND) -> Schema:
    """The structural OpenAPI v3 schema of a DPOJob (or DPOSweep) object."""
    source = model.model_json_schema(by_alias=True, mode="validation")
    schema = _structural(source, source.get("$defs", {}))
    # The API server owns metadata's schema; a root CEL rule may still read metadata.name.
    schema["properties"]["metadata"] = {"type": "object"}
    schema["properties"]["apiVersion"] = {"type": "string", "enum": [API_VERSION]}
    schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
    # Status is written by the operator through the status subresource; creating an object
    # without one must stay possible.
    schema["required"] = ["spec"]
    return schema


def _structural(node: Schema, defs: dict[str, Schema]) -> Schema:
    if "$ref" in node:
        target = _structural(defs[node["$ref"].split("/")[-1]], defs)
        # The field's own description and default win over the referenced model's.
        return {**target, **{k: v for k, v in _scalars(node, defs).items() if k != "$ref"}}
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        options = [option for option in node["anyOf"] if option.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express union {node['anyOf']} in a structural schema")
        schema = {**_structural(options[0], defs), **_scalars(node, defs)}
        if len(options) < len(node["anyOf"]) and node.get("default") is not None:
            # null means something else than the default (a gate criterion turned off): without
            # nullable the API server would drop the null and fill in the default.
            schema["nullable"] = True
        return schema
    return _scalars(node, defs)


def _scalars(node: Schema, defs: dict[str, Schema]) -> Schema:
    int_or_string = bool(node.get("x-kubernetes-int-or-string"))
    out: Schema = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS or (key == "anyOf" and not int_or_string):
            continue
        if key == "default" and value is None:
            continue
        if key == "properties":
            required = set(node.get("required", ()))
            out[key] = {
                name: _field(
                    prop, defs, optional_group=name not in required and "default" not in prop
                )
                for name, prop in value.items()
            }
        elif key == "additionalProperties" and isinstance(value, bool):
            # `false` is not allowed in a structural schema; unknown fields are still refused,
            # since kubectl asks for strict server-side field validation by default. `true` (a
            # free-form map) is how Kubernetes spells x-kubernetes-preserve-unknown-fields.
            if value:
                out["x-kubernetes-preserve-unknown-fields"] = True
        elif key in ("items", "additionalProperties"):
            out[key] = _structural(value, defs)
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # JSON Schema 2020-12 numbers become OpenAPI v3.0's boolean form.
            out[key.replace("exclusiveM", "m")] = value
            out[key] = True
        else:
            out[key] = value
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
    if "enum" in out and "type" not in out:
        out["type"] = _enum_type(out["enum"])
    return out


def _field(prop: Schema, defs: dict[str, Schema], *, optional_group: bool) -> Schema:
    schema = _structural(prop, defs)
    if optional_group and schema.get("type") == "object" and "properties" in schema:
        # A settings group built by default in pydantic (default_factory) defaults to {} here
        # too, so its own defaults apply; groups that may be absent (default None) stay absent.
        schema["default"] = {}
    return schema


def _enum_type(values: list[Any]) -> str:
    if all(isinstance(v, bool) for v in values):
        return "boolean"
    if all(isinstance(v, int) for v in values):
        return "integer"
    return "string"
