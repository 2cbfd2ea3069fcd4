"""Probe evasion against Safe-FedLLM's probe (and a late start against defenses that freeze trust).

Tao et al., "Safe-FedLLM" (ACL 2026) classify each client by the LoRA-B update of the first transformer
layer (:mod:`fedsafe.aggregators.probe`). An attacker who knows this keeps exactly that slice benign-looking
and poisons the rest:

    u = h,   u[M] = mean_i b_i[M]

with M the probe's feature mask (``layers``/``kind``, default LoRA B of the first layer, as the probe's
default) and b_i benign updates trained from the same global adapter on benign-looking data (partial
knowledge: the attacker's own benign shadows, trained on ``benign_data`` only; full: the round's benign
clients). The slice is thus what training on normal data alone gives it, and the harmful signal rides in
every other layer. Not built: training the slice only on normal batches *jointly* with the rest (the slice's
gradient would then see the poisoned other layers); the replacement above is the shadow-slice form.

Late start (``start_round: k``, an option of every adaptive attack): before round k the client trains on
``benign_data`` and sends an honest benign update, so a probe fitted once (``probe.refit_every: 0``) or a
trust score built over the first rounds sees a benign client.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedsafe.attacks.adaptive.base import AttackConfig


class Config(AttackConfig):
    """``{name: probe_evasion}``, optionally ``start_round: 3`` and the probe's ``layers``/``kind``."""

    layers: Literal["first", "all"] | list[int] = Field("first", description="layers the probe reads "
                                                                             "(as probe.features.layers)")
    kind: Literal["A", "B", "both"] = Field("B", description="LoRA factor(s) the probe reads "
                                                             "(as probe.features.kind)")


def feature_mask(flat, layers="first", kind: str = "B") -> torch.Tensor:
    """The probe's feature mask over a :class:`~fedsafe.fl.params.FlatLoRA` layout."""
    layer_ids = sorted({s.layer for s in flat.specs if s.layer is not None})
    chosen = layer_ids[:1] if layers == "first" else None if layers == "all" else list(layers)
    mask = flat.mask(None if kind == "both" else kind, chosen)
    if not bool(mask.any()):
        raise ValueError(f"probe_evasion: layers={layers}, kind={kind} select no LoRA weight")
    return mask


def craft(h: torch.Tensor, benign: torch.Tensor | None, n: int, f: int, cfg: Config,
          mask: torch.Tensor | None = None, **_):
    """``h`` with the probe's slice replaced by the benign updates' mean slice."""
    if mask is None:
        raise ValueError("probe_evasion needs the probe's feature mask")
    if benign is None or len(benign) == 0:
        raise ValueError("probe_evasion needs benign updates")
    update = h.float().clone()
    update[mask] = benign.float()[:, mask].mean(dim=0)
    return update, {"replaced": int(mask.sum())}
