"""``probe_posthoc``: the shadow probe filters every round and the post-hoc safety fine-tune runs after the last.

One defense made of two existing plug-ins, with nothing of its own to compute:

    rounds 1..T   probe (Tao et al., Safe-FedLLM, ACL 2026; hook ``server_view``): each client's LoRA update is
                  scored by a probe fitted on the server's own shadow clients; clients flagged by
                  ``probe.decision`` (an oracle-free rule, :mod:`fedsafe.aggregators.probe_decision`) are
                  excluded before the rule;
    after T       post-hoc defense (Ye et al., ICLR 2025; hook ``after_training``): the final adapter is
                  fine-tuned on aligned + normal data the server holds and evaluated as ``posthoc_l<level>``.

The probe keeps most of the attackers' updates out of the global model, so the post-hoc step starts from a
less damaged adapter; the post-hoc step repairs what the probe let through (a missed attacker, a round before
the first refit). Neither reads the clients' data or roles.

Use it as a config key (a named defense, :mod:`fedsafe.defenses.presets`)::

    defense: probe_posthoc                                       # decision gap, plain probe, level 1
    defense: {name: probe_posthoc, decision: gap, rule: median, level: 1}

``fedsafe run --set defense=probe_posthoc`` and a grid's matrix entry ``{defense: probe_posthoc}`` work too.
At load it expands into exactly the keys of :func:`preset` (``aggregator.name: probe`` or ``probe+<rule>``,
``probe.decision``, ``posthoc.enabled: true``, ``posthoc.level``), so the run is the run with those keys set
by hand; setting one of them to another value as well is an error naming both. The probe's shadow data and
the post-hoc defense data still come from the ``probe`` and ``posthoc`` sections. Options
(:class:`Options`): ``decision`` (default ``gap``, the within-round split on the probe's logits, the rule the
probe grid measured to fire without oracle labels), ``rule`` (default none: the probe alone, FedAvg of the
clients it keeps; ``median`` etc. puts it in front of that rule), ``level`` (the post-hoc level, default 1).
:func:`apply` applies the keys to a config mapping; ``configs/probe_grid.yaml``'s ``probe_*`` x ``posthoc``
settings are this defense with the keys set by hand.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, field_validator

from fedsafe.defenses.safe_fedllm_probe.config import ProbeConfig
from fedsafe.schema import Strict

NAME = "probe_posthoc"
# the schema's choices (the same as fedsafe.aggregators.probe_decision.DECISIONS, which imports numpy)
DECISIONS: tuple[str, ...] = get_args(ProbeConfig.model_fields["decision"].annotation)


def _check_decision(decision: str) -> str:
    if decision not in DECISIONS:
        raise ValueError(f"must be one of {', '.join(DECISIONS)}")
    return decision


def _check_rule(rule: str | None) -> str | None:
    from fedsafe.aggregators import available  # torch-free: the registry of names

    rules = [r for r in available() if r != "probe"]
    if rule is not None and rule not in rules:
        raise ValueError(f"must be a rule to put the probe in front of ({', '.join(rules)}) or null (the probe "
                         "alone)")
    return rule


class Options(Strict):
    """``defense: {name: probe_posthoc, ...}``: the options of this defense."""

    name: Literal["probe_posthoc"] = NAME
    decision: str = Field("gap", description="probe.decision: fixed | fpr | mad | gap | calibrated (gap: the "
                                             "within-round split on the logits, scale-free, no oracle labels)")
    rule: str | None = Field(None, description="the rule behind the probe (aggregator.name probe+<rule>); "
                                               "null or fedavg: the probe alone")
    level: Literal[1, 2, 3] = Field(1, description="posthoc.level: 1 datasets the server holds, 2 an external "
                                                   "model generates them, 3 the aggregated model does")

    @field_validator("decision")
    @classmethod
    def _decision(cls, v: str) -> str:
        return _check_decision(v)

    @field_validator("rule")
    @classmethod
    def _rule(cls, v: str | None) -> str | None:
        return _check_rule(v)


def preset(decision: str = "gap", rule: str | None = None, level: int = 1) -> dict[str, Any]:
    """Dotted overrides that make the defense: the probe (in front of ``rule`` if given) with ``decision``,
    and the post-hoc fine-tune at ``level`` (its data still comes from the ``posthoc`` section)."""
    try:
        _check_decision(decision)
    except ValueError as exc:
        raise ValueError(f"probe_posthoc: probe.decision {exc}, got {decision!r}") from None
    return {"aggregator.name": "probe" if rule in (None, "fedavg") else f"probe+{rule}",
            "probe.decision": decision, "posthoc.enabled": True, "posthoc.level": level}


def apply(config: dict, **kwargs) -> dict:
    """A copy of a config mapping with :func:`preset`'s overrides set (nested keys created as needed)."""
    import copy

    from fedsafe.defenses.presets.keys import set_key

    out = copy.deepcopy(config)
    for dotted, value in preset(**kwargs).items():
        set_key(out, dotted, value)
    return out


def is_probe_posthoc(cfg) -> bool:
    """Whether an experiment config runs this defense (the probe as its rule's filter and post-hoc on)."""
    name = cfg.aggregator.name
    return (name == "probe" or name.startswith("probe+")) and bool(cfg.posthoc.enabled)
