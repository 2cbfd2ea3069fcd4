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
z_max. A coordinate where h_j = mu_j exactly (sign 0; e.g. a coordinate no client trains) takes the paper's
fixed direction, u_j = mu_j - z sigma_j, so every coordinate sits exactly z sigma_j from the mean.

z_max = 0 makes ALIE send the benign mean: it happens when (n - s) / n = 1/2, i.e. f = 1 with n even (n = 4,
f = 1: s = 2, Phi^-1(2/4) = 0); more generally whenever n - 2s = 0. The config load then refuses the attack
unless ``z`` is given (:func:`check_z`, naming ``roles[i].attack.z``), so no run or grid cell labelled "alie"
is silently "send the benign mean"; where the round's n and f differ from the configured ones at run time
(full knowledge counts the round's clients), a z of 0 is logged as a warning and in the round record
(``z_is_zero``).
"""

from __future__ import annotations

import logging
import math
from statistics import NormalDist
from typing import Literal

import torch
from pydantic import Field

from fedsafe.attacks.adaptive.base import AttackConfig, benign_stats

log = logging.getLogger("fedsafe")


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


def zero_z_message(n: int, f: int) -> str:
    """Why z_max(n, f) is 0, and what to do."""
    s = math.floor(n / 2 + 1) - f
    return (f"ALIE with n={n} clients per round and f={f} attackers: s={s} supporters, (n - s)/n = 1/2, so "
            f"z_max = Phi^-1(1/2) = 0 and the attack sends the benign mean (a no-op); give attack.z explicitly "
            f"(Baruch et al. 2019 use z around 1) or change fl.clients_per_round / attack.f")


def check_z(cfg: Config, n: int, f: int) -> None:
    """Config load: refuse z_max = 0 (ALIE would send the benign mean) unless ``z`` is given."""
    if cfg.z is None and z_max(n, f) == 0.0:
        raise ValueError(zero_z_message(n, f))


def craft(h: torch.Tensor, benign: torch.Tensor | None, n: int, f: int, cfg: Config, **_):
    """``mu + z sigma sign(h - mu)`` with sign 0 taken as -1 (or h clamped to ``mu +- z sigma``)."""
    mu, sigma = benign_stats(benign)
    z = cfg.z if cfg.z is not None else z_max(n, f)
    info = {"z": z}
    if z == 0.0:
        log.warning("adaptive attack: %s", zero_z_message(n, f))
        info["z_is_zero"] = True
    if cfg.mode == "clip":
        update = torch.maximum(torch.minimum(h.float(), mu + z * sigma), mu - z * sigma)
    else:
        direction = torch.sign(h.float() - mu)
        direction[direction == 0] = -1.0  # h_j = mu_j: the paper's fixed direction, so |u_j - mu_j| = z sigma_j
        update = mu + z * sigma * direction
    return update, info
