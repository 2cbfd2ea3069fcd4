"""Coordinate-wise beta-trimmed mean.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates" (ICML 2018): for every coordinate j sort delta_1j..delta_nj, drop k values from each end and average
the n - 2k that remain. Give exactly one of

- ``beta`` in [0, 1/2), the paper's fraction: k = floor(beta * n), computed with a 1e-9 slack
  (:func:`~fedsafe.aggregators.requirements.trimmed_per_side`) so that beta = f/n trims f (a plain
  ``int(beta * n)`` trims f - 1 for 368 of the (n <= 200, f < n/2) pairs through float rounding: n = 49,
  beta = 1/49 trimmed nothing). beta = 0 is the plain mean. With beta > 0, a config whose
  ``fl.clients_per_round`` gives k = 0 is refused when it is loaded (it would be the plain mean under another
  name); a round that ends up shorter averages everything and logs a warning.
- ``f``, the count of values trimmed per side (k = f whatever n; byzfl's ``TrMean(f)`` convention): needs
  n >= 2f + 1, checked at config load and on every round.

Neither: beta = 0.1. Both: a ConfigError naming both fields.

(Ye et al.'s code fixes k = 1, which with 3 clients per round is the median; ``f: 1`` does the same.)

``client_weights``: the share of the output each client produced: 1/(n-2k) per coordinate it survives in,
summed over coordinates and divided by d (the weights sum to 1; clients tied on a boundary value share
the places it holds).
"""

from __future__ import annotations

import logging

import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator, column_chunks, sort_columns
from fedsafe.aggregators.median import window_weights
from fedsafe.aggregators.requirements import (require, trimmed_mean_min_clients, trimmed_mean_needs,
                                               trimmed_per_side, validate_trim)

log = logging.getLogger("fedsafe")


class TrimmedMean(Aggregator):
    """Drop floor(beta*n) (or f) values from each end of every coordinate, average the rest."""

    name = "trimmed_mean"

    def __init__(self, beta: float | None = None, f: int | None = None):
        self.beta, self.f = validate_trim(beta, f)

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        n, d = updates.shape
        if self.f is not None:
            require(trimmed_mean_needs(f=self.f), n)
        k = trimmed_per_side(n, self.beta, self.f)
        if k == 0 and self.beta:  # fl.clients_per_round is checked at config load; a short round lands here
            log.warning("trimmed_mean: beta=%g trims nothing from %d updates (needs %d): this round is the plain "
                        "mean", self.beta, n, trimmed_mean_min_clients(self.beta))
        out = torch.empty(d, device=updates.device)
        lo_vals, hi_vals = torch.empty(d, device=updates.device), torch.empty(d, device=updates.device)
        for cols in column_chunks(n, d, per_column=2):
            vals = sort_columns(updates[:, cols])
            lo_vals[cols], hi_vals[cols] = vals[k], vals[n - k - 1]
            out[cols] = vals[k:n - k].mean(dim=0)
        # each client's share of the kept places, computed when first asked for (issue 32: weights only on demand)
        return AggregationResult(out, lambda: window_weights(updates, lo_vals, hi_vals, k, n - k),
                                 {"trimmed_per_side": k})

    def __repr__(self) -> str:
        return f"TrimmedMean(f={self.f})" if self.f is not None else f"TrimmedMean(beta={self.beta})"
