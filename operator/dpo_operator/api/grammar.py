"""One grammar per kind of input, used by every field of that kind: names, quantities,
parameter counts, storage URIs and promotion targets, environment variable names, label keys,
and the path rule every URI obeys. Each pattern has the hint an error shows (PATTERN_HINTS).
"""

from __future__ import annotations

import json
import re
from typing import Annotated

from dpo_contract import oci
from dpo_contract.fields import STORE_SCHEMES
from dpo_contract.pod import CONTRACT_ENV
from pydantic import Field, WithJsonSchema

from dpo_operator.api.cel import Rule
from dpo_operator.api.meta import NAMESPACE_PATTERN

# Pod hostnames are `<name>-train-<attempt>-<index>` and must fit a 63-character DNS label:
# 63 - len("-train-") - 3 attempt digits - 1 - 3 index digits = 49.
MAX_NAME_LENGTH = 49
MAX_NODES = 512
MAX_RESTARTS = 100
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

# Kubernetes resource.Quantity, as the core API's own OpenAPI schema writes it.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY = re.compile(QUANTITY_PATTERN)


def check_quantity(value: str | int) -> str:
    text = str(value)
    if text.startswith(("-", "+")) or not _QUANTITY.match(text):
        raise ValueError(
            f"{value!r} is not a Kubernetes quantity; write e.g. 8, 500m, 64Gi or 1.5Ti"
        )
    return text


_QUANTITY_SUFFIXES = {
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "Pi": 1 << 50,
    "Ei": 1 << 60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "m": 10**-3,
}


def parse_quantity(value: str | int) -> int:
    """A valid Kubernetes quantity as a whole number (bytes, for memory)."""
    text = str(value)
    number = re.match(r"^[0-9.]+(?:[eE][+-]?[0-9]+)?", text)
    assert number is not None, f"{text!r} was validated as a quantity"
    suffix = text[number.end() :]
    return int(float(number.group()) * _QUANTITY_SUFFIXES.get(suffix, 1))


