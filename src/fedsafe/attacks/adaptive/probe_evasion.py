"""Probe evasion against Safe-FedLLM's probe (and a late start against defenses that freeze trust).

Tao et al., "Safe-FedLLM" (ACL 2026) classify each client by the LoRA-B update of the first transformer
layer (:mod:`fedsafe.aggregators.probe`). An attacker who knows this keeps exactly that slice benign-looking
and poisons the rest:

    u = h,   u[M] = mean_i b_i[M]

with M the probe's feature mask (``layers``/``kind``, default LoRA B of the first layer, as the probe's
default) and b_i benign updates trained from the same global adapter on benign-looking data (partial
knowledge: the attacker's own benign shadows, trained on ``benign_data`` only; full: the round's benign
clients). The slice is thus what training on normal data alone gives it, and the harmful signal rides in
every other layer (``slice: shadow``, the default).

``slice: normal_data`` is the other form of issue 18 item 6, "the attacker keeps that slice benign-looking
(trains it only on normal data)": the malicious client trains ONE model from the global adapter. Each local
step draws one batch of its own (unaligned) data and one batch of ``benign_data`` (normal data), and masks the
gradients (:func:`train_slice_on_normal`):

    g[M]  = grad_theta L(theta; normal batch)[M]       the probe's slice sees normal data only
    g[~M] = grad_theta L(theta; unaligned batch)[~M]   every other LoRA weight sees unaligned data only
    theta <- optimizer step on g (clipped to fl.max_grad_norm, as the honest loop)

so the slice is trained jointly with the poisoned rest (its gradient is taken through the poisoned other
layers, unlike the shadow slice, which never sees them), needs no shadow training, and works alike for both
``knowledge`` modes. The unaligned batches are those plain data poisoning draws (same seeds), so the non-slice
weights follow the harmful direction. The attacker trains with its own loop: fedprox's proximal term and the
trainer's loss terms are applied as in the honest loop; local DP-SGD noise is not (an attacker does not add it),
and ``fl.algorithm: scaffold`` is refused.

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
    slice: Literal["shadow", "normal_data"] = Field(
        "shadow", description="shadow: replace the probe's slice by the benign shadows' mean slice; normal_data: "
                              "train one model whose probe slice gets gradients from normal-data (benign_data) "
                              "batches only and every other LoRA weight from the unaligned batches only")

    @property
    def uses_statistics(self) -> bool:  # the shadow slice needs benign updates; normal_data trains the slice
        return self.slice == "shadow"


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


def train_slice_on_normal(trainer, client, normal: list, global_vec: torch.Tensor, rc, mask: torch.Tensor):
    """``slice: normal_data``: one local training of ``client`` whose probe slice ``mask`` [d] is trained on
    ``normal`` examples only and every other LoRA weight on the client's own (unaligned) examples only.

    Mirrors :meth:`fedsafe.fl.client.LocalTrainer._train` (seeds, batches, optimizer, clipping, frozen factors),
    with two backward passes per micro-batch whose gradients are merged by ``mask``; returns a ClientResult.
    """
    import time

    from fedsafe.data.format import collate
    from fedsafe.errors import ConfigError
    from fedsafe.fl.client import ClientResult, _batch_stream, check_base_residual, derive_seed, train_only

    if rc.algorithm == "scaffold":
        raise ConfigError("roles[i].attack: probe_evasion with slice=normal_data trains with its own loop and has "
                          "no SCAFFOLD control variate; use fl.algorithm fedavg/fedprox or slice: shadow")
    if not normal:
        raise ValueError("probe_evasion slice=normal_data: benign_data gives no normal example")
    t0 = time.perf_counter()
    flat, model, pad_id = trainer.flat, trainer.model, trainer.tokenizer.pad_token_id
    device = next(model.parameters()).device
    loss_terms = list(getattr(trainer, "loss_terms", []) or [])
    check_base_residual(model, rc)
    with train_only(flat, rc.trainable) as trained:
        flat.set(global_vec)
        for term in loss_terms:
            if hasattr(term, "start"):
                term.start(model, global_vec)
        seed = derive_seed(rc.seed, rc.round, client.client_id)  # as the honest loop: the same unaligned batches
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        normal_gen = torch.Generator().manual_seed(derive_seed(seed, "probe_evasion-normal"))
        pairs = [(p, mask[s.offset: s.offset + s.numel].view(s.shape).to(p.device))
                 for p, s in zip(flat.params, flat.specs) if p.requires_grad]
        params = [p for p, _ in pairs]
        optimizer = (torch.optim.SGD(params, lr=rc.lr, weight_decay=rc.weight_decay) if rc.optimizer == "sgd"
                     else torch.optim.AdamW(params, lr=rc.lr, weight_decay=rc.weight_decay))
        prox = [p.detach().clone() for p in params] if rc.algorithm == "fedprox" and rc.prox_mu > 0 else None
        batches = _batch_stream(len(client.examples), rc.batch_size, gen)
        normal_batches = _batch_stream(len(normal), rc.batch_size, normal_gen)
        model.train()

        def grads(examples, idx):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            out = model(**batch)
            loss = out.loss
            for term in loss_terms:
                loss = loss + term(model, batch, out)
            g = torch.autograd.grad(loss / rc.grad_accum, params, allow_unused=True)
            return [torch.zeros_like(p) if x is None else x for p, x in zip(params, g)], float(out.loss.detach())

        losses, normal_losses, seen = [], [], set()
        for _ in range(rc.local_steps):
            optimizer.zero_grad(set_to_none=True)
            for p in params:
                p.grad = torch.zeros_like(p)
            step_loss = step_normal = 0.0
            for _micro in range(rc.grad_accum):
                idx = next(batches)
                seen.update(idx)
                g_bad, loss_bad = grads(client.examples, idx)
                g_normal, loss_normal = grads(normal, next(normal_batches))
                for (p, m), gb, gn in zip(pairs, g_bad, g_normal):
                    p.grad.add_(torch.where(m, gn, gb))
                step_loss += loss_bad / rc.grad_accum
                step_normal += loss_normal / rc.grad_accum
            if prox is not None:
                with torch.no_grad():
                    for p, g0 in zip(params, prox):
                        p.grad.add_(p.detach() - g0, alpha=rc.prox_mu)
            if rc.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, rc.max_grad_norm)
            optimizer.step()
            losses.append(step_loss)
            normal_losses.append(step_normal)
        update = flat.get() - global_vec
    update[~trained] = 0.0
    metrics = {"loss": sum(losses) / len(losses), "first_loss": losses[0], "last_loss": losses[-1],
               "normal_loss": sum(normal_losses) / len(normal_losses), "steps": rc.local_steps,
               "samples": client.num_samples, "update_norm": float(update.norm()),
               "slice_update_norm": float(update[mask].norm()), "compute_seconds": time.perf_counter() - t0,
               "seconds": time.perf_counter() - t0, "seen_examples": sorted(seen)}
    return ClientResult(client.client_id, update, client.num_samples, metrics, {})
