"""A Little Is Enough (ALIE).

Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses For Distributed Learning"
(NeurIPS 2019). With n clients of which f are malicious, the attacker needs s non-malicious "supporters":

    s = floor(n / 2 + 1) - f,          z_max = Phi^{-1}((n - s) / n)

(Phi: the standard normal CDF), and every coordinate j of the malicious update stays within z_max benign
standard deviations of the benign mean, where median- and distance-based rules cannot tell it apart:

    sign mode (default):  u_j = mu_j + z * sigma_j * sign(h_j - mu_j)
    clip mode:            u_j = clamp(h_j, mu_j - z sigma_j, mu_j + z sigma_j)   (the paper's backdoor form:
                                                                                  as close to h as the range allows)

mu, sigma: mean and standard deviation of the benign updates (partial knowledge: the attacker's shadows;
full: the round's benign clients). The sign is chosen along the harmful direction relative to the benign mean,
h - mu (the paper's untargeted attack uses a fixed sign; the safety attack pushes towards h). ``z`` overrides
z_max.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Literal

import torch
from pydantic import Field

from fedsafe.attacks.adaptive.base import AttackConfig, benign_stats


class Config(AttackConfig):
    """``{name: alie}`` (z from n and f) or ``{name: alie, z: 1.0, mode: clip}``."""

    z: float | None = Field(None, gt=0, description="standard deviations from the mean (default z_max from "
                                                    "n and f, Baruch et al.)")
    mode: Literal["sign", "clip"] = Field("sign", description="sign: mu + z sigma sign(h - mu); clip: h clamped "
                                                              "to [mu - z sigma, mu + z sigma]")


def z_max(n: int, f: int) -> float:
    """Baruch et al.'s z_max = Phi^-1((n - s) / n) with s = floor(n/2 + 1) - f supporters."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0 < p < 1:
        raise ValueError(f"ALIE: n={n}, f={f} gives s={s} supporters and (n - s)/n={p:.3f}, outside (0, 1); "
                         "give attack.z explicitly")
    return NormalDist().inv_cdf(p)


def craft(h: torch.Tensor, benign: torch.Tensor | None, n: int, f: int, cfg: Config, **_):
    """``mu + z sigma sign(h - mu)`` (or h clamped to ``mu +- z sigma``)."""
    mu, sigma = benign_stats(benign)
    z = cfg.z if cfg.z is not None else z_max(n, f)
    if cfg.mode == "clip":
        update = torch.maximum(torch.minimum(h.float(), mu + z * sigma), mu - z * sigma)
    else:
        update = mu + z * sigma * torch.sign(h.float() - mu)
    return update, {"z": z}
