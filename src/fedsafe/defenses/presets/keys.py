"""Dotted keys in nested config mappings, shared by the named defenses and the registry of them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def _lookup(data: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = data
    for part in dotted.split("."):
        if isinstance(node, BaseModel):
            if part not in node.model_fields_set:
                return False, None
            node = getattr(node, part)
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


def set_key(data: dict, dotted: str, value: Any) -> None:
    """Set a dotted key in a nested mapping, creating mappings (and turning section models into mappings)."""
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if isinstance(child, BaseModel):
            child = child.model_dump(mode="json", exclude_unset=True)
        elif not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[leaf] = value
