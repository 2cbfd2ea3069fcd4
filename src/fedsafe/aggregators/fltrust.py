"""FLTrust: trust bootstrapped from the server's own update on a small root dataset.

Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping" (NDSS 2021),
Algorithm 1. Each round the server trains its own update g_0 from the current global model on a small clean
root dataset, with the clients' local training; then for each client update g_i

    TS_i  = ReLU(cos(g_i, g_0))                          trust score
    g'_i  = (||g_0|| / ||g_i||) * g_i                    rescaled to the server update's norm
    Delta = sum_i TS_i g'_i / sum_i TS_i

Unweighted by sample counts, as in the paper. Hyperparameters: none of the rule's own; the root dataset and
how the server trains on it are the ``fltrust`` plug-in's (:mod:`fedsafe.aggregators.fltrust_root`: by
default the post-hoc defense's aligned + normal data, the natural clean set a safety-minded server holds).
The plug-in gives the rule a callable ``root_update(global_vec, round_config) -> g_0`` that :meth:`prepare`
calls at the start of each round; tests and other callers may instead set ``server_update`` directly.

Edge cases, where the formula divides by zero:
  * a zero client update has cosine 0 with g_0 (trust 0; it contributes nothing);
  * a zero server update gives every client trust 0, and so does ReLU when every cosine is <= 0: the sum of
    trust scores is 0 and the aggregate is the zero update (the round leaves the model unchanged),
    ``info["all_zero_trust"] = True``. The authors' MXNet code adds 1e-9 to the norms and to the sum of
    trust scores, which returns the same zero update there and moves other results by ~1e-9 relative.
Works with any n >= 1.

``client_weights``: TS_i ||g_0|| / (||g_i|| sum_k TS_k), the coefficient of g_i in the aggregate (they sum to
1 only when every update has the server update's norm). ``info`` has the trust scores, the cosines and
the server update's norm.
"""

from __future__ import annotations

import logging

import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator
from fedsafe.errors import ConfigError

log = logging.getLogger("fedsafe")


def fltrust_weights(updates: torch.Tensor, server_update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLTrust's coefficients ``[n]`` (float64; aggregate = coefficients @ updates) and the cosines ``[n]``."""
    u = updates.double()
    g0 = server_update.to(updates.device).double()
    g0_norm = torch.linalg.vector_norm(g0)
    norms = torch.linalg.vector_norm(u, dim=1)
    denom = norms * g0_norm
    cos = torch.where(denom > 0, (u @ g0) / torch.where(denom > 0, denom, torch.ones_like(denom)),
                      torch.zeros_like(denom))
    trust = cos.clamp_min(0.0)
    total = trust.sum()
    if not float(total) > 0:
        return torch.zeros_like(trust), cos
    scale = torch.where(norms > 0, g0_norm / torch.where(norms > 0, norms, torch.ones_like(norms)),
                        torch.zeros_like(norms))
    return trust * scale / total, cos


class FLTrust(Aggregator):
    """Trust score ReLU(cos) to the server's root-data update; client updates rescaled to its norm."""

    name = "fltrust"

    def __init__(self):
        self.server_update: torch.Tensor | None = None
        self.root_update = None  # callable (global_vec, round_config) -> server update, set by the plug-in

    def prepare(self, context):
        """Round start: the server's own update on its root dataset from the current global adapter."""
        if self.root_update is not None:
            self.server_update = self.root_update(context.global_vec, context.round_config).detach().float()
        return context.round_config

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        if self.server_update is None:
            raise ConfigError("aggregator.name=fltrust needs the server's update on its root dataset each round: "
                              "the fltrust plug-in trains it (fltrust.root, default the post-hoc defense's "
                              "aligned + normal data); none was given")
        g0 = self.server_update
        if g0.numel() != updates.shape[1]:
            raise ValueError(f"fltrust: server update has {g0.numel()} values, the client updates {updates.shape[1]}")
        coef, cos = fltrust_weights(updates, g0)
        weights = coef.float()
        all_zero = not bool((coef > 0).any())
        if all_zero:
            log.warning("fltrust: no client update has a positive cosine with the server update (norm %.3g): "
                        "zero aggregate this round", float(g0.norm()))
        info = {"trust": cos.clamp_min(0).tolist(), "cosine": cos.tolist(), "server_update_norm": float(g0.norm()),
                "all_zero_trust": all_zero}
        return AggregationResult(weights @ updates, weights, info)

    def __repr__(self) -> str:
        return "FLTrust()"
