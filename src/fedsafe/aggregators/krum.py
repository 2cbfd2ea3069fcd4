"""Krum and Multi-Krum.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent" (NeurIPS 2017). With f assumed Byzantine clients among n, the score of update i is

    s(i) = sum_{j in N_i} ||delta_i - delta_j||^2

over the n - f - 2 updates N_i closest to delta_i (squared Euclidean distances). Krum outputs the update
with the lowest score; Multi-Krum averages the m lowest-scoring updates (m = n - f by default; m = 1 is
Krum). The rule needs n > 2f + 2 (and n >= m) and refuses smaller rounds; the same condition
(:func:`fedsafe.aggregators.requirements.krum_needs`) is checked against ``fl.clients_per_round`` when the
config is loaded.

(Ye et al.'s code returns the mean of the chosen point's neighbours and uses unsquared distances; this is
the paper's rule.)

Porting from another library: fedsafe counts the paper's **n - f - 2** neighbours. byzfl (EPFL) scores
``Krum(f)`` and ``MultiKrum(f)`` over n - f - 1 neighbours (the n - f nearest, the point itself included),
so byzfl's ``Krum(f + 1)`` selects what fedsafe's ``krum(f)`` selects, and the same f can pick different
clients (``tests/test_aggregators.py`` has a 5-client example). byzfl's ``MultiKrum(g)`` averages n - g
updates scored that way: fedsafe's ``multikrum(f=g - 1, m=n - g)`` is the same rule.

``client_weights``: 1 for the Krum choice; 1/m for each update Multi-Krum averages; 0 otherwise.
"""

from __future__ import annotations

import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator, check_f, pairwise_sq_distances, validate_f
from fedsafe.aggregators.requirements import krum_needs, require, validate_m


def krum_scores(sq_dist: torch.Tensor, f: int) -> torch.Tensor:
    """Krum scores from a squared-distance matrix ``[n, n]``: sum over the n - f - 2 nearest others."""
    n = sq_dist.shape[0]
    d = sq_dist.clone()
    d.fill_diagonal_(float("inf"))
    nearest = torch.sort(d, dim=1).values[:, : n - f - 2]
    return nearest.sum(dim=1)


def require_krum_n(rule: str, f: int, n: int, m: int | None = None) -> None:
    """Refuse rounds with n <= 2f + 2 (Krum's condition) or n < m, with a message that names the field."""
    require(krum_needs(f, m, rule), n)


class MultiKrum(Aggregator):
    """Multi-Krum: the mean of the m lowest-scoring updates (m = n - f by default; m = 1 is Krum)."""

    name = "multikrum"

    def __init__(self, f: int = 1, m: int | None = None):
        self.f = validate_f(f)
        self.m = validate_m(m)

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        n = updates.shape[0]
        require_krum_n(self.name, self.f, n, self.m)
        check_f(self.name, self.f, n)
        m = n - self.f if self.m is None else self.m
        scores = krum_scores(pairwise_sq_distances(updates), self.f)
        # stable sort: equal scores keep client order, so the choice is deterministic
        selected = torch.sort(scores, stable=True).indices[:m]
        weights = torch.zeros(n, device=updates.device)
        weights[selected] = 1.0 / m
        return AggregationResult(weights @ updates, weights,
                                 {"scores": scores.tolist(), "selected": selected.tolist()})

    def __repr__(self) -> str:
        return f"MultiKrum(f={self.f}, m={self.m})"


class Krum(MultiKrum):
    """Krum: the single update with the lowest score (Blanchard et al. 2017)."""

    name = "krum"

    def __init__(self, f: int = 1):
        super().__init__(f=f, m=1)

    def __repr__(self) -> str:
        return f"Krum(f={self.f})"
