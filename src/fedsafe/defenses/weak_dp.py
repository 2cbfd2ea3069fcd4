"""Norm bounding with weak differential privacy, in front of any rule.

Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?" (arXiv:1911.07963, 2019),
Section 4: the server clips every client update to norm at most ``max_norm`` and adds a small Gaussian noise to
the aggregate,

    delta_i <- delta_i * min(1, max_norm / ||delta_i||),      aggregate <- rule(delta_1..n) + N(0, noise_std^2 I).

The paper shows that this mitigates targeted (backdoor) attacks at a small cost in accuracy; "weak" because
the noise is far below what a differential-privacy guarantee needs, so no epsilon is claimed (use the
differential_privacy plug-in, ``dp.client_level``, for a guarantee). Unlike DP-FedAvg it works with any rule:
the clipped updates go to ``aggregator.name``. Hook: ``server_view`` (it needs plaintext updates, so it is
refused under secure aggregation). The noise is seeded by the experiment seed and the round.

    weak_dp: {enabled: true, max_norm: 0.5, noise_std: 0.001}
"""

from __future__ import annotations

from pydantic import Field

from fedsafe.errors import ConfigError
from fedsafe.plugins import Plugin, register
from fedsafe.schema import Strict


class WeakDPConfig(Strict):
    """Norm bounding + weak DP (Sun et al. 2019): clip each update, noise the aggregate."""

    enabled: bool = False
    max_norm: float = Field(1.0, gt=0, description="L2 bound M of every client update")
    noise_std: float = Field(0.0, ge=0, description="std of the Gaussian noise added to each coordinate of the "
                                                    "aggregate (0: norm bounding only)")


class WeakDPRule:
    """Clip each update to ``max_norm``, aggregate with ``inner``, add N(0, noise_std^2) to the aggregate."""

    name = "weak_dp"

    def __init__(self, inner, max_norm: float, noise_std: float, seed: int = 0):
        self.inner, self.max_norm, self.noise_std, self.seed = inner, max_norm, noise_std, seed
        self.round = 0

    def __getattr__(self, name):  # prepare, needs_shadow, ... of the inner rule
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, updates, num_samples, client_ids):
        import torch

        from fedsafe.fl.update_ops import clip_rows

        self.round += 1
        clipped, norms = clip_rows(updates.float(), self.max_norm)
        res = self.inner(clipped.to(updates.dtype), num_samples, client_ids)
        if self.noise_std > 0:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.round)
            res.update = res.update + self.noise_std * torch.randn(res.update.shape, generator=gen).to(res.update)
        res.info = {**(res.info or {}), "weak_dp": {"norms": norms.tolist(), "clipped": (norms > self.max_norm).tolist(),
                                                    "max_norm": self.max_norm, "noise_std": self.noise_std}}
        return res

    def state_dict(self) -> dict:
        inner = self.inner.state_dict() if hasattr(self.inner, "state_dict") else {}
        return {"round": self.round, "inner": inner}

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state.get("round", 0))
        if hasattr(self.inner, "load_state_dict") and state.get("inner"):
            self.inner.load_state_dict(state["inner"])


@register
class WeakDP(Plugin):
    """Norm bounding and weak DP in front of the configured rule."""

    name = "weak_dp"
    kind = "defense"
    section = "weak_dp"
    Config = WeakDPConfig
    order = 35  # after the probe has built its rule, before local probing wraps the result
    plaintext_updates = "clips each client's plaintext update"

    @classmethod
    def check(cls, config, setup) -> None:
        if setup.fl.lora_aggregation == "fedex" and config.noise_std > 0:
            raise ConfigError(f"fl.lora_aggregation=fedex cannot be combined with weak_dp.noise_std="
                              f"{config.noise_std:g}: noise added to the aggregated factors has no counterpart over "
                              "the client models, so the residual could not follow it (weak_dp.noise_std=0, norm "
                              "bounding only, works; or use fl.lora_aggregation=ffa or rolora)")

    def server_view(self, aggregator):
        return WeakDPRule(aggregator, self.config.max_norm, self.config.noise_std, self.ctx.seed)
