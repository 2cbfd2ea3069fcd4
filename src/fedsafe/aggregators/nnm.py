"""Nearest-neighbour mixing (NNM), a pre-aggregation step in front of any rule: ``nnm+<rule>``.

Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing by Mixing: A Recipe for Optimal Byzantine ML
under Heterogeneity" (AISTATS 2023), Algorithm 1. With f assumed Byzantine clients among n, each update is
replaced by the mean of its n - f nearest neighbours in Euclidean distance, itself included:

    y_i = (1 / (n - f)) * sum_{j in N_i} x_j,   N_i = the n - f updates closest to x_i (x_i itself among them)

and the inner rule aggregates y_1..y_n (``nnm+krum``, ``nnm+median``, ...; ``nnm`` alone is ``nnm+fedavg``).
Hyperparameter: ``f``, the assumed number of Byzantine clients; when the step's own section does not set it
(``aggregator.params.nnm.f``) it is the inner rule's ``f`` (``nnm+krum`` with ``params: {f: 4}`` mixes over
n - 4 neighbours, as in the paper where NNM and the rule share f). Needs n >= f + 1.

Ties: distances are squared Euclidean (:func:`fedsafe.aggregators.base.pairwise_sq_distances`); the update
itself always counts as its nearest neighbour (so a duplicate of x_i cannot push it out of its own
neighbourhood; the mean is the same either way), then equal distances go to the lower client index (a stable
sort), so the result does not depend on anything but the order the server received the updates in.
byzfl (EPFL)'s ``NNM(f)`` takes the same n - f neighbours.

``client_weights``: the mixing matrix M (M_ij = 1/(n-f) for j in N_i) maps the inner rule's weights w of the
mixed updates back to the received ones: w' = w M (the aggregate is w' @ x whenever the inner rule's is w @ y).
"""

from __future__ import annotations

import torch

from fedsafe.aggregators.base import check_f, pairwise_sq_distances
from fedsafe.aggregators.requirements import nnm_needs, require, validate_f
from fedsafe.aggregators.wrappers import Wrapper


def nnm_mixing_matrix(updates: torch.Tensor, f: int) -> torch.Tensor:
    """The row-stochastic ``[n, n]`` mixing matrix of NNM: row i puts 1/(n-f) on the n - f nearest of x_i."""
    n = updates.shape[0]
    k = n - f
    dist = pairwise_sq_distances(updates)
    dist.fill_diagonal_(-1.0)  # itself first, whatever ties
    nearest = torch.sort(dist, dim=1, stable=True).indices[:, :k]
    mixing = torch.zeros(n, n, dtype=updates.dtype, device=updates.device)
    mixing.scatter_(1, nearest, 1.0 / k)
    return mixing


class NearestNeighbourMixing(Wrapper):
    """Replace each update by the mean of its n - f nearest neighbours, then run the inner rule."""

    name = "nnm"

    def __init__(self, inner=None, f: int | None = None):
        super().__init__(inner)
        if f is None:
            raise ValueError("nnm needs f, the assumed number of Byzantine clients: set aggregator.params.nnm.f "
                             "or the inner rule's aggregator.params.f")
        self.f = validate_f(f)

    def pre(self, updates, num_samples, client_ids):
        n = updates.shape[0]
        require(nnm_needs(self.f), n, "aggregator.params.nnm")
        check_f(self.step, self.f, n)
        mixing = nnm_mixing_matrix(updates, self.f)
        return mixing @ updates, mixing, {"f": self.f, "neighbours": n - self.f}

    def client_weights(self, inner_weights, mixing):
        return inner_weights.to(mixing.dtype) @ mixing

    def __repr__(self) -> str:
        return f"NearestNeighbourMixing(f={self.f}, inner={self.inner!r})"
