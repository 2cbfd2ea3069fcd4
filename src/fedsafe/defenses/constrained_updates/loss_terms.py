"""Regularisation-constrained local updates: an L2 proximal term and a KL term to the global model.

Guo et al. (Findings of EMNLP 2025) find that constraining how far a client's model moves from the global
model reduces what the global model memorises of any one client's data. Two loss terms, added by
:class:`~fedsafe.fl.client.LocalTrainer` to every micro-batch loss:

- ``ProximalL2``: (mu / 2) * ||theta - theta_global||^2 on the LoRA parameters (the FedProx term of
  Li et al., MLSys 2020, here composable with any fl.algorithm);
- ``KLToGlobal``: beta * KL(p_global || p_local) with both distributions at temperature T, averaged over each
  example's own response tokens and then over the examples (``per_example`` gives the per-example values).
  A mean over all of the batch's tokens would weight an example by the other examples' lengths, which
  couples them and breaks local DP-SGD's per-example sensitivity; the per-example mean does not. The global
  model's logits come from the same in-memory model with the global LoRA tensors substituted by
  ``torch.func.functional_call`` (no copy of the model, and the trained parameters are never modified in
  place, so autograd stays valid). Cost: one extra forward pass without
  gradients per micro-batch (about a third of a training step); the pass is skipped while the local
  parameters still equal the global ones (the first step of each round), where the KL is exactly zero.
"""

from __future__ import annotations

import torch

from fedsafe.data.format import IGNORE_INDEX


class ProximalL2:
    """(mu / 2) ||theta - theta_global||^2 over the trainable (LoRA) parameters."""

    data_independent = True  # its gradient does not touch the data (DP-SGD adds it after the noise)

    def __init__(self, mu: float):
        self.mu = mu
        self.anchor: list[torch.Tensor] | None = None

    def start(self, model: torch.nn.Module, global_vec: torch.Tensor) -> None:
        """Remember the global parameters the round starts from."""
        self.anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def __call__(self, model, batch, out) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        if self.anchor is None:
            raise RuntimeError("ProximalL2 used before start(); the trainer calls start() at the start of fit")
        return 0.5 * self.mu * sum(((p - a) ** 2).sum() for p, a in zip(params, self.anchor))

    def add_grad(self, params: list[torch.Tensor]) -> None:
        """Add the term's gradient mu (theta - theta_global) to ``p.grad`` directly."""
        with torch.no_grad():
            for p, a in zip(params, self.anchor):
                p.grad.add_(p.detach() - a, alpha=self.mu)


class KLToGlobal:
    """beta * KL(p_global || p_local) on each example's response tokens, averaged over the batch's examples."""

    data_independent = False

    def __init__(self, beta: float, temperature: float = 1.0):
        self.beta = beta
        self.temperature = temperature
        self.global_params: dict[str, torch.Tensor] | None = None
        self._versions: list[int] | None = None
        self.extra_forwards = 0  # how many global-model passes were run (cost accounting, tests)

    def start(self, model: torch.nn.Module, global_vec: torch.Tensor) -> None:
        """Keep a copy of the global LoRA tensors by name (the model holds them at the start of fit)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.global_params = {n: p.detach().clone() for n, p in named}
        self._versions = [p._version for _, p in named]

    def _unchanged(self, model) -> bool:
        # optimizer steps update parameters in place, which bumps their version counters
        return self._versions == [p._version for p in model.parameters() if p.requires_grad]

    def per_example(self, model, batch, out) -> torch.Tensor:
        """beta * KL per example [b]: the mean over that example's response tokens only (0 if it has none)."""
        if self.global_params is None:
            raise RuntimeError("KLToGlobal used before start(); the trainer calls start() at the start of fit")
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        if self._unchanged(model) or not bool(mask.any()):
            return logits.sum((1, 2)) * 0.0  # theta == theta_global: KL is exactly 0 (and so is its gradient)
        with torch.no_grad():
            self.extra_forwards += 1
            g = torch.func.functional_call(model, self.global_params, args=(),
                                           kwargs={"input_ids": batch["input_ids"],
                                                   "attention_mask": batch["attention_mask"]},
                                           strict=False).logits[:, :-1].float()
        t = self.temperature
        log_p_local = torch.log_softmax(logits / t, dim=-1)
        log_p_global = torch.log_softmax(g / t, dim=-1)
        kl_tokens = (log_p_global.exp() * (log_p_global - log_p_local)).sum(-1)  # [b, L]
        kl_tokens = torch.where(mask, kl_tokens, torch.zeros_like(kl_tokens))
        return self.beta * kl_tokens.sum(1) / mask.sum(1).clamp(min=1)

    def __call__(self, model, batch, out) -> torch.Tensor:
        return self.per_example(model, batch, out).mean()


def loss_terms(cfg) -> list:
    """The loss terms a ``constrained`` section asks for (empty when both coefficients are 0)."""
    terms: list = []
    if cfg.l2_mu > 0:
        terms.append(ProximalL2(cfg.l2_mu))
    if cfg.kl_beta > 0:
        terms.append(KLToGlobal(cfg.kl_beta, cfg.kl_temperature))
    return terms
