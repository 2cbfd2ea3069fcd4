"""Coordinate-wise median.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates" (ICML 2018): Delta_j = med{delta_1j, ..., delta_nj} for every coordinate j.

Even n: the median of an even count is the midpoint of the two middle order statistics,
(x_(n/2) + x_(n/2+1)) / 2, as in Yin et al. and NumPy (``torch.median`` would return the lower one).

``client_weights``: the share of the output each client produced, summed over coordinates and divided by d.
A client whose value is the median of a coordinate contributes 1 to that coordinate (1/2 for each of the
two middle values when n is even), so the weights sum to 1. Ties go to the lower client index.
"""

from __future__ import annotations

import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator, argsort_columns, column_chunks, slot_shares


class Median(Aggregator):
    """Coordinate-wise median (unweighted: sample counts are ignored, as in the paper)."""

    name = "median"

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        n, d = updates.shape
        out = torch.empty(d)
        lo, hi = (n - 1) // 2, n // 2
        slot_w = torch.zeros(n)
        slot_w[lo] += 0.5
        slot_w[hi] += 0.5
        shares = torch.zeros(n, dtype=torch.float64)
        for cols in column_chunks(n, d, per_column=3):
            vals, idx = argsort_columns(updates[:, cols].contiguous())
            out[cols] = (vals[lo] + vals[hi]) / 2
            shares += slot_shares(idx[lo:hi + 1], slot_w[lo:hi + 1], n)
        return AggregationResult(out, (shares / d).float(), {})
