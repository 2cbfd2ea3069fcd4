"""Collusion / sybils: the malicious clients send one identical update, or it with small noise.

Fung, Yoon, Beschastnikh, "The Limitations of Federated Learning in Sybil Settings" (RAID 2020) built
FoolsGold for exactly this case: sybils pushing one objective send very similar updates, so their pairwise
cosine similarity is high and FoolsGold lowers their learning rates. Here every malicious client of the role
sends the same shared update s of the round,

    u_k = s + noise * rms(s) * e_k,    e_k ~ N(0, I) seeded by (seed, round, client)

(``noise`` = 0: identical updates; rms(v) = ||v|| / sqrt(d)).

No communication between the sybils: in a Flower deployment each one runs in its own ClientApp process and
shares no Python state with the others, so each computes s itself, deterministically. s is the update of one
local training from the round's global adapter on the role's *shared* data (``shared_data``, default the role's
own ``roles[i].data`` sources; ``shared_samples`` rows drawn with a seed derived from the experiment seed and the
role) under a shared client identity (``<role>_sybil``), which fixes the batch order and dropout. The
assumption, as in the sybil attacks FoolsGold answers: the colluders agree beforehand on the experiment seed
and on that data (every ClientApp receives the same config). Identical hardware and library versions give
bit-identical updates; across devices they agree up to floating-point nondeterminism (then ``noise`` > 0 is
the sybils' own choice anyway). Under SCAFFOLD the shared training starts from a zero local control variate
each round (the sybils keep no per-client state). ``start_round`` (late start) applies as for every attack.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from fedsafe.attacks.adaptive.base import AttackConfig
from fedsafe.config import DataSource


class Config(AttackConfig):
    """``{name: collusion, noise: 0.0}``."""

    noise: float = Field(0.0, ge=0, description="per-coordinate noise std relative to the RMS of the shared "
                                                "update (0: identical updates)")
    shared_data: list[DataSource] | None = Field(
        None, description="data every sybil trains the shared update on (agreed beforehand; default: the role's "
                          "own roles[i].data sources)")
    shared_samples: int | None = Field(None, ge=1, description="rows of shared_data the shared update trains on "
                                                               "(default: the role's samples per client)")
    uses_statistics: ClassVar[bool] = False


def craft(h: torch.Tensor, benign: torch.Tensor | None, n: int, f: int, cfg: Config,
          leader: torch.Tensor | None = None, noise_seed: int = 0, **_):
    """The shared update (``leader``; ``h`` when not given: the sybil's own training is the shared one) plus
    seeded Gaussian noise."""
    base = (leader if leader is not None else h).float()
    if cfg.noise == 0:
        return base.clone(), {"noise": 0.0}
    gen = torch.Generator().manual_seed(noise_seed)
    rms = float(base.norm()) / max(base.numel(), 1) ** 0.5
    return base + cfg.noise * rms * torch.randn(base.shape, generator=gen), {"noise": cfg.noise}