# A parameter count: 70B, 8.03B, 500M, or a plain integer.
PARAMETER_COUNT_PATTERN = r"^[0-9]+(\.[0-9]+)?[KMBT]?$"
_PARAMETER_SCALE = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
ParameterCount = Annotated[
    str | int,
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": PARAMETER_COUNT_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]


def parse_parameter_count(value: str | int) -> int:
    text = str(value)
    return int(float(text.rstrip("KMBT")) * _PARAMETER_SCALE[text[len(text.rstrip("KMBT")) :]])


Quantity = Annotated[
    str | int,
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]

# Storage URIs for outputs: a PersistentVolumeClaim or an object store. A local path would live in
# the container's own filesystem and vanish with the pod.
STORAGE_URI_PATTERN = r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|(s3|gs|gcs|az|abfs)://.+)$"
StorageUri = Annotated[str, Field(min_length=1, max_length=1024, pattern=STORAGE_URI_PATTERN)]
_STORAGE_URI_HINT = "use pvc://<claim>/<path> or an object store URI (s3://, gs://, az://)"
# A promotion target may also be an OCI repository: the version is its tag, so none is given.
PROMOTION_TARGET_PATTERN = (
    STORAGE_URI_PATTERN[:-2] + f"|oci://{oci.REGISTRY_PATTERN}/{oci.REPOSITORY_PATTERN})$"
)
PromotionTarget = Annotated[
    str, Field(min_length=1, max_length=1024, pattern=PROMOTION_TARGET_PATTERN)
]
_PROMOTION_TARGET_HINT = (
    "use pvc://<claim>/<path>, an object store URI (s3://, gs://, az://) or an OCI repository "
    "(oci://<registry>[:<port>]/<repository>, lower case, no tag)"
)

# The pod contract's own variables: no env source of the user's may set one.
RESERVED_ENV = CONTRACT_ENV
_RESERVED_ENV_LIST = "[" + ", ".join(f"'{name}'" for name in RESERVED_ENV) + "]"


def no_contract_env(field: str, item: str, fix: str) -> Rule:
    """The env rule, for every env source: `field` (a list whose entries' `item` is the name,
    or a map: item "") sets none of the pod contract's variables."""
    name = f"e.{item}" if item else "e"
    return Rule(
        f"!has(self.{field}) || self.{field}.all(e, !({name} in {_RESERVED_ENV_LIST}))",
        "may not set the pod contract's variables, which the operator sets ("
        + ", ".join(RESERVED_ENV)
        + f"); {fix}",
        f".{field}",
    )


# A name vLLM serves a model under: printed as an argument of `vllm serve` and written into
# adapter_config.json and OCI annotations, so never a flag (a leading '-'), never a space or a
# control character.
SERVED_NAME_PATTERN = r"^[A-Za-z0-9_][-A-Za-z0-9_./:@+=]*$"
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
EnvName = Annotated[str, Field(min_length=1, max_length=128, pattern=ENV_NAME_PATTERN)]
K8S_NAME_PATTERN = r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$"
K8sName = Annotated[str, Field(min_length=1, max_length=253, pattern=K8S_NAME_PATTERN)]
# Resource names, label keys: an optional DNS-subdomain prefix, '/', then a name.
QUALIFIED_NAME_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
QualifiedName = Annotated[str, Field(min_length=1, max_length=316, pattern=QUALIFIED_NAME_PATTERN)]
LabelMap = Annotated[dict[str, Annotated[str, Field(max_length=253)]], Field(max_length=64)]
# A label key: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters
# (no backslash: it is read by CEL too).
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
# A label value, as the API server checks one: empty, or alphanumerics with '-', '_', '.' inside.
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# The longest time the operator counts (a deadline, a TTL): ten years. Kubernetes takes int64,
# but a date that far ahead overflows the operator's clock arithmetic.
MAX_DURATION_SECONDS = 10 * 366 * 86400

# One URI grammar for every URI field (model, reference, data, output, promotion): no '..'
# segment (a path that climbs out of the claim, bucket or work directory it names; a '.' one
# only as a leading './'), no userinfo (credentials come from Secrets: a URI is written in clear
# into the ConfigMap, the status, Events and the serve line), and a port, if any, that exists.
_TRAVERSAL = "(^|/)[.][.](/|$)|/[.](/|$)"
_USERINFO = "^[A-Za-z][-+.A-Za-z0-9]*://[^/]*@"
_BAD_PORT = (
    "^[A-Za-z][-+.A-Za-z0-9]*://[^/@]*:"
    "([0-9]{6,}|6553[6-9]|655[4-9][0-9]|65[6-9][0-9][0-9]|6[6-9][0-9]{3}|[7-9][0-9]{4}|0+)(/|$)"
)


_SOURCE_SCHEMES = "|".join(("pvc", *STORE_SCHEMES))
_SOURCE_SCHEMES_SAID = ", ".join(f"{scheme}://" for scheme in ("pvc", *STORE_SCHEMES))


def source_scheme_rule(field: str) -> Rule:
    """Where models and data are read from: a hub id or a path, or a URI of a scheme the
    trainer reads (the per-field allowlist of the URI grammar; outputs and promotion targets
    have their own patterns)."""
    return Rule(
        f"!has(self.{field}) || !self.{field}.contains('://') || "
        f"self.{field}.matches('^({_SOURCE_SCHEMES})://')",
        f"is read from a hub id, a path or a URI of {_SOURCE_SCHEMES_SAID}; the trainer has no "
        "reader for another scheme: copy the files to one of these",
        f".{field}",
    )


def uri_rules(field: str) -> tuple[Rule, ...]:
    """The URI grammar's rules for the URI field `field` (optional or not)."""
    present = f"!has(self.{field}) || "
    return (
        Rule(
            f"{present}!self.{field}.matches('{_TRAVERSAL}')",
            "may not contain '..' (or '.') path segments: name the path inside the claim, "
            "bucket or directory directly",
            f".{field}",
        ),
        Rule(
            f"{present}!self.{field}.matches('{_USERINFO}')",
            "may not carry credentials (user:secret@): they would be written in clear into the "
            "ConfigMap, status and Events; put them in a Secret (output.credentialsSecret, "
            "spec.secrets)",
            f".{field}",
        ),
        Rule(
            f"{present}!self.{field}.matches('{_BAD_PORT}')",
            "has a port outside 1..65535",
            f".{field}",
        ),
    )


def explain_uri(value: object, pattern: str, what: str) -> object:
    if isinstance(value, str) and not re.match(pattern, value):
        raise ValueError(f"{value!r} is not a {what}: {PATTERN_HINTS[pattern]}")
    return value


PATTERN_HINTS = {
    NAMESPACE_PATTERN: "a namespace: lowercase letters, digits and '-' (an RFC 1123 label)",
    NAME_PATTERN: "lowercase letters, digits and '-', starting with a letter",
    K8S_NAME_PATTERN: "a Kubernetes object name: lowercase letters, digits, '-' and '.'",
    QUALIFIED_NAME_PATTERN: "a resource name or label key such as nvidia.com/gpu",
    ENV_NAME_PATTERN: "an environment variable name such as HF_TOKEN",
    SERVED_NAME_PATTERN: "a served model name such as meta-llama/Llama-3.1-8B: letters, digits "
    "and -_./:@+=, not starting with '-' or '.'",
    QUANTITY_PATTERN: "a Kubernetes quantity such as 8, 500m or 64Gi",
    PARAMETER_COUNT_PATTERN: "a parameter count such as 70B, 8.03B or 500M",
    STORAGE_URI_PATTERN: _STORAGE_URI_HINT,
    PROMOTION_TARGET_PATTERN: _PROMOTION_TARGET_HINT,
}


def printable_name(name: str) -> str:
    """A field name as an error line can show it: odd ones (spaces, control characters, an
    empty name) quoted and escaped, so that one problem stays one line."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)
