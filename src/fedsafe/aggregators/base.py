"""The aggregator contract shared by every rule: stacked updates in, aggregate and client weights out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RoundContext:
    """What a stateful rule may use before aggregation (see :meth:`Aggregator.prepare`).

    ``truth`` (client id -> malicious) is the simulator's ground truth: rules may log metrics against it
    (the probe's ROC-AUC) but must never decide with it. ``shadow`` is the server's shadow-training
    service (:class:`fedsafe.defenses.shadow.ShadowTrainer`) when the experiment built one.
    ``client_extra`` is filled by the server with each client's ``ClientResult.extra`` right before
    aggregation (e.g. the step-level reports of the probe).
    """

    round: int
    global_vec: torch.Tensor
    round_config: Any = None
    truth: dict[str, bool] | None = None
    shadow: Any = None
    client_extra: dict[str, dict] = field(default_factory=dict)


@dataclass
class AggregationResult:
    """An aggregate update ``[d]``, the effective weight of each client ``[n]`` (0 = excluded) and details."""

    update: torch.Tensor
    client_weights: torch.Tensor
    info: dict = field(default_factory=dict)


class Aggregator:
    """Base class: ``agg(updates[n, d], num_samples[n], client_ids) -> AggregationResult``.

    Stateless rules implement :meth:`aggregate`. Stateful rules (FoolsGold's history) keep their state
    keyed by client id and expose it through :meth:`state_dict` / :meth:`load_state_dict` so that a
    resumed run continues with the same state.
    """

    name = "aggregator"
    #: True when the rule needs individual plaintext updates (refused under secure aggregation)
    needs_plaintext = True

    def __call__(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        if updates.ndim != 2:
            raise ValueError(f"{self.name}: updates must be [n, d], got shape {tuple(updates.shape)}")
        n = updates.shape[0]
        if num_samples.shape != (n,) or len(client_ids) != n:
            raise ValueError(f"{self.name}: {n} updates but {tuple(num_samples.shape)} sample counts and "
                             f"{len(client_ids)} client ids")
        return self.aggregate(updates.float(), num_samples.float(), list(client_ids))

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        raise NotImplementedError

    def prepare(self, context: RoundContext):
        """Hook at the start of a round, before local training; returns the RoundConfig to send.

        Stateless rules ignore it. The probe uses it for shadow training and to ask for step reports.
        """
        return context.round_config

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def sample_weights(num_samples: torch.Tensor) -> torch.Tensor:
    """Normalised sample-count weights (uniform when all counts are zero)."""
    total = num_samples.sum()
    if total <= 0:
        return torch.full_like(num_samples, 1.0 / len(num_samples))
    return num_samples / total
