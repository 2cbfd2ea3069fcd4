"""Differential privacy for federated fine-tuning: client-level DP-FedAvg and local DP-SGD, with accounting.

**Client-level DP** (McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018, DP-FedAvg with the fixed-denominator estimator and uniform client weights): each sampled
client's update is clipped to L2 norm C, delta_i <- delta_i * min(1, C / ||delta_i||); the server adds
Gaussian noise to the sum and divides by the number of sampled clients m:

    Delta = (sum_i clip(delta_i) + N(0, (sigma C)^2 I)) / m.

One round is a subsampled Gaussian mechanism with noise multiplier sigma on the client-level sensitivity C;
rounds compose. **Local DP-SGD** (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016): every
local step clips each example's gradient (per-sample gradients of the LoRA parameters from Opacus hooks) to
C_local, adds N(0, (sigma_local C_local)^2) to the sum and divides by the batch size.

Accounting uses Google's ``dp-accounting``: RDP (Mironov 2017; Mironov, Talwar & Zhang 2019) or PLD
(privacy loss distributions, the numerical accountant family PRV belongs to). fedsafe samples a fixed number
of clients without replacement each round; the RDP accountant supports that exactly under the replace-one
neighbouring relation (``sampling: without_replacement``, the default with RDP). ``poisson`` is the usual
add/remove-one analysis of Poisson sampling at rate q = m/N (an approximation of fedsafe's sampling). Local
DP-SGD draws shuffled batches, which the accountant approximates as Poisson sampling at q = b/n.
"""

from __future__ import annotations

import logging
import math

import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator
from fedsafe.errors import ConfigError
from fedsafe.fl.client import ClientResult, LocalTrainer, RoundConfig, _batch_stream, derive_seed

log = logging.getLogger("fedsafe")


# ------------------------------------------------------------------------------------------------
# Clipping and noise
# ------------------------------------------------------------------------------------------------

