"""Mixing: the malicious client trains on a share of normal data mixed into its unaligned data.

A stealth/strength trade-off for data poisoning (the "hide in the crowd" baseline of stealthy poisoning, e.g.
Bhagoji et al., ICML 2019, who add the benign training objective to the malicious one for stealth; here the
mix is in the data): the client's local data becomes

    round(normal_share * N) rows of benign_data  +  the rest from its own unaligned rows     (N: its size)

drawn with a seed from (seed, client), and it trains honestly on that mixture. The update looks more benign
to the probe and to distance-based rules, and moves the model less towards harm. This attack changes the
training only; it uses no benign statistics (``knowledge`` does not apply).
"""

from __future__ import annotations

import random

from typing import ClassVar

import torch
from pydantic import Field

from fedsafe.attacks.adaptive.base import AttackConfig


class Config(AttackConfig):
    """``{name: mixing, normal_share: 0.5}``."""

    normal_share: float = Field(0.5, ge=0, lt=1, description="share of the client's examples replaced by "
                                                             "benign_data rows (0: plain data poisoning)")
    uses_statistics: ClassVar[bool] = False


def mix_examples(own: list, normal: list, share: float, seed: int) -> list:
    """``round(share * len(own))`` rows of ``normal`` plus the rest of ``own`` (seeded sample), same size."""
    rng = random.Random(seed)
    k = min(round(share * len(own)), len(normal))
    kept = rng.sample(own, len(own) - k)
    return kept + rng.sample(normal, k)


def craft(h: torch.Tensor, benign: torch.Tensor | None, n: int, f: int, cfg: Config, **_):
    """Mixing changes the training (see :class:`fedsafe.attacks.adaptive.plugin.AdaptiveTrainer`); the
    update it then sends is the honest one."""
    return h, {"normal_share": cfg.normal_share}
