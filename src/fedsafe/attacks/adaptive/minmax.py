"""Min-Max and Min-Sum, with the harmful update as the perturbation direction.

Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and Defenses for
Federated Learning" (NDSS 2021), the AGR-agnostic attacks. With benign updates b_1..b_m, their mean mu and a
unit perturbation direction p, the malicious update is u = mu + gamma * p with the largest gamma such that

    Min-Max:  max_i ||u - b_i||      <=  max_{i,j} ||b_i - b_j||      (no further from any benign update
                                                                        than the two furthest benign ones)
    Min-Sum:  sum_i ||u - b_i||^2    <=  max_i sum_j ||b_i - b_j||^2  (summed squared distances no larger
                                                                        than any benign update's)

found by bisection, as in the paper's Algorithm 1. Here p = h / ||h||, the normalised harmful update (the
paper's directions are -sign(mu), -sigma or -mu/||mu||; pointing p along h makes it the strongest
distance-evading form of the safety attack). Both constraints hold at gamma = 0 (mu is a convex combination
of the b_i) and fail for large gamma, and both are convex in gamma, so the feasible set is an interval
[0, gamma*] and bisection finds gamma* to the relative tolerance ``tol``. (For Min-Sum the cross term
vanishes, sum_i (mu - b_i) = 0, so gamma*^2 = (max_i sum_j ||b_i - b_j||^2 - sum_i ||mu - b_i||^2) / m; the
tests check the bisection against it.)

Which Min-Sum bound: fedsafe follows the paper's formula, the **max** over benign updates of their summed
squared distances. The authors' released code (``our_attack_score`` in NDSS21-Model-Poisoning) bounds it by
the **min** (``min_score = torch.min(scores)``), a tighter constraint and so a smaller gamma: fedsafe's
Min-Sum is the looser, more aggressive of the two, and its crafted update may sum to more squared distance
than some benign update does. Results compared with that code's Min-Sum should say so. Min-Max uses the max
pairwise benign distance in both.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedsafe.attacks.adaptive.base import AttackConfig, unit


class Config(AttackConfig):
    """``{name: minmax}`` or ``{name: minsum}``; ``tol`` is the bisection's relative tolerance."""

    name: Literal["minmax", "minsum"]
    tol: float = Field(1e-6, gt=0, lt=1, description="relative tolerance of the bisection on gamma")
    max_iter: int = Field(200, ge=1, description="bisection iterations at most")


CONFIGS = {"minmax": Config, "minsum": Config}


def _pairwise(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[len(x), len(y)]`` in float64."""
    return torch.cdist(x.double(), y.double())


def constraint(objective: str, benign: torch.Tensor):
    """``ok(u) -> bool``: whether ``u`` satisfies the Min-Max / Min-Sum constraint against ``benign``."""
    d = _pairwise(benign, benign)
    if objective == "minmax":
        bound = float(d.max())
        return lambda u: float(_pairwise(u[None], benign).max()) <= bound
    bound = float((d ** 2).sum(dim=1).max())
    return lambda u: float((_pairwise(u[None], benign) ** 2).sum()) <= bound


def largest_gamma(mu: torch.Tensor, direction: torch.Tensor, ok, tol: float = 1e-6, max_iter: int = 200) -> float:
    """The largest gamma with ``ok(mu + gamma * direction)``, by bracketing then bisection (ok(mu) holds)."""
    mu, direction = mu.double(), direction.double()
    if not ok(mu) or float(direction.norm()) == 0:
        return 0.0
    lo, hi = 0.0, 1.0
    scale = float(mu.norm()) or 1.0
    hi = scale
    while ok(mu + hi * direction):  # bracket: grow until infeasible
        lo, hi = hi, hi * 2
        if hi > 1e30:
            raise ValueError("min-max: the constraint holds for every gamma (are the benign updates identical?)")
    for _ in range(max_iter):
        if hi - lo <= tol * hi:
            break
        mid = (lo + hi) / 2
        if ok(mu + mid * direction):
            lo = mid
        else:
            hi = mid
    return lo


def craft(h: torch.Tensor, benign: torch.Tensor | None, n: int, f: int, cfg: Config, **_):
    """``mu + gamma * h / ||h||`` with the largest gamma within the Min-Max / Min-Sum constraint."""
    if benign is None or len(benign) < 2:
        raise ValueError(f"{cfg.name} needs at least 2 benign updates")
    benign = benign.float()
    mu = benign.mean(dim=0)
    direction = unit(h.float())
    gamma = largest_gamma(mu, direction, constraint(cfg.name, benign), cfg.tol, cfg.max_iter)
    return (mu.double() + gamma * direction.double()).float(), {"gamma": gamma}
