"""Aggregation rules, built by name: ``fedsafe.aggregators.get("krum", f=1)``.

Every rule is a callable ``agg(updates[n, d], num_samples[n], client_ids) -> AggregationResult`` with
``.update`` ([d]), ``.client_weights`` ([n], 0 for excluded clients) and ``.info``. Each lives in its own
module whose docstring cites its paper and formula. :func:`check_feasible` and :func:`min_clients` say
whether a rule works with a round's number of clients (:mod:`fedsafe.aggregators.requirements`).
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING

from fedsafe.aggregators.requirements import check_feasible, min_clients
from fedsafe.errors import ConfigError

if TYPE_CHECKING:
    from fedsafe.aggregators.base import AggregationResult, Aggregator

# name -> "module:Class"; modules are imported lazily so that a missing optional rule never breaks the rest
REGISTRY: dict[str, str] = {
    "fedavg": "fedsafe.aggregators.fedavg:FedAvg",
    "probe": "fedsafe.aggregators.probe:ProbeAggregator",
    "median": "fedsafe.aggregators.median:Median",
    "trimmed_mean": "fedsafe.aggregators.trimmed_mean:TrimmedMean",
    "krum": "fedsafe.aggregators.krum:Krum",
    "multikrum": "fedsafe.aggregators.krum:MultiKrum",
    "bulyan": "fedsafe.aggregators.bulyan:Bulyan",
    "dnc": "fedsafe.aggregators.dnc:DnC",
    "foolsgold": "fedsafe.aggregators.foolsgold:FoolsGold",
    "residual": "fedsafe.aggregators.residual:Residual",
    "geometric_median": "fedsafe.aggregators.geometric_median:GeometricMedian",
    "norm_clip": "fedsafe.aggregators.norm_clip:NormClip",
    "nnm": "fedsafe.aggregators.nnm:NearestNeighbourMixing",
    "flame": "fedsafe.aggregators.flame:FLAME",
    "lasa": "fedsafe.aggregators.lasa:LASA",
    "fltrust": "fedsafe.aggregators.fltrust:FLTrust",
    "centered_clipping": "fedsafe.aggregators.centered_clipping:CenteredClipping",
}


def register(name: str, target: str) -> None:
    """Register ``module:Class`` under ``name`` (for plug-ins)."""
    REGISTRY[name] = target


def available() -> list[str]:
    """Names of the registered rules."""
    return sorted(REGISTRY)


def get(name: str, **params) -> Aggregator:
    """Build the rule ``name`` with ``params``; unknown names and parameters raise ConfigError.

    ``"step+rule"`` puts a pre-aggregation step (a class with ``is_filter = True``: ``nnm``, ``probe``,
    ``norm_clip``) in front of any rule (:func:`fedsafe.aggregators.wrappers.compose`): ``params[step]`` (a
    dict) goes to the step, the other params to the inner rule, e.g. ``get("nnm+krum", f=1)`` or
    ``get("probe+krum", f=1, probe={"threshold": 0.9})``. How the step's weights reach the inner rule is the
    step's contract (see :mod:`fedsafe.aggregators.wrappers` and :mod:`fedsafe.aggregators.probe`).
    """
    if "+" in name:
        from fedsafe.aggregators.wrappers import compose

        return compose(name, params, get,
                       lambda outer: outer in REGISTRY and bool(getattr(_load(outer), "is_filter", False)))
    if name not in REGISTRY:
        raise ConfigError(f"aggregator.name={name!r} is not one of {', '.join(available())}")
    cls = _load(name)
    sig = inspect.signature(cls.__init__)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = [k for k in params if k not in sig.parameters and not accepts_any]
    if unknown:
        allowed = [p for p in sig.parameters if p != "self"]
        raise ConfigError(f"aggregator {name!r} has no parameter(s) {unknown}; it takes {allowed}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"aggregator {name!r} with {params}: {exc}") from exc


def compare_rules(specs: list) -> dict[str, Aggregator]:
    """Build ``aggregator.compare``: rules run on the same updates for analysis only, by label.

    Each entry is a name (``"median"``) or ``{name: krum, params: {f: 1}}``; the label is the name plus its
    parameters (``"krum(f=1)"``). Errors name the entry, e.g. ``aggregator.compare[1]``.
    """
    rules: dict[str, Aggregator] = {}
    for i, spec in enumerate(specs or []):
        name, params = (spec, {}) if isinstance(spec, str) else (spec.get("name"), dict(spec.get("params") or {}))
        label = name if not params else f"{name}({', '.join(f'{k}={v}' for k, v in sorted(params.items()))})"
        try:
            rules[label] = get(name, **params)
        except ConfigError as exc:
            raise ConfigError(f"aggregator.compare[{i}]: {exc}") from exc
    return rules


def _load(name: str) -> type:
    module_name, cls_name = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def __getattr__(name: str):
    # the base classes import torch: loaded on first use, so that fedsafe.config can import check_feasible
    if name in ("AggregationResult", "Aggregator"):
        from fedsafe.aggregators import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AggregationResult", "Aggregator", "available", "check_feasible", "compare_rules", "get",
           "min_clients", "register"]