def clip_rows(x: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each row of ``x`` [n, d] to L2 norm <= ``clip_norm``; returns (clipped, original norms)."""
    norms = x.norm(dim=1)
    factors = (clip_norm / (norms + 1e-12)).clamp(max=1.0)
    return x * factors[:, None], norms


class DPFedAvg(Aggregator):
    """Client-level DP-FedAvg (McMahan et al. 2018): clip each update to C, sum, add N(0, (sigma C)^2), / m."""

    name = "dp_fedavg"
    needs_plaintext = True  # the server clips individual updates

    def __init__(self, clip_norm: float = 1.0, noise_multiplier: float = 1.0, seed: int = 0):
        if clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.seed = seed
        self.calls = 0  # rounds aggregated: seeds each round's noise, so a resumed run draws the same noise

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        m = updates.shape[0]
        clipped, norms = clip_rows(updates, self.clip_norm)
        gen = torch.Generator().manual_seed(derive_seed("dp_fedavg", self.seed, self.calls))
        self.calls += 1
        std = self.noise_multiplier * self.clip_norm
        noise = torch.randn(updates.shape[1], generator=gen) * std
        update = (clipped.sum(0) + noise) / m
        info = {"clip_norm": self.clip_norm, "noise_std_sum": std, "noise_std_mean": std / m,
                "clipped_fraction": float((norms > self.clip_norm).float().mean()),
                "update_norms_before_clip": norms.tolist()}
        return AggregationResult(update, torch.full((m,), 1.0 / m), info)

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state.get("calls", 0))


# ------------------------------------------------------------------------------------------------
# Accounting
# ------------------------------------------------------------------------------------------------

def _quiet_absl() -> None:
    try:  # dp-accounting logs a warning per RDP order it cannot evaluate; those orders are just skipped
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover
        pass


def dp_event(noise_multiplier: float, population: int, sample_size: int, sampling: str):
    """The dp-accounting event of one round/step: a subsampled Gaussian mechanism."""
    import dp_accounting as dpa

    gaussian = dpa.GaussianDpEvent(noise_multiplier)
    if sample_size >= population:
        return gaussian
    if sampling == "poisson":
        return dpa.PoissonSampledDpEvent(sample_size / population, gaussian)
    if sampling == "without_replacement":
        return dpa.SampledWithoutReplacementDpEvent(population, sample_size, gaussian)
    raise ValueError(f"sampling must be poisson or without_replacement, got {sampling!r}")


def resolve_sampling(accountant: str, sampling: str) -> str:
    """``auto`` -> without_replacement for RDP (exact for fedsafe), poisson for PLD (its only option)."""
    if sampling == "auto":
        return "without_replacement" if accountant == "rdp" else "poisson"
    if accountant == "pld" and sampling == "without_replacement":
        raise ConfigError("dp.sampling=without_replacement needs dp.accountant=rdp (dp-accounting's PLD "
                          "accountant supports Poisson sampling only)")
    return sampling


def epsilon(noise_multiplier: float, population: int, sample_size: int, steps: int, delta: float,
            accountant: str = "rdp", sampling: str = "auto") -> float:
    """(epsilon, delta)-DP after ``steps`` subsampled Gaussian steps, from dp-accounting."""
    import dp_accounting as dpa
    from dp_accounting import pld, rdp

    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    sampling = resolve_sampling(accountant, sampling)
    _quiet_absl()
    if accountant == "rdp":
        relation = (dpa.NeighboringRelation.REPLACE_ONE if sampling == "without_replacement"
                    and sample_size < population else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
        acc = rdp.RdpAccountant(neighboring_relation=relation)
    elif accountant == "pld":
        acc = pld.PLDAccountant()
    else:
        raise ConfigError(f"dp.accountant={accountant!r} is not one of rdp, pld")
    acc.compose(dp_event(noise_multiplier, population, sample_size, sampling), steps)
    return float(acc.get_epsilon(delta))


def default_delta(n: int) -> float:
    """delta = 1 / n^1.1: below 1/n, as the usual rule of thumb asks."""
    return 1.0 / max(n, 2) ** 1.1


class ClientDPAccountant:
    """Per-round (epsilon, delta) of client-level DP-FedAvg over a run."""

    def __init__(self, cfg, num_clients: int, clients_per_round: int):
        self.dp = cfg.dp
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.delta = cfg.dp.delta or default_delta(num_clients)
        self.sampling = resolve_sampling(cfg.dp.accountant, cfg.dp.sampling)

    def epsilon(self, rounds: int) -> float:
        return epsilon(self.dp.noise_multiplier, self.num_clients, self.clients_per_round, rounds, self.delta,
                       self.dp.accountant, self.sampling)

    def record(self, round_no: int) -> dict:
        """The ``dp`` metrics record of a finished round."""
        return {"type": "dp", "round": round_no, "level": "client", "epsilon": self.epsilon(round_no),
                "delta": self.delta, "noise_multiplier": self.dp.noise_multiplier, "clip_norm": self.dp.clip_norm,
                "sampling_rate": self.clients_per_round / self.num_clients, "accountant": self.dp.accountant,
                "sampling": self.sampling}


# ------------------------------------------------------------------------------------------------
# Local DP-SGD
# ------------------------------------------------------------------------------------------------

class DPLocalTrainer(LocalTrainer):
    """Local DP-SGD on the LoRA parameters (Abadi et al. 2016): per-sample clipping + Gaussian noise.

    Per-sample gradients come from Opacus's ``GradSampleModule`` hooks on PEFT's LoRA ``nn.Linear`` layers
    (attached for the duration of ``fit`` only). Each example's loss is its mean token loss on response
    tokens; SCAFFOLD is refused, FedProx's term is added after the noise, ``fl.max_grad_norm`` is not used
    (per-sample clipping replaces it);
    data-dependent ``loss_terms`` (KL) go through the per-sample clipping, data-independent
    ones (the proximal term) are added to the privatised gradient. The client's cumulative (epsilon, delta) is reported in its
    metrics (``dp_epsilon``).
    """

    def __init__(self, model, tokenizer, clip_norm: float, noise_multiplier: float, delta: float | None = None,
                 accountant: str = "rdp", loss_terms=None):
        super().__init__(model, tokenizer, loss_terms)
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.accountant = accountant

    def private_gradient(self, gsm, examples, gen: torch.Generator):
        """One DP-SGD gradient: (sum_i clip(g_i, C) + N(0, (sigma C)^2)) / b, as a flat vector.

        ``gsm`` is the Opacus ``GradSampleModule`` around the model. Returns (gradient, per-example losses,
        per-example gradient norms before clipping).
        """
        from fedsafe.data.format import IGNORE_INDEX, collate

        params = self.flat.params
        batch = {k: v.to(self.device) for k, v in collate(examples, self.pad_id).items()}
        out = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), labels,
                                                ignore_index=IGNORE_INDEX, reduction="none")
        valid = (labels != IGNORE_INDEX).float()
        per_example = (nll * valid).sum(1) / valid.sum(1).clamp(min=1)
        loss = per_example.sum()  # loss_reduction="sum": grad_sample[i] is example i's own gradient
        for term in self.loss_terms:  # data-dependent terms go through the per-sample clipping
            if not getattr(term, "data_independent", False):
                loss = loss + term(self.model, batch, out) * len(examples)
        import warnings

        with warnings.catch_warnings():  # Opacus's full backward hooks on frozen inputs: expected with LoRA
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        with torch.no_grad():
            flat_gs = torch.cat([p.grad_sample.reshape(len(examples), -1) for p in params], dim=1).float()
            for p in params:
                p.grad_sample = None
                p.grad = None
            clipped, norms = clip_rows(flat_gs, self.clip_norm)
            noise = torch.randn(flat_gs.shape[1], generator=gen) * (self.noise_multiplier * self.clip_norm)
            grad = (clipped.sum(0) + noise.to(clipped.device)) / len(examples)
        return grad, per_example.detach(), norms

    def fit(self, client, global_vec: torch.Tensor, rc: RoundConfig, client_state: dict | None = None) -> ClientResult:
        """DP-SGD local steps from ``global_vec``; returns the (already privatised) update."""
        import time

        from opacus import GradSampleModule

        if rc.algorithm in ("scaffold",):
            raise ConfigError("dp.local=true cannot be combined with fl.algorithm=scaffold")
        t0 = time.perf_counter()
        state = client_state if client_state is not None else {}
        self.flat.set(global_vec)
        for term in self.loss_terms:
            if hasattr(term, "start"):
                term.start(self.model, global_vec)
        seed = derive_seed(rc.seed, rc.round, client.client_id, "dpsgd")
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        params = self.flat.params
        optimizer = torch.optim.AdamW(params, lr=rc.lr, weight_decay=rc.weight_decay)
        prox = None
        if rc.algorithm == "fedprox" and rc.prox_mu > 0:  # data-independent: added after the noise, no privacy cost
            from fedsafe.defenses.constrained import ProximalL2

            prox = ProximalL2(rc.prox_mu)
            prox.start(self.model, global_vec)
        batch_size = min(rc.batch_size * rc.grad_accum, client.num_samples)
        batches = _batch_stream(client.num_samples, batch_size, gen)
        gsm = GradSampleModule(self.model, batch_first=True, loss_reduction="sum", strict=False)
        self.model.train()
        losses, clipped_frac = [], []
        try:
            for _ in range(rc.local_steps):
                optimizer.zero_grad(set_to_none=True)
                idx = next(batches)
                grad, per_example, norms = self.private_gradient(gsm, [client.examples[i] for i in idx], gen)
                for p, spec in zip(params, self.flat.specs):
                    p.grad = grad[spec.offset: spec.offset + spec.numel].view(spec.shape).to(p.dtype)
                for term in self.loss_terms:  # e.g. the proximal term: no data, so no privacy cost
                    if getattr(term, "data_independent", False):
                        term.add_grad(params)
                if prox is not None:
                    prox.add_grad(params)
                optimizer.step()
                losses.append(float(per_example.mean()))
                clipped_frac.append(float((norms > self.clip_norm).float().mean()))
        finally:
            gsm._close()
            for p in params:
                if hasattr(p, "grad_sample"):
                    del p.grad_sample
        local_vec = self.flat.get()
        update = local_vec - global_vec
        steps_total = state.get("dp_steps", 0) + rc.local_steps
        state["dp_steps"] = steps_total
        delta = self.delta or default_delta(client.num_samples)
        eps = epsilon(self.noise_multiplier, client.num_samples, batch_size, steps_total, delta,
                      self.accountant, "poisson")
        metrics = {"loss": sum(losses) / len(losses), "first_loss": losses[0], "last_loss": losses[-1],
                   "steps": rc.local_steps, "samples": client.num_samples, "update_norm": float(update.norm()),
                   "dp_epsilon": eps, "dp_delta": delta, "dp_steps": steps_total,
                   "dp_clipped_fraction": sum(clipped_frac) / len(clipped_frac),
                   "compute_seconds": time.perf_counter() - t0, "seconds": time.perf_counter() - t0}
        return ClientResult(client.client_id, update, client.num_samples, metrics, {})


# ------------------------------------------------------------------------------------------------
# Wiring (pipeline)
# ------------------------------------------------------------------------------------------------

def build_trainer(cfg, model, tokenizer) -> LocalTrainer:
    """The client trainer of an experiment: plain or DP-SGD, with the constrained-update loss terms."""
    from fedsafe.defenses.constrained import loss_terms

    terms = loss_terms(cfg)
    if cfg.dp.local:
        return DPLocalTrainer(model, tokenizer, cfg.dp.local_clip_norm, cfg.dp.local_noise_multiplier,
                              cfg.dp.delta, cfg.dp.accountant, terms)
    return LocalTrainer(model, tokenizer, terms)


def wrap_aggregator(cfg, aggregator: Aggregator) -> Aggregator:
    """Replace FedAvg with DP-FedAvg when ``dp.client_level`` is on (noise is calibrated to a mean only)."""
    if not cfg.dp.client_level:
        return aggregator
    if cfg.aggregator.name != "fedavg":
        raise ConfigError(f"dp.client_level=true needs aggregator.name=fedavg (the noise is calibrated to the "
                          f"clipped mean), got {cfg.aggregator.name!r}")
    return DPFedAvg(cfg.dp.clip_norm, cfg.dp.noise_multiplier, seed=cfg.seed)


def client_accountant(cfg) -> ClientDPAccountant | None:
    """The per-round accountant of client-level DP, or None when it is off."""
    if not cfg.dp.client_level:
        return None
    return ClientDPAccountant(cfg, cfg.num_clients, cfg.clients_per_round)
