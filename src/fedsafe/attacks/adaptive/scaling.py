"""Scaling / explicit boosting.

Bhagoji, Chakraborty, Mittal, Calo, "Analyzing Federated Learning through an Adversarial Lens" (ICML 2019),
explicit boosting: the malicious client sends its update scaled by a boosting factor so that it survives the
server's averaging,

    send  lambda * h                             (lambda = ``scale``; default n / f, which undoes the 1/n
                                                  averaging of the f malicious updates, as in the paper's
                                                  lambda = 1 / alpha_m with weight alpha_m = f / n)
    or    h * mean_i ||b_i|| / ||h||             (``norm_match``: the benign norm, so that norm-based rules
                                                  such as norm clipping see a typical norm)

where b_i are the benign updates (partial knowledge: the attacker's shadows; full: the round's benign clients).
"""

from __future__ import annotations

import torch
from pydantic import Field

from fedsafe.attacks.adaptive.base import AttackConfig


class Config(AttackConfig):
    """``{name: scaling, scale: 4}`` or ``{name: scaling, norm_match: true}``."""

    scale: float | None = Field(None, gt=0, description="boosting factor lambda (default n / f)")
    norm_match: bool = Field(False, description="rescale h to the mean benign norm instead of boosting")


def craft(h: torch.Tensor, benign: torch.Tensor | None, n: int, f: int, cfg: Config, **_):
    """``lambda * h``, or ``h`` rescaled to the mean benign norm (``norm_match``)."""
    if cfg.norm_match:
        if benign is None or len(benign) == 0:
            raise ValueError("scaling with norm_match needs benign updates")
        target = float(benign.float().norm(dim=1).mean())
        h_norm = float(h.norm())
        factor = target / h_norm if h_norm > 0 else 0.0
    else:
        factor = cfg.scale if cfg.scale is not None else n / max(f, 1)
    return h * factor, {"factor": factor}
