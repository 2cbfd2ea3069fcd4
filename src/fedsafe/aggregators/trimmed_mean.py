"""Coordinate-wise beta-trimmed mean.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates" (ICML 2018): for every coordinate j sort delta_1j..delta_nj, drop k = floor(beta * n) values from
each end and average the n - 2k that remain. ``beta`` in [0, 1/2); beta = 0 is the plain mean. With
beta > 0, a config whose ``fl.clients_per_round`` gives k = 0 is refused when it is loaded (it would be the
plain mean under another name); a round that ends up shorter averages everything and logs a warning.

(Ye et al.'s code fixes k = 1, which with 3 clients per round is the median; here k follows beta and n.)

``client_weights``: the share of the output each client produced: 1/(n-2k) per coordinate it survives in,
summed over coordinates and divided by d (the weights sum to 1; clients tied on a boundary value share
the places it holds).
"""

from __future__ import annotations

import logging

import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator, column_chunks, sort_columns, window_shares
from fedsafe.aggregators.requirements import trimmed_mean_min_clients, validate_beta

log = logging.getLogger("fedsafe")


class TrimmedMean(Aggregator):
    """Drop floor(beta*n) values from each end of every coordinate, average the rest."""

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.1):
        self.beta = validate_beta(beta)

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        n, d = updates.shape
        k = int(self.beta * n)
        keep = n - 2 * k
        if k == 0 and self.beta > 0:  # fl.clients_per_round is checked at config load; a short round lands here
            log.warning("trimmed_mean: beta=%g trims nothing from %d updates (needs %d): this round is the plain "
                        "mean", self.beta, n, trimmed_mean_min_clients(self.beta))
        out = torch.empty(d, device=updates.device)
        shares = torch.zeros(n, dtype=torch.float64, device=updates.device)
        for cols in column_chunks(n, d, per_column=4):
            block = updates[:, cols].contiguous()
            vals = sort_columns(block)
            out[cols] = vals[k:n - k].mean(dim=0)
            shares += window_shares(block, vals, k, n - k) / keep
        return AggregationResult(out, (shares / d).float(), {"trimmed_per_side": k})

    def __repr__(self) -> str:
        return f"TrimmedMean(beta={self.beta})"
