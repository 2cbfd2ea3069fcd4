"""Update-level membership inference: does one client's update Delta_k reveal which texts it trained on?

The server of round t holds the global adapter theta_t and receives Delta_k (or, under secure aggregation, only
the decrypted sum). For a candidate text x it computes the likelihood-ratio statistic

    s(x; Delta) = loss(theta_t; x) - loss(theta_t + Delta; x),

the drop of x's mean token loss caused by the update: a step of gradient descent on x lowers x's loss most.
This is the loss-difference ("model-update") membership test of Salem et al., "Updates-Leak: Data Set
Inference and Reconstruction Attacks in Online Learning" (USENIX Security 2020) and of the update-based
attacks in Nasr, Shokri & Houmansadr, "Comprehensive Privacy Analysis of Deep Learning" (IEEE S&P 2019,
passive server on individual updates), with the reference calibration of Carlini et al., "Membership Inference
Attacks From First Principles" / "Extracting Training Data from Large Language Models" (USENIX Security 2021):
the same statistic under a *reference* update Delta_ref that did not train on x (the mean of the other clients'
updates of the round, or under secure aggregation the previous round's aggregate) is subtracted, which removes
what every update does to every text (learning the chat format, the task):

    s_ref(x) = s(x; Delta) - s(x; Delta_ref) = loss(theta_t + Delta_ref; x) - loss(theta_t + Delta; x).

Reported: the AUC of s (``auc``) and of s_ref (``auc_ref``) for members (texts the client trained on this
round) against non-members (held-out texts nobody trained on), as in the global-model attack of
:mod:`fedsafe.attacks.privacy_extraction.extraction`, whose scoring helpers (:func:`~fedsafe.attacks.privacy_extraction.extraction.sequence_nll`,
:func:`~fedsafe.attacks.privacy_extraction.extraction.membership_auc`) this module reuses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsafe.attacks.privacy_extraction.extraction import membership_auc, sequence_nll
from fedsafe.data.format import TokenizedExample


def mean_losses(model, flat, vec: torch.Tensor, examples: Sequence[TokenizedExample], pad_id: int,
                batch_size: int = 16) -> list[float]:
    """Mean token loss of each example with the LoRA vector ``vec`` loaded (the model's vector is restored)."""
    saved = flat.get()
    try:
        flat.set(vec)
        return [s / max(n, 1) for s, n in sequence_nll(model, list(examples), pad_id, batch_size)]
    finally:
        flat.set(saved)


def update_membership_inference(model, flat, global_vec: torch.Tensor, update: torch.Tensor,
                                members: Sequence[TokenizedExample], nonmembers: Sequence[TokenizedExample],
                                pad_id: int, *, reference_update: torch.Tensor | None = None,
                                batch_size: int = 16, base_losses: list[float] | None = None) -> dict:
    """AUC of the update's loss drop (and of its reference-calibrated form) for members vs non-members.

    ``update`` is what the server sees (an individual update, a sum divided by its count, a clipped and
    noised update); ``reference_update`` a comparable update that did not train on the members (None: no
    calibration). ``base_losses`` (losses at ``global_vec`` of members + non-members, in that order) saves one
    scoring pass when several views of the same round are attacked.
    """
    texts = list(members) + list(nonmembers)
    m = len(members)
    if not m or len(texts) == m:
        return {"auc": float("nan"), "n_members": m, "n_nonmembers": len(texts) - m}
    base = base_losses if base_losses is not None else mean_losses(model, flat, global_vec, texts, pad_id,
                                                                   batch_size)
    after = mean_losses(model, flat, global_vec + update.to(global_vec.dtype), texts, pad_id, batch_size)
    ref = (mean_losses(model, flat, global_vec + reference_update.to(global_vec.dtype), texts, pad_id, batch_size)
           if reference_update is not None else None)
    return membership_scores(base, after, ref, m)


def membership_scores(base: list[float], after: list[float], reference: list[float] | None, n_members: int) -> dict:
    """The statistics from per-text losses (members first): at the global adapter, after the update, and
    after the reference update (None: no calibration)."""
    m = n_members
    gain = [b - a for b, a in zip(base, after)]
    out = {"auc": membership_auc(gain[:m], gain[m:]),
           "member_gain": sum(gain[:m]) / m, "nonmember_gain": sum(gain[m:]) / (len(gain) - m),
           "n_members": m, "n_nonmembers": len(gain) - m}
    if reference is not None:
        cal = [r - a for r, a in zip(reference, after)]
        out["auc_ref"] = membership_auc(cal[:m], cal[m:])
    return out
