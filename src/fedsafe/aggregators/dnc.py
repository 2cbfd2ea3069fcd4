"""Divide-and-Conquer (DnC).

Shejwalkar & Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and Defenses for
Federated Learning" (NDSS 2021), Algorithm 2. For each of ``niters`` iterations:

    r      <- a random subset of b = subsample_dim coordinates (without replacement)
    mu     <- mean_i delta_i[r];   C = [delta_i[r] - mu]_i
    v      <- top right singular vector of C
    s_i    <- <delta_i[r] - mu, v>^2                     (outlier score)
    I      <- the n - floor(c * f) clients with the lowest scores   (c = filter_frac)
    I_good <- I_good intersect I

The output is the mean of the updates in I_good. Defaults b = 10,000, niters = 1, c = 1.0 are those of
public reimplementations (e.g. Blades); raise ``niters`` to intersect over several subsets. The
coordinate subsets come from a generator seeded by (seed, call count), independent of client order, and
the call count is saved in ``state_dict`` so resumed runs draw the same.

``client_weights``: 1/|I_good| for the clients kept, 0 for the rest.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator, check_f, validate_f
from fedsafe.aggregators.requirements import dnc_needs, require, validate_filter_frac


class DnC(Aggregator):
    """Spectral outlier filtering on random coordinate subsets, intersected over iterations."""

    name = "dnc"

    def __init__(self, f: int = 1, niters: int = 1, subsample_dim: int = 10_000, filter_frac: float = 1.0,
                 seed: int = 0):
        self.f = validate_f(f)
        if niters < 1 or subsample_dim < 1:
            raise ValueError("niters and subsample_dim must be >= 1")
        self.niters, self.subsample_dim = int(niters), int(subsample_dim)
        self.filter_frac = validate_filter_frac(filter_frac)
        self.seed = int(seed)
        self.calls = 0

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        n, d = updates.shape
        require(dnc_needs(self.f, self.filter_frac), n)
        check_f(self.name, self.f, n)
        n_remove = int(self.filter_frac * self.f)
        rng = np.random.default_rng([self.seed, self.calls, 4099])
        self.calls += 1
        b = min(self.subsample_dim, d)
        good = set(range(n))
        all_scores = []
        for _ in range(self.niters):
            coords = torch.from_numpy(np.sort(rng.choice(d, size=b, replace=False))).to(updates.device)
            sub = updates[:, coords].double()
            centred = sub - sub.mean(dim=0, keepdim=True)
            # <c_i, v>^2 for the top right singular vector v of C equals lambda_1 * u_1i^2, with (lambda_1, u_1)
            # the top eigenpair of the small n x n Gram C C^T (an SVD of the n x b block is ~100x slower on CPU)
            evals, evecs = torch.linalg.eigh(centred @ centred.T)
            scores = evals[-1].clamp_min(0) * evecs[:, -1] ** 2
            all_scores.append(scores.tolist())
            keep = torch.sort(scores, stable=True).indices[: n - n_remove].tolist()
            good &= set(keep)
        kept = sorted(good)
        weights = torch.zeros(n, device=updates.device)
        if kept:
            weights[kept] = 1.0 / len(kept)
        return AggregationResult(weights @ updates, weights, {"kept": kept, "scores": all_scores})

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state.get("calls", 0))

    def __repr__(self) -> str:
        return (f"DnC(f={self.f}, niters={self.niters}, subsample_dim={self.subsample_dim}, "
                f"filter_frac={self.filter_frac})")
