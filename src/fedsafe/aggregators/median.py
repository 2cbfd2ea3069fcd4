"""Coordinate-wise median.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates" (ICML 2018): Delta_j = med{delta_1j, ..., delta_nj} for every coordinate j.

Even n: the median of an even count is the midpoint of the two middle order statistics,
(x_(n/2) + x_(n/2+1)) / 2, as in Yin et al. and NumPy (``torch.median`` would return the lower one).

``client_weights``: the share of the output each client produced, summed over coordinates and divided by d.
A client whose value is the median of a coordinate contributes 1 to that coordinate (1/2 for each of the
two middle values when n is even), so the weights sum to 1. Clients tied on a median value share it.
"""

from __future__ import annotations

import torch

from fedsafe.aggregators.base import (AggregationResult, Aggregator, column_chunks, sort_columns,
                                     window_shares_between)


def window_weights(updates: torch.Tensor, lo_vals: torch.Tensor, hi_vals: torch.Tensor, start: int, stop: int,
                   per_column: int = 4) -> torch.Tensor:
    """Each client's share of the sorted places ``[start, stop)`` of every coordinate, averaged over the d
    coordinates (float32 ``[n]``), from the window's end values ``lo_vals``/``hi_vals`` ``[d]`` (ties shared)."""
    n, d = updates.shape
    shares = torch.zeros(n, dtype=torch.float64, device=updates.device)
    for cols in column_chunks(n, d, per_column=per_column):
        block = updates[:, cols]
        shares += window_shares_between(block, lo_vals[None, cols], hi_vals[None, cols], start, stop) / (stop - start)
    return (shares / d).float()


class Median(Aggregator):
    """Coordinate-wise median (unweighted: sample counts are ignored, as in the paper)."""

    name = "median"

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        n, d = updates.shape
        out = torch.empty(d, device=updates.device)
        lo, hi = (n - 1) // 2, n // 2
        lo_vals, hi_vals = torch.empty(d, device=updates.device), torch.empty(d, device=updates.device)
        for cols in column_chunks(n, d, per_column=2):
            vals = sort_columns(updates[:, cols])
            lo_vals[cols], hi_vals[cols] = vals[lo], vals[hi]
            out[cols] = (vals[lo] + vals[hi]) / 2
        # the median place(s): one for odd n, two of weight 1/2 for even n; computed when first asked for
        return AggregationResult(out, lambda: window_weights(updates, lo_vals, hi_vals, lo, hi + 1), {})
