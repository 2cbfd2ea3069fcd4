"""``probe_posthoc``: the shadow probe filters every round and the post-hoc safety fine-tune runs after the last.

One defense made of two existing plug-ins, with nothing of its own to compute:

    rounds 1..T   probe (Tao et al., Safe-FedLLM, ACL 2026; hook ``server_view``): each client's LoRA update is
                  scored by a probe fitted on the server's own shadow clients; clients flagged by
                  ``probe.decision`` (an oracle-free rule, :mod:`fedsafe.defenses.probe_decision`) are
                  excluded before the rule;
    after T       post-hoc defense (Ye et al., ICLR 2025; hook ``after_training``): the final adapter is
                  fine-tuned on aligned + normal data the server holds and evaluated as ``posthoc_l<level>``.

The probe keeps most of the attackers' updates out of the global model, so the post-hoc step starts from a
less damaged adapter; the post-hoc step repairs what the probe let through (a missed attacker, a round before
the first refit). Neither reads the clients' data or roles.

Use it as a preset: :func:`preset` gives the dotted overrides (``fedsafe run --set ...`` or a grid's matrix
entry), :func:`apply` applies them to a config mapping. ``configs/probe_grid.yaml``'s ``probe_*`` x ``posthoc``
settings are this defense.
"""

from __future__ import annotations

from typing import Any

NAME = "probe_posthoc"


def preset(decision: str = "gap", rule: str | None = None, level: int = 1) -> dict[str, Any]:
    """Dotted overrides that make the defense: the probe (in front of ``rule`` if given) with ``decision``,
    and the post-hoc fine-tune at ``level`` (its data still comes from the ``posthoc`` section)."""
    from fedsafe.defenses.probe_decision import DECISIONS

    if decision not in DECISIONS:
        raise ValueError(f"probe_posthoc: probe.decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    return {"aggregator.name": "probe" if rule in (None, "fedavg") else f"probe+{rule}",
            "probe.decision": decision, "posthoc.enabled": True, "posthoc.level": level}


def apply(config: dict, **kwargs) -> dict:
    """A copy of a config mapping with :func:`preset`'s overrides set (nested keys created as needed)."""
    import copy

    out = copy.deepcopy(config)
    for dotted, value in preset(**kwargs).items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def is_probe_posthoc(cfg) -> bool:
    """Whether an experiment config runs this defense (the probe as its rule's filter and post-hoc on)."""
    name = cfg.aggregator.name
    return (name == "probe" or name.startswith("probe+")) and bool(cfg.posthoc.enabled)
