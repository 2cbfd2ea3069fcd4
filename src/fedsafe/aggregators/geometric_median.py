"""Geometric median (RFA).

Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning" (IEEE TSP 2022): the aggregate is
the weighted geometric median  z* = argmin_z sum_i a_i ||z - delta_i||  (a_i = sample weights), computed by
the smoothed Weiszfeld iterations of the paper's Algorithm 2:

    beta_i <- a_i / max(nu, ||z - delta_i||);   z <- sum_i beta_i delta_i / sum_i beta_i

starting from the weighted mean and stopping after ``maxiter`` iterations or when the objective improves by
less than ``ftol`` (relative). The paper reports that a few iterations suffice on well-behaved data;
``maxiter`` defaults higher so that one huge outlier is also pulled in fully.

``client_weights``: beta_i / sum_k beta_k of the last iteration, the weights that produced z.
"""

from __future__ import annotations

import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator, column_chunks, sample_weights


def squared_norms(updates: torch.Tensor) -> torch.Tensor:
    """Row squared norms ``[n]`` accumulated in float64 over chunks."""
    n, d = updates.shape
    out = torch.zeros(n, dtype=torch.float64, device=updates.device)
    for cols in column_chunks(n, d):
        out += torch.linalg.vector_norm(updates[:, cols], dim=1).double() ** 2
    return out


def distances_to(updates: torch.Tensor, z: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[n]`` from each row to ``z`` via ``|x|^2 - 2 x.z + |z|^2`` (one matrix-vector
    product per call, like FedAvg's; client updates are deltas near 0, so the cancellation is mild)."""
    zz = float((z.double() ** 2).sum())
    return (sq_norms - 2 * (updates @ z).double() + zz).clamp_min(0).sqrt()


class GeometricMedian(Aggregator):
    """Smoothed Weiszfeld for the sample-weighted geometric median."""

    name = "geometric_median"

    def __init__(self, maxiter: int = 100, nu: float = 1e-6, ftol: float = 1e-7, weighted: bool = True):
        if maxiter < 1 or nu <= 0 or ftol < 0:
            raise ValueError("need maxiter >= 1, nu > 0, ftol >= 0")
        self.maxiter, self.nu, self.ftol, self.weighted = int(maxiter), float(nu), float(ftol), bool(weighted)

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        n = updates.shape[0]
        a = (sample_weights(num_samples) if self.weighted else torch.full((n,), 1.0 / n, device=updates.device)).double()
        sq_norms = squared_norms(updates)
        z = (a.float() @ updates)
        dist = distances_to(updates, z, sq_norms)
        obj = float((a * dist).sum())
        beta = a.clone()
        iters = 0
        for iters in range(1, self.maxiter + 1):
            beta = a / dist.clamp_min(self.nu)
            z = (beta / beta.sum()).float() @ updates
            dist = distances_to(updates, z, sq_norms)
            new_obj = float((a * dist).sum())
            done = abs(obj - new_obj) <= self.ftol * max(new_obj, 1e-30)
            obj = new_obj
            if done:
                break
        weights = (beta / beta.sum()).float()
        return AggregationResult(z, weights, {"iterations": iters, "objective": obj})

    def __repr__(self) -> str:
        return f"GeometricMedian(maxiter={self.maxiter}, nu={self.nu}, ftol={self.ftol})"
