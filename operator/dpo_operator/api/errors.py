"""Errors users can act on: one line per problem, led by the field path, with what was wrong
and what to do.
"""

from __future__ import annotations

import difflib
import re

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from dpo_operator.api.grammar import PATTERN_HINTS, printable_name
from dpo_operator.api.job import DPOJob
from dpo_operator.api.limits import REMOVED_FIELDS


def describe_errors(error: ValidationError) -> list[str]:
    """One line per problem: the field path, what was wrong and what to do."""
    return [line for detail in error.errors() for line in _describe(detail)]


_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}
_TYPE_NAMES = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list, e.g. [a, b]",
    "dict_type": "a mapping",
    "model_type": "a mapping of fields",
    "model_attributes_type": "a mapping of fields",
}


def _describe(detail: ErrorDetails) -> list[str]:
    loc = [str(part) for part in detail["loc"]]
    path = ".".join(printable_name(part) for part in loc) or "(document)"
    kind = detail["type"]
    value = detail.get("input")
    context = detail.get("ctx", {})
    if kind == "extra_forbidden":
        field = loc[-1]
        if field in REMOVED_FIELDS:
            return [f"{path}: {REMOVED_FIELDS[field]}"]
        allowed = _allowed_fields(loc[:-1])
        hint = difflib.get_close_matches(field, allowed, n=1)
        suggestion = f"did you mean {hint[0]}? " if hint else ""
        return [f"{path}: unknown field; {suggestion}allowed here: {', '.join(sorted(allowed))}"]
    if kind == "missing":
        return [f"{path}: required field is missing; add it (see examples/ for a full DPOJob)"]
    if kind == "string_pattern_mismatch":
        pattern = str(context.get("pattern", ""))
        expected = PATTERN_HINTS.get(pattern, f"match {pattern}")
        return [f"{path}: {_short(value)} is not valid here; write {expected}"]
    if kind in _BOUNDS:
        key, symbol = _BOUNDS[kind]
        return [f"{path}: must be {symbol} {context.get(key)}, got {_short(value)}{_about(loc)}"]
    if kind in _TYPE_NAMES:
        return [f"{path}: must be {_TYPE_NAMES[kind]}, got {_short(value)}{_about(loc)}"]
    message = detail["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        # Cross-field rules report several problems, one per line, each led by its own path.
        return [_at(loc, line) for line in message.split("\n")]
    return [f"{path}: {message}, got {_short(value)}"]


def _at(loc: list[str], line: str) -> str:
    """A rule's problem line, under the path of the model that reported it."""
    path = ".".join(printable_name(part) for part in loc)
    if not re.match(r"^[a-zA-Z.]+: ", line):
        return f"{path or '(document)'}: {line}"
    return f"{path}.{line}" if path else line


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    """The model class at `loc` inside a DPOJob (list indexes skipped), if any."""
    model: type[BaseModel] = DPOJob
    for part in loc:
        if part.isdigit():
            continue
        field = _field(model, part)
        nested = _model_type(field.annotation) if field else None
        if nested is None:
            return None
        model = nested
    return model


def _field(model: type[BaseModel], name: str) -> FieldInfo | None:
    return next((f for key, f in model.model_fields.items() if name in (key, f.alias)), None)


def _allowed_fields(loc: list[str]) -> list[str]:
    """The field names (aliases) allowed at `loc`, for suggestions."""
    model = _model_at(loc)
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _about(loc: list[str]) -> str:
    """The field's own description, as a reminder of what it is for."""
    names = [part for part in loc if not part.isdigit()]
    model = _model_at(names[:-1]) if names else None
    field = _field(model, names[-1]) if model else None
    return f" ({field.description.rstrip('.')})" if field and field.description else ""


def _model_type(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_type(arg)
        if found is not None:
            return found
    return None
