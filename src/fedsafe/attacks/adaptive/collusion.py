"""Collusion / sybils: the malicious clients send one identical update, or it with small noise.

Fung, Yoon, Beschastnikh, "The Limitations of Federated Learning in Sybil Settings" (RAID 2020) built
FoolsGold for exactly this case: sybils pushing one objective send very similar updates, so their pairwise
cosine similarity is high and FoolsGold lowers their learning rates. Here every malicious client of the role
sends the update of the role's first client trained in the round (the leader),

    u_k = h_leader + noise * rms(h_leader) * e_k,    e_k ~ N(0, I) seeded by (seed, round, client)

(``noise`` = 0: identical updates; rms(v) = ||v|| / sqrt(d)). In simulation the sybils share the leader's
update in memory; in a deployment they would need a side channel (or identical data and seeds), which
fedsafe does not model.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from fedsafe.attacks.adaptive.base import AttackConfig


class Config(AttackConfig):
    """``{name: collusion, noise: 0.0}``."""

    noise: float = Field(0.0, ge=0, description="per-coordinate noise std relative to the RMS of the leader's "
                                                "update (0: identical updates)")
    uses_statistics: ClassVar[bool] = False


def craft(h: torch.Tensor, benign: torch.Tensor | None, n: int, f: int, cfg: Config,
          leader: torch.Tensor | None = None, noise_seed: int = 0, **_):
    """The leader's update (``h`` when this client is the leader) plus seeded Gaussian noise."""
    base = (leader if leader is not None else h).float()
    if cfg.noise == 0:
        return base.clone(), {"noise": 0.0}
    gen = torch.Generator().manual_seed(noise_seed)
    rms = float(base.norm()) / max(base.numel(), 1) ** 0.5
    return base + cfg.noise * rms * torch.randn(base.shape, generator=gen), {"noise": cfg.noise}
