"""Local training of one client: a short AdamW loop on LoRA weights, swapped into one shared model.

The client/server boundary is plain data: a client receives (global adapter as a flat vector,
:class:`RoundConfig`) and returns a :class:`ClientResult` (update vector, number of samples, metrics).
Engines (in-process, Flower) move these objects; nothing here knows about transport.

SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML 2020,
Algorithm 1) with AdamW local steps. The paper's local step is SGD on the corrected gradient,
y <- y - lr (g_i(y) - c_i + c), and its Option II, c_i+ = c_i - c + (x - y_i) / (K lr), "reuses the previously
computed gradients": under SGD it equals the mean (1/K) sum_k g_i(y_k) of the K local gradients. Two things
keep that meaning here, where AdamW takes the steps:

- c_i+ is that mean of the K local gradients, computed directly. The displacement formula would measure
  AdamW's sign-like step instead (|step| ~ lr per coordinate whatever the gradient), giving c_i ~ +-1 per
  coordinate, orders of magnitude above the gradient, and from round 2 on the correction would dominate
  training. Applying the correction after the optimizer step, as OpenFedLLM does (p -= lr (c - c_i), with
  Option II on the displacement), is self-consistent but makes c_i the mean AdamW direction (still ~ +-1),
  and its fixed point is where the clients' mean AdamW direction vanishes, not the optimum of the global
  objective, so it does not remove client drift; we do not follow it.
- The correction c - c_i, in gradient units, is added to the (clipped) gradient the optimizer consumes, so
  AdamW follows g_i - c_i + c, an estimate of the global gradient, as the paper's SGD does; clipping bounds
  the client's own gradient and never the correction. The global optimum is then a fixed point of local
  training (g_i(x*) - c_i + c = 0 when c_i = g_i(x*), c = mean_i g_i(x*) = 0).

c_i is a mean of gradients clipped to ``max_grad_norm``, so the server can bound an honest delta_c by
2 * max_grad_norm (fedsafe.fl.server).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from fedsafe.data.client_data import ClientData
from fedsafe.data.format import collate
from fedsafe.errors import FedsafeError
from fedsafe.fl.params import FlatLoRA


@dataclass
class RoundConfig:
    """What the server sends with the global adapter each round."""

    round: int
    lr: float
    local_steps: int
    batch_size: int
    grad_accum: int = 1
    seed: int = 0
    algorithm: str = "fedavg"
    prox_mu: float = 0.0
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd (fl.optimizer)
    scaffold_c: torch.Tensor | None = None  # server control variate (SCAFFOLD)
    total_samples: int = 0  # samples of all clients this round (lets clients pre-weight, e.g. under HE)
    # opt-in step-level reports (the probe's level=step): after every local step the client also returns
    # (local - global)[mask] in extra["step_updates"] [steps, mask.sum()]; the server must trust this report
    step_feature_mask: torch.Tensor | None = None
    # fl.lora_aggregation (fedsafe.fl.lora_aggregation): the LoRA factors trained this round ("AB", "B" or "A");
    # the other factor is frozen and its update is exactly zero
    trainable: str = "AB"
    # fedex: the round whose residual the global model's base weights hold; the client's model must hold the same
    base_residual_round: int = 0


@dataclass
class ClientResult:
    """What a client returns: its update (local - global), sample count and metrics."""

    client_id: str
    update: torch.Tensor
    num_samples: int
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # e.g. SCAFFOLD's control-variate delta


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts (independent of Python's hash randomisation)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


LossTerm = Callable[[torch.nn.Module, dict, object], torch.Tensor]


class LocalTrainer:
    """Trains any client on the one in-memory PEFT model by swapping its flat LoRA vector."""

    #: a :class:`fedsafe.fl.update_cache.UpdateCache` (a grid sets one): trainings with the same inputs run once
    update_cache = None

    def __init__(self, model: torch.nn.Module, tokenizer, loss_terms: list[LossTerm] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.flat = FlatLoRA(model)
        self.device = next(model.parameters()).device
        self.loss_terms = list(loss_terms or [])
        self.pad_id = tokenizer.pad_token_id

    def fit(self, client: ClientData, global_vec: torch.Tensor, rc: RoundConfig,
            client_state: dict | None = None, on_step: Callable[[int, float], None] | None = None) -> ClientResult:
        """Run ``rc.local_steps`` optimizer steps on the factors ``rc.trainable`` from ``global_vec``; the update.

        ``on_step(step, loss)`` runs after each optimizer step (1-based), with the model holding that step's
        weights; it may evaluate the model (train mode is restored after it) but must not change the weights.
        """
        if self.update_cache is not None:  # a grid's runs share trainings keyed by their inputs (fl.update_cache)
            return self.update_cache.fit(self, client, global_vec, rc, client_state, on_step, self._fit)
        return self._fit(client, global_vec, rc, client_state, on_step)

    def _fit(self, client: ClientData, global_vec: torch.Tensor, rc: RoundConfig,
             client_state: dict | None = None, on_step: Callable[[int, float], None] | None = None) -> ClientResult:
        check_base_residual(self.model, rc)
        with train_only(self.flat, rc.trainable) as trained:
            result = self._train(client, global_vec, rc, client_state, on_step)
        result.update[~trained] = 0.0  # a frozen factor's update is exactly zero (and never needs sending)
        return result

    def _train(self, client: ClientData, global_vec: torch.Tensor, rc: RoundConfig,
               client_state: dict | None = None,
               on_step: Callable[[int, float], None] | None = None) -> ClientResult:
        t0 = time.perf_counter()
        state = client_state if client_state is not None else {}
        self.flat.set(global_vec)
        for term in self.loss_terms:  # stateful terms (proximal, KL to the global model) see the round start
            if hasattr(term, "start"):
                term.start(self.model, global_vec)
        seed = derive_seed(rc.seed, rc.round, client.client_id)
        torch.manual_seed(seed)  # LoRA dropout and any sampling inside the model
        gen = torch.Generator().manual_seed(seed)
        params = [p for p in self.flat.params if p.requires_grad]  # train_only froze the factors not trained
        if rc.optimizer == "sgd":  # FedSGD with local_steps=1: the update is -lr * the (clipped) batch gradient
            optimizer = torch.optim.SGD(params, lr=rc.lr, weight_decay=rc.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=rc.lr, weight_decay=rc.weight_decay)
        global_params = None
        if rc.algorithm == "fedprox" and rc.prox_mu > 0:
            global_params = [p.detach().clone() for p in params]
        scaffold = rc.algorithm == "scaffold"
        for p in self.flat.params:  # a frozen factor keeps no .grad from a round it trained in (stale values)
            if not p.requires_grad:
                p.grad = None
        if scaffold:  # see the module docstring: correction c - c_i in gradient units; c_i+ = mean local gradient
            c_vec = rc.scaffold_c if rc.scaffold_c is not None else torch.zeros(self.flat.numel)
            c_local_vec = state.get("scaffold_c", torch.zeros(self.flat.numel))
            all_params = self.flat.params  # every LoRA tensor, aligned with the flat layout (frozen ones included)
            trained = [p.requires_grad for p in all_params]  # train_only froze the factors fl.lora_aggregation freezes
            correction = [corr.to(p.device, p.dtype) for p, corr in zip(all_params, self._split(c_vec - c_local_vec))]
            grad_sum = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in all_params]

        batches = _batch_stream(len(client.examples), rc.batch_size, gen)
        self.model.train()
        losses = []
        compute_s = 0.0
        tokens = 0  # tokens the forward passes processed (attention_mask), for tokens/s
        step_updates = []
        seen: set[int] = set()  # indices of the examples trained on (privacy: MIA members are drawn from them)
        for step in range(1, rc.local_steps + 1):
            tc = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _micro in range(rc.grad_accum):
                idx = next(batches)
                seen.update(idx)
                batch = {k: v.to(self.device) for k, v in
                         collate([client.examples[i] for i in idx], self.pad_id).items()}
                tokens += int(batch["attention_mask"].sum())
                out = self.model(**batch)
                loss = out.loss
                for term in self.loss_terms:
                    loss = loss + term(self.model, batch, out)
                (loss / rc.grad_accum).backward()
                step_loss += out.loss.item() / rc.grad_accum
            if global_params is not None:  # FedProx: grad of mu/2 ||w - w_g||^2, added once per step
                with torch.no_grad():
                    for p, g in zip(params, global_params):
                        p.grad.add_(p.detach() - g, alpha=rc.prox_mu)
            if rc.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, rc.max_grad_norm)
            if scaffold:  # SCAFFOLD: the optimizer follows g - c_i + c; the correction is never clipped
                with torch.no_grad():
                    for p, corr, acc, on in zip(all_params, correction, grad_sum, trained):
                        if not on or p.grad is None:  # a frozen factor: no correction, its c_i is kept (below)
                            continue
                        acc.add_(p.grad.float())
                        p.grad.add_(corr)
            optimizer.step()
            compute_s += time.perf_counter() - tc
            losses.append(step_loss)
            if rc.step_feature_mask is not None:
                step_updates.append(self.flat.get()[rc.step_feature_mask] - global_vec[rc.step_feature_mask])
            if on_step is not None:
                on_step(step, step_loss)
                self.model.train()

        local_vec = self.flat.get()
        update = local_vec - global_vec
        extra = {}
        if step_updates:
            extra["step_updates"] = torch.stack(step_updates)
        if scaffold:
            # Option II of Karimireddy et al. (2020) as the mean of the K local gradients (module docstring)
            # on a factor frozen this round (fl.lora_aggregation: ffa, rolora) nothing was trained, so its c_i is
            # kept as it was and delta_c is 0 there: the server's c does not move on it either
            c_new = torch.cat([(acc.reshape(-1).cpu() / rc.local_steps) if on else
                               old.reshape(-1).to(torch.float32)
                               for acc, on, old in zip(grad_sum, trained, self._split(c_local_vec))])
            extra["delta_c"] = c_new - c_local_vec
            state["scaffold_c"] = c_new
        metrics = {"loss": sum(losses) / len(losses), "first_loss": losses[0], "last_loss": losses[-1],
                   "steps": rc.local_steps, "samples": client.num_samples,
                   "update_norm": float(update.norm()), "compute_seconds": compute_s,
                   "tokens": tokens, "tokens_per_s": tokens / compute_s if compute_s > 0 else None,
                   "seconds": time.perf_counter() - t0, "seen_examples": sorted(seen)}
        return ClientResult(client.client_id, update, client.num_samples, metrics, extra)

    def _split(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return [vec[s.offset: s.offset + s.numel].view(s.shape) for s in self.flat.specs]


@contextmanager
def train_only(flat: FlatLoRA, trainable: str = "AB"):
    """Freeze the LoRA factors not in ``trainable`` (``requires_grad=False``) for the block; yields the mask of
    the trained coordinates of the flat vector. Frozen factors get no gradient, so no optimiser moves them."""
    from fedsafe.fl.lora_aggregation import trainable_mask

    frozen = [p for p, s in zip(flat.params, flat.specs) if s.kind in ("A", "B") and s.kind not in trainable]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield trainable_mask(flat, trainable)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def check_base_residual(model: torch.nn.Module, rc: RoundConfig) -> None:
    """FedEx-LoRA: the model a client trains must hold the global residual of ``rc`` in its base weights."""
    from fedsafe.fl.lora_aggregation import residual_round

    have = residual_round(model)
    if rc.base_residual_round and have != rc.base_residual_round:  # 0: no residual asked for (e.g. post-hoc)
        raise FedsafeError(f"fl.lora_aggregation=fedex: the global model of round {rc.round} includes the residual "
                           f"of round {rc.base_residual_round}, this client's model holds round {have}'s; the "
                           "residual lives in the server's in-memory model, so fedex runs in-process or in Flower's "
                           "simulation (one shared model), not on separate SuperNodes")


def _batch_stream(n: int, batch_size: int, gen: torch.Generator):
    """Endless stream of index batches: reshuffled epochs over the client's data."""
    bs = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n - bs + 1, bs):
            yield perm[i: i + bs]
