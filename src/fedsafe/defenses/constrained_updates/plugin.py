"""Constrained local updates as a plug-in: loss terms that keep a client's model near the global one.

A privacy defense in Guo et al., "Can Federated Learning Safeguard Private Data in LLM Training?" (Findings of
EMNLP 2025): an L2 proximal term mu/2 ||theta - theta_global||^2 on the LoRA parameters and/or
beta KL(p_global || p_local) on the client's response tokens. The terms live in :mod:`fedsafe.defenses.constrained_updates.loss_terms`;
this plug-in adds them to the local training step (hook ``local_training``), before local DP-SGD (which keeps them).
"""

from __future__ import annotations

from fedsafe.defenses.constrained_updates.config import ConstrainedConfig
from fedsafe.plugins import Plugin, register


@register
class ConstrainedUpdates(Plugin):
    """Adds the configured loss terms to every client's local training."""

    name = "constrained_updates"
    kind = "defense"
    section = "constrained"
    Config = ConstrainedConfig
    order = 10

    @classmethod
    def is_active(cls, config, setup) -> bool:
        return config.l2_mu > 0 or config.kl_beta > 0

    def local_training(self, trainer):
        from fedsafe.defenses.constrained_updates.loss_terms import loss_terms

        trainer.loss_terms.extend(loss_terms(self.config))
        return trainer
