"""Bulyan.

El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium"
(ICML 2018), Algorithm 1 with Krum as the inner rule. With f assumed Byzantine clients among n >= 4f + 3:

1. Selection: theta = n - 2f updates are chosen one at a time; each step runs Krum on the remaining set R
   (score = sum of squared distances to the |R| - f - 2 nearest others in R) and moves the winner to S.
2. Coordinate-wise: beta = theta - 2f; for every coordinate j the output is the mean of the beta values of
   S closest to median_j(S) (the midpoint median when theta is even).

In the last selection steps |R| - f - 2 drops below 1 (|R| reaches 2f + 1); the score then uses the single
nearest neighbour, as Krum needs at least one.

The beta values closest to the median are a contiguous run of the sorted column, so step 2 is computed on
sorted columns without a per-coordinate loop.

``client_weights``: the share of output coordinates each client produced (1/beta per coordinate in which
its value is among the beta averaged), summed over coordinates and divided by d; 0 outside S.
"""

from __future__ import annotations

import torch

from fedsafe.aggregators.base import (AggregationResult, Aggregator, check_f, column_chunks, median_of_sorted,
                                      pairwise_sq_distances, sort_columns, validate_f, window_shares)
from fedsafe.aggregators.requirements import bulyan_needs, require


def recursive_krum(sq_dist: torch.Tensor, f: int, theta: int) -> list[int]:
    """Indices chosen by theta successive Krum selections on the shrinking remaining set."""
    remaining = list(range(sq_dist.shape[0]))
    chosen = []
    for _ in range(theta):
        sub = sq_dist[remaining][:, remaining].clone()
        sub.fill_diagonal_(float("inf"))
        k = max(1, len(remaining) - f - 2)
        scores = torch.sort(sub, dim=1).values[:, :k].sum(dim=1) if len(remaining) > 1 else torch.zeros(1, device=sq_dist.device)
        best = int(torch.argmin(scores))  # first minimum: deterministic on ties
        chosen.append(remaining.pop(best))
    return chosen


class Bulyan(Aggregator):
    """Recursive Krum selection of n - 2f updates, then the coordinate-wise mean around the median."""

    name = "bulyan"

    def __init__(self, f: int = 1):
        self.f = validate_f(f)

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        n, d = updates.shape
        f = self.f
        require(bulyan_needs(f), n)
        check_f(self.name, f, n)
        theta = n - 2 * f
        beta = theta - 2 * f
        # exact ties are certain at the last selections (with k = 1 two mutual nearest neighbours score the
        # same), so select in client-id order: the result must not depend on the order the clients arrived in
        order = sorted(range(n), key=lambda i: client_ids[i])
        selected = [order[i] for i in recursive_krum(pairwise_sq_distances(updates[order]), f, theta)]
        dev = updates.device
        sel = torch.tensor(sorted(selected), device=dev)
        subset = updates[sel]
        out = torch.empty(d, device=dev)
        shares = torch.zeros(theta, dtype=torch.float64, device=dev)
        slots = torch.arange(theta, device=dev)[:, None]
        for cols in column_chunks(theta, d, per_column=4):
            block = subset[:, cols].contiguous()
            vals = sort_columns(block)
            med = median_of_sorted(vals)
            # window [j, j+beta) of the sorted column: the beta values nearest the median minimise the
            # larger of the two distances from the median to the window's ends
            windows = theta - beta + 1
            reach = torch.maximum(med - vals[:windows], vals[beta - 1:beta - 1 + windows] - med)
            start = torch.argmin(reach, dim=0)  # first minimum on ties
            in_window = (slots >= start) & (slots < start + beta)
            out[cols] = (vals * in_window).sum(dim=0) / beta
            shares += window_shares(block, vals, start, start + beta) / beta
        weights = torch.zeros(n, device=dev)
        weights[sel] = (shares / d).float()
        return AggregationResult(out, weights, {"selected": selected, "theta": theta, "beta": beta})

    def __repr__(self) -> str:
        return f"Bulyan(f={self.f})"
