"""Pre-aggregation steps in front of any rule: the one way to write ``<step>+<rule>``.

A *step* is a rule that transforms or filters the round's updates and hands the result to an *inner* rule,
like Flower's strategy wrappers (``DifferentialPrivacyServerSideFixedClipping`` around any strategy). Every
composition in fedsafe goes through :func:`compose`:

    aggregators.get("nnm+krum", f=4)                        NNM in front of Krum (the step shares Krum's f)
    aggregators.get("probe+median", probe={...})            the Safe-FedLLM probe in front of the median
    aggregators.get("norm_clip+krum", f=1, norm_clip={"max_norm": 1.0})
    aggregators.get("norm_clip", max_norm=1.0, aggregator="krum", params={"f": 1})   (the older spelling)

``params[<step>]`` (a dict) goes to the step, every other parameter to the inner rule; a step may read
parameters it shares with the inner rule (:data:`fedsafe.aggregators.requirements.SHARED_PARAMS`, e.g. NNM's
``f``) when its own section leaves them out. Steps chain: ``nnm+probe+krum``. The round-size conditions of a
composition are the step's and the inner rule's (:func:`fedsafe.aggregators.requirements.rule_needs`).

A step is a class with ``is_filter = True`` that takes ``inner``. Most subclass :class:`Wrapper`, which runs
``pre`` (the step), the inner rule on its output, then ``post`` (how the inner rule's client weights map back
to the clients the server received, for the stealth analysis), and forwards ``prepare`` and the state of a
stateful inner rule (checkpoint and resume). The probe (:mod:`fedsafe.aggregators.probe`) is a step with its
own contract (which clients reach the inner rule and how its soft weights combine with the inner rule's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator
from fedsafe.aggregators.requirements import SHARED_PARAMS
from fedsafe.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable


def split_name(name: str) -> tuple[str, str]:
    """``"nnm+krum"`` -> ``("nnm", "krum")``; ``"nnm+probe+krum"`` -> ``("nnm", "probe+krum")``."""
    outer, inner = name.split("+", 1)
    return outer.strip(), inner.strip()


def step_params(outer: str, params: dict) -> tuple[dict, dict]:
    """Split a composition's params into (the step's, the inner rule's).

    The step's are ``params[outer]`` plus the shared parameters (:data:`SHARED_PARAMS`) it does not set
    itself, read from the inner rule's params (which keep them)."""
    inner_params = dict(params)
    own = dict(inner_params.pop(outer, None) or {})
    for key in SHARED_PARAMS.get(outer, ()):
        if key not in own and key in inner_params:
            own[key] = inner_params[key]
    return own, inner_params


def compose(name: str, params: dict, get: Callable[..., Aggregator], is_step: Callable[[str], bool]) -> Aggregator:
    """Build ``<step>+<rule>``: the inner rule from ``params`` without the step's section, then the step
    around it. ``get`` builds a rule by name; ``is_step(name)`` says whether a name may go in front."""
    outer, inner_name = split_name(name)
    if not is_step(outer):
        raise ConfigError(f"aggregator.name={name!r}: {outer!r} is not a filter (a pre-aggregation step); a step such as "
                          f"'nnm' or 'probe' goes in front, e.g. 'nnm+{inner_name}'")
    own, inner_params = step_params(outer, params)
    rule = get(outer, inner=get(inner_name, **inner_params), **own)
    return rule


class Wrapper(Aggregator):
    """A pre-aggregation step around an inner rule (FedAvg by default): ``pre``, inner rule, ``post``.

    Subclasses implement :meth:`pre` and, when the step changes which clients an inner weight belongs to
    (mixing), :meth:`client_weights`.
    """

    name = "wrapper"
    is_filter = True  # aggregators.get accepts it in front of a rule: "<name>+<rule>"

    def __init__(self, inner: Aggregator | None = None):
        if inner is None:
            from fedsafe.aggregators.fedavg import FedAvg

            inner = FedAvg()
        self.inner = inner
        self.step = type(self).name
        self.name = f"{self.step}+{getattr(inner, 'name', type(inner).__name__)}"

    @property
    def needs_plaintext(self) -> bool:  # a step reads individual updates
        return True

    # ---- the step --------------------------------------------------------------------------------
    def pre(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> tuple[torch.Tensor, Any, dict]:
        """The updates the inner rule receives ``[n, d]``, what :meth:`client_weights` needs, and details."""
        raise NotImplementedError

    def client_weights(self, inner_weights: torch.Tensor, how: Any) -> torch.Tensor:
        """The weight of each received update, from the inner rule's weights of the transformed ones."""
        return inner_weights

    def post(self, res: AggregationResult, how: Any, info: dict) -> AggregationResult:
        """The composed result: the inner aggregate, weights mapped back, the step's details beside the inner's."""
        return AggregationResult(res.update, self.client_weights(res.client_weights, how),
                                 {**res.info, self.step: info})

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        transformed, how, info = self.pre(updates, num_samples, client_ids)
        return self.post(self.inner(transformed, num_samples, client_ids), how, info)

    # ---- what the inner rule needs from the server --------------------------------------------------
    def prepare(self, context):
        """The inner rule's round-start hook (FLTrust's server update, LASA's layer map, the probe's shadows)."""
        prepare = getattr(self.inner, "prepare", None)
        return prepare(context) if prepare is not None else context.round_config

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict()} if hasattr(self.inner, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict((state or {}).get("inner") or {})

    def find(self, cls: type) -> Aggregator | None:
        """The first rule of type ``cls`` in this chain of steps (itself included), or None."""
        return find_rule(self, cls)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(inner={self.inner!r})"


def find_rule(rule, cls: type):
    """The first rule of type ``cls`` along ``rule``'s chain of inner rules (steps, plug-in wrappers), or None."""
    seen = set()
    while rule is not None and id(rule) not in seen:
        if isinstance(rule, cls):
            return rule
        seen.add(id(rule))
        rule = vars(rule).get("inner") if hasattr(rule, "__dict__") else None
    return None
