"""Norm clipping in front of any rule.

Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?" (2019): each update is scaled
to norm at most ``max_norm``,  delta_i <- delta_i * min(1, max_norm / ||delta_i||),  and the clipped
updates go to the inner rule (FedAvg by default). It is a pre-aggregation step
(:mod:`fedsafe.aggregators.wrappers`), written either way:

    {name: norm_clip+krum, params: {f: 1, norm_clip: {max_norm: 1.0}}}
    {name: norm_clip, params: {max_norm: 1.0, aggregator: krum, params: {f: 1}}}   (the inner rule by name)

``client_weights`` are the inner rule's; ``info`` adds each client's norm and whether it was clipped.

The factors s_i = min(1, max_norm / ||delta_i||) are :func:`fedsafe.fl.update_ops.clip_factors`, the one row
clipping DP and weak DP use too. Without a copy: in front of FedAvg (a weighted mean) they fold into the mean's
weights, Delta = sum_i (w_i s_i) delta_i, so the [n, d] matrix of clipped updates is never built (issue 32); other
inner rules receive the clipped matrix.
"""

from __future__ import annotations

from fedsafe.aggregators.base import AggregationResult
from fedsafe.aggregators.wrappers import Wrapper
from fedsafe.fl.update_ops import clip_factors


class NormClip(Wrapper):
    """Clip every update to ``max_norm``, then aggregate with the inner rule."""

    name = "norm_clip"

    def __init__(self, max_norm: float, aggregator: str | None = None, params: dict | None = None, inner=None):
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        if inner is not None and (aggregator is not None or params):
            raise ValueError("give the inner rule either as norm_clip+<rule> or as aggregator/params, not both")
        if inner is None:
            from fedsafe import aggregators

            inner = aggregators.get(aggregator or "fedavg", **(params or {}))
        super().__init__(inner)
        if aggregator is not None or params is not None or type(inner).__name__ == "FedAvg":
            self.name = "norm_clip"  # the older spelling keeps its name in the round records
        self.max_norm = float(max_norm)

    def pre(self, updates, num_samples, client_ids):
        scale, norms = clip_factors(updates, self.max_norm)
        return updates * scale[:, None], None, {"norms": norms.tolist(), "clipped": (scale < 1).tolist()}

    def aggregate(self, updates, num_samples, client_ids) -> AggregationResult:
        from fedsafe.aggregators.fedavg import FedAvg

        if type(self.inner) is not FedAvg:
            return super().aggregate(updates, num_samples, client_ids)
        scale, norms = clip_factors(updates, self.max_norm)
        weights = self.inner.weights(num_samples)
        return AggregationResult((weights * scale) @ updates, weights,
                                 {"norms": norms.tolist(), "clipped": (scale < 1).tolist()})

    def post(self, res, how, info) -> AggregationResult:
        return AggregationResult(res.update, res.client_weights, {**res.info, **info})

    def __repr__(self) -> str:
        return f"NormClip(max_norm={self.max_norm}, inner={self.inner!r})"
