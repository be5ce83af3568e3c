"""A rendered object, and the YAML `dpo render` prints."""

from __future__ import annotations

from typing import Any

import yaml

Manifest = dict[str, Any]


class _BlockStyleDumper(yaml.SafeDumper):
    """Writes multi-line strings (trainer.json, accelerate.yaml) as readable `|` blocks."""


def _str_representer(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockStyleDumper.add_representer(str, _str_representer)


def to_yaml(objects: list[Manifest]) -> str:
    return yaml.dump_all(objects, Dumper=_BlockStyleDumper, sort_keys=False, width=100)
