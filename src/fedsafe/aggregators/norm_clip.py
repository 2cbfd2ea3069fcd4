"""Norm clipping in front of any rule.

Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?" (2019): each update is scaled
to norm at most ``max_norm``,  delta_i <- delta_i * min(1, max_norm / ||delta_i||),  and the clipped
updates go to the inner rule (FedAvg by default), e.g. ``{name: norm_clip, params: {max_norm: 1.0,
aggregator: krum, params: {f: 1}}}``.

``client_weights`` are the inner rule's; ``info`` adds each client's norm and whether it was clipped.
"""

from __future__ import annotations

import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator


class NormClip(Aggregator):
    """Clip every update to ``max_norm``, then aggregate with the inner rule."""

    name = "norm_clip"

    def __init__(self, max_norm: float, aggregator: str = "fedavg", params: dict | None = None):
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        from fedsafe import aggregators

        self.max_norm = float(max_norm)
        self.inner = aggregators.get(aggregator, **(params or {}))

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        norms = updates.norm(dim=1)
        scale = (self.max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
        res = self.inner(updates * scale[:, None], num_samples, client_ids)
        info = dict(res.info)
        info.update({"norms": norms.tolist(), "clipped": (scale < 1).tolist()})
        return AggregationResult(res.update, res.client_weights, info)

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state.get("inner") or {})

    def __repr__(self) -> str:
        return f"NormClip(max_norm={self.max_norm}, inner={self.inner!r})"
