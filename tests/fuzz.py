"""Hostile DPOJob manifests for property tests: a valid example, then a few random edits (a
value replaced by any JSON value, a key removed, an unknown key added), anywhere in it."""

from __future__ import annotations

import copy
import re
from typing import Any

from hypothesis import strategies as st

from tests.conftest import MINIMAL, example_manifest

EXAMPLES = ("quickstart", "llama-8b-lora-infiniband", "full-finetune-hsdp-efa", "simpo", "tcpxo")

# Any JSON value, the ones that break code most often first.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", " ", "..", "../..", "pvc://x/../..", "s3://", "29500", "NaN", "💥"]),
    st.text(max_size=40),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=8,
)

# A line of `describe_errors`: the field it is about, then what is wrong.
PROBLEM_LINE = re.compile(r"^(\(document\)|apiVersion|kind|metadata|spec|status)([.][^\n]*?)?: \S")


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


def _edit(document: dict[str, Any], path: tuple[Any, ...], how: str, value: Any) -> None:
    if not path:
        return
    *parents, last = path
    node: Any = document
    for part in parents:
        node = node[part]
    if how == "remove":
        del node[last]
    elif how == "add" and isinstance(node[last], dict):
        node[last]["unknownField"] = value
    else:
        node[last] = value


@st.composite
def hostile_manifests(draw: st.DrawFn) -> dict[str, Any]:
    name = draw(st.sampled_from(("minimal", *EXAMPLES)))
    document = copy.deepcopy(MINIMAL) if name == "minimal" else example_manifest(name)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = _paths(document)[1:]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        _edit(document, path, draw(st.sampled_from(("replace", "remove", "add"))), draw(VALUES))
    return document
