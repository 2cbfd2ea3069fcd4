"""Named defenses: ``defense: <name>`` in an experiment config stands for the config keys that make it.

A named defense is a combination of plug-ins with nothing of its own to compute, e.g. ``probe_posthoc`` (the
shadow probe every round, the post-hoc fine-tune after the last). Its entry in :data:`PRESETS` holds its
options (``defense.<field>``, a pydantic model) and a function that turns them into dotted config keys::

    defense: probe_posthoc                                       # or, with its options:
    defense: {name: probe_posthoc, decision: gap, rule: median, level: 1}

:func:`expand` runs when a config is loaded (:class:`fedsafe.config.ExperimentConfig`, before the sections are
validated), so the run is exactly the run with those keys set by hand, and ``fedsafe run --set
defense=probe_posthoc``, a grid's matrix entry and its ``settings: set:`` work as any other key. A key the
user set to another value than the defense's is refused with an error naming both, never silently
overridden. Which keys the user set: those in the mapping being validated, or, when the mapping is a
config's dump with overrides applied (``load_config`` with ``--set``, ``fedsafe grid``), the set passed as
validation context ``{EXPLICIT: keys}`` (:func:`editable_dump` and :func:`leaf_keys` compute it).

``dump_config`` writes the expanded keys, not ``defense`` (the field is excluded from ``model_dump``; a
comment line above them names it): the stored config loads back to the same run, the dump of a config with
``defense`` equals the dump of the same keys set by hand, and ``fedsafe grid`` shares training between a
``probe_posthoc`` setting and the same probe without post-hoc. ``--set defense=null`` (or a matrix entry
``{defense: null}``) over a config that has a defense switches it off: its keys take their defaults again.

Adding a named defense: an options model with ``name: Literal["<name>"]`` (unknown fields forbidden), a
function ``options -> {dotted key: value}``, and an entry in :data:`PRESETS`. This module stays free of
torch and numpy (configs are validated in light processes, e.g. a Flower query handler).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from fedsafe.defenses.presets import probe_posthoc
from fedsafe.defenses.presets.keys import _lookup, set_key  # noqa: F401  (set_key: part of the API)

#: validation-context key of :class:`fedsafe.config.ExperimentConfig`: the dotted keys the user set
EXPLICIT = "explicit_keys"


@dataclass(frozen=True)
class Preset:
    """A named defense: its options (``defense.<field>``) and the dotted config keys they expand to."""

    options: type[BaseModel]
    keys: Callable[..., dict[str, Any]]  # keys(**options without name) -> {dotted key: value}
    hints: dict[str, str] = field(default_factory=dict)  # dotted key -> the option that sets it (for errors)


PRESETS: dict[str, Preset] = {
    probe_posthoc.NAME: Preset(probe_posthoc.Options, probe_posthoc.preset,
                               {"aggregator.name": "rule", "probe.decision": "decision", "posthoc.level": "level"}),
}


def available() -> list[str]:
    """Names of the named defenses."""
    return sorted(PRESETS)


def normalize(spec: Any) -> dict[str, Any]:
    """``defense`` as the full mapping of its options (``{name, every option}``); ValueError naming the field."""
    choices = ", ".join(available())
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, BaseModel):
        spec = spec.model_dump(mode="json")
    if not isinstance(spec, dict):
        raise ValueError(f"defense: give a defense name ({choices}) or a mapping {{name: <defense>, ...options}}, "
                         f"got {spec!r}")
    name = spec.get("name")
    if name is None:
        raise ValueError(f"defense.name: missing; choose one of: {choices}")
    if name not in PRESETS:
        raise ValueError(f"defense: unknown defense {name!r}; choose one of: {choices}")
    options = PRESETS[name].options
    try:
        return options.model_validate(spec).model_dump(mode="json")
    except ValidationError as err:
        takes = ", ".join(f for f in options.model_fields if f != "name")
        msgs = []
        for e in err.errors():
            where = "defense." + ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                msgs.append(f"{where}: unknown field; {name} takes {takes}")
            else:
                msgs.append(f"{where}: {e['msg'].removeprefix('Value error, ')} (got {e['input']!r})")
        raise ValueError("; ".join(msgs)) from None


def keys_of(spec: Any) -> dict[str, Any]:
    """The dotted config keys a ``defense`` value expands to."""
    options = normalize(spec)
    return PRESETS[options["name"]].keys(**{k: v for k, v in options.items() if k != "name"})


def leaf_keys(data: Any, prefix: str = "") -> set[str]:
    """The dotted keys a (nested, possibly dotted-key) mapping sets: ``{a: {b: 1}, c.d: 2}`` -> ``{a.b, c.d}``."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json", exclude_unset=True)
    if not isinstance(data, dict) or not data:
        return {prefix} if prefix else set()
    out: set[str] = set()
    for key, value in data.items():
        out |= leaf_keys(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
    return out


def editable_dump(cfg) -> tuple[dict, set[str]]:
    """A loaded config as a mapping to apply overrides to, with its ``defense`` kept, and the keys its user set.

    ``model_dump`` also holds every default, which must not count as a user's choice when ``defense`` is
    added by an override. The keys a ``defense`` expanded to are the defense's, not the user's: they are left
    out of the mapping (so they take the defense's new options, or their defaults again after an override
    ``defense=null``) and out of the user's keys."""
    data = cfg.model_dump(mode="json")
    explicit = leaf_keys(cfg.model_dump(mode="json", exclude_unset=True))
    if cfg.defense is not None:
        data["defense"] = copy.deepcopy(cfg.defense)
        for key in keys_of(cfg.defense):
            explicit.discard(key)
            *parents, leaf = key.split(".")
            node: Any = data
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(leaf, None)
    return data, explicit


def expand(data: dict, explicit: set[str] | None = None) -> dict:
    """``data`` with its ``defense`` expanded into the keys it stands for (a copy; ``data`` if it has none).

    ``explicit`` is the set of dotted keys the user set (default: every key of ``data``); such a key set to
    another value than the defense's raises ValueError naming both. ``defense`` stays, as its full mapping."""
    spec = data.get("defense")
    if spec is None:
        return data
    options = normalize(spec)
    name = options["name"]
    preset = PRESETS[name]
    keys = preset.keys(**{k: v for k, v in options.items() if k != "name"})
    explicit = leaf_keys({k: v for k, v in data.items() if k != "defense"}) if explicit is None else explicit
    out = copy.deepcopy(data)
    conflicts = []
    for key, value in keys.items():
        found, current = _lookup(out, key)
        if found and key in explicit and current != value:
            hint = f", or choose it with defense.{preset.hints[key]}" if key in preset.hints else ""
            conflicts.append(f"defense: {name} sets {key}={json.dumps(value)}, but the config also sets "
                             f"{key}={json.dumps(current, default=str)}; remove one of them{hint}")
            continue
        set_key(out, key, value)
    if conflicts:
        raise ValueError("; ".join(conflicts))
    out["defense"] = options
    return out
