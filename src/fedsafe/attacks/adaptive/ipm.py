"""Inner Product Manipulation (IPM), the untargeted reference.

Xie, Koyejo, Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product Manipulation"
(UAI 2019). Every malicious client sends

    u = -epsilon * mu

with mu the mean of the benign updates (partial knowledge: the attacker's shadows; full: the round's benign
clients). A small epsilon (the paper's 0.1) passes median/Krum-type rules while making the inner product of
the aggregate with the true update negative; a large one (the paper's 100) breaks averaging outright. It
ignores h: it measures how far an untargeted attacker degrades training, not the safety attack.
"""

from __future__ import annotations

import torch
from pydantic import Field

from fedsafe.attacks.adaptive.base import AttackConfig


class Config(AttackConfig):
    """``{name: ipm, epsilon: 0.5}``."""

    epsilon: float = Field(0.5, gt=0, description="u = -epsilon * mu (Xie et al. use 0.1 and 100)")


def craft(h: torch.Tensor, benign: torch.Tensor | None, n: int, f: int, cfg: Config, **_):
    """``-epsilon * mu``."""
    if benign is None or len(benign) == 0:
        raise ValueError("IPM needs benign updates")
    return -cfg.epsilon * benign.float().mean(dim=0), {"epsilon": cfg.epsilon}
