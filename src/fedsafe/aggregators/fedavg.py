"""FedAvg: the sample-weighted mean of client updates.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data"
(AISTATS 2017): Delta = sum_k (n_k / sum_j n_j) * delta_k.
"""

from __future__ import annotations

import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator, sample_weights


class FedAvg(Aggregator):
    """Sample-weighted mean; ``weighted=False`` gives the plain mean."""

    name = "fedavg"
    needs_plaintext = False

    def __init__(self, weighted: bool = True):
        self.weighted = weighted

    def weights(self, num_samples: torch.Tensor) -> torch.Tensor:
        """The mean's weights ``[n]``: sample shares, or 1/n each."""
        return sample_weights(num_samples) if self.weighted else torch.full_like(num_samples, 1.0 / len(num_samples))

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        w = self.weights(num_samples)
        return AggregationResult(w @ updates, w, {})
