"""Differential privacy for federated fine-tuning: client-level DP-FedAvg and local DP-SGD, with accounting.

**Client-level DP** (McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018, DP-FedAvg with the fixed-denominator estimator and uniform client weights): each sampled
client's update is clipped to L2 norm C, delta_i <- delta_i * min(1, C / ||delta_i||); the server adds
Gaussian noise to the sum and divides by the number of sampled clients m:

    Delta = (sum_i clip(delta_i) + N(0, (sigma C)^2 I)) / m.

**Neighbouring relation and sensitivity.** fedsafe samples a fixed number m of the N clients without
replacement each round, so N is public and the natural relation is *replace-one* (one client's data replaced
by anything): the clipped sums of neighbouring datasets then differ by up to 2C, not C. dp-accounting's
noise multiplier is the noise std divided by the L2 sensitivity (docstring of
``_compute_rdp_sample_wor_gaussian``: "The ratio of the standard deviation of the Gaussian noise to the
l2-sensitivity"), and its RDP accountant does not apply the factor 2 itself, so the event gets sigma / 2
(Wang, Balle & Kasiviswanathan, AISTATS 2019, Theorem 27, for sampling without replacement). ``poisson`` is
the usual add/remove-one analysis of Poisson sampling at rate q = m/N with sensitivity C (the analysis of
McMahan et al.); fedsafe does not sample clients that way, so that figure is an approximation and the record
says so. dp-accounting's PLD accountant, unlike its RDP one, does apply the factor 2 for REPLACE_ONE itself;
fedsafe never hands it that relation, and :func:`check_dp_accounting` refuses an untested version.

**Local DP-SGD** (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016): every local step takes a
Poisson-sampled batch (each example independently with probability q = b/n, Opacus's
``UniformWithReplacementSampler``), clips each example's gradient (per-sample gradients of the LoRA
parameters from Opacus hooks) to C_local, adds N(0, (sigma_local C_local)^2) to the sum and divides by the
expected batch size b; the accountant's Poisson subsampled Gaussian (add/remove-one example) is then exact.

**Who must not know the seed.** By default the noise (and local DP-SGD's batch sampling, and the server's client
sampling) is drawn from the experiment seed, so a simulation is reproducible; anyone holding ``config.yaml``
can regenerate the noise and subtract it, so the reported epsilon holds only against an adversary without the
seed. ``dp.secure_noise: true`` draws the noise from the OS's CSPRNG (``os.urandom``) and local DP-SGD's
batches from a generator seeded by it. Client sampling still follows the seed (it is chosen by the server
loop), so with secure noise the client-level accountant claims no amplification by sampling and counts every
client in every round.

Accounting uses Google's ``dp-accounting``: RDP (Mironov 2017; Mironov, Talwar & Zhang 2019) or PLD
(privacy loss distributions, the numerical accountant family PRV belongs to).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import secrets
import warnings

import numpy as np
import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator
from fedsafe.errors import ConfigError
from fedsafe.fl.update_ops import clip_rows, gaussian_noise
from fedsafe.fl.client import ClientResult, LocalTrainer, RoundConfig, derive_seed

log = logging.getLogger("fedsafe")

# dp-accounting versions whose noise-multiplier convention was checked against its source (see module docstring)
DP_ACCOUNTING_TESTED = ((0, 6), (0, 7))  # [low, high)


# ------------------------------------------------------------------------------------------------
# Clipping and noise
# ------------------------------------------------------------------------------------------------

def secret_generator() -> torch.Generator:
    """A torch generator seeded from the OS's randomness (for sampling that must not follow the public seed)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


class DPFedAvg(Aggregator):
    """Client-level DP-FedAvg (McMahan et al. 2018): clip each update to C, sum, add N(0, (sigma C)^2), / m."""

    name = "dp_fedavg"
    needs_plaintext = True  # the server clips individual updates

    def __init__(self, clip_norm: float = 1.0, noise_multiplier: float = 1.0, seed: int = 0,
                 secure_noise: bool = False):
        if clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.seed = seed
        self.secure_noise = secure_noise
        self.calls = 0  # rounds aggregated: seeds each round's noise, so a resumed run draws the same noise

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        m = updates.shape[0]
        clipped, norms = clip_rows(updates, self.clip_norm)
        gen = None if self.secure_noise else torch.Generator().manual_seed(derive_seed("dp_fedavg", self.seed,
                                                                                      self.calls))
        self.calls += 1
        std = self.noise_multiplier * self.clip_norm
        noise = gaussian_noise(updates.shape[1], std, gen)
        update = (clipped.sum(0) + noise.to(clipped.dtype)) / m
        info = {"clip_norm": self.clip_norm, "noise_std_sum": std, "noise_std_mean": std / m,
                "noise": "os" if self.secure_noise else "seeded",
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


@functools.lru_cache(maxsize=None)
def check_dp_accounting() -> str:
    """Refuse a dp-accounting whose noise-multiplier convention was not checked; returns its version.

    fedsafe divides sigma by the sensitivity factor (2 under replace-one) itself. A release that started to apply
    that factor inside its RDP accountant would count it twice, so besides the version range this probes the
    convention: without sampling (m = N), the replace-one event must give exactly the plain Gaussian's epsilon.
    """
    from importlib.metadata import version

    import dp_accounting as dpa
    from dp_accounting import rdp

    found = version("dp-accounting")
    parts = tuple(int(x) for x in re.findall(r"\d+", found)[:2])
    low, high = DP_ACCOUNTING_TESTED
    if not low <= parts < high:
        raise RuntimeError(f"dp-accounting {found} is not a version fedsafe's DP accounting was checked with "
                           f"(>={low[0]}.{low[1]},<{high[0]}.{high[1]}): its noise-multiplier convention under "
                           f"replace-one may differ; install one, e.g. pip install 'dp-accounting>=0.6,<0.7'")
    _quiet_absl()
    replace = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    replace.compose(dpa.SampledWithoutReplacementDpEvent(4, 4, dpa.GaussianDpEvent(2.0)))
    plain = rdp.RdpAccountant()
    plain.compose(dpa.GaussianDpEvent(2.0))
    if not math.isclose(replace.get_epsilon(1e-5), plain.get_epsilon(1e-5), rel_tol=1e-9):
        raise RuntimeError(f"dp-accounting {found}: the RDP accountant no longer treats the noise multiplier of "
                           "a replace-one event as std / sensitivity; fedsafe's accounting would be wrong")
    return found


def resolve_sampling(accountant: str, sampling: str) -> str:
    """``auto`` -> without_replacement for RDP (exact for fedsafe), poisson for PLD (its only option)."""
    if sampling == "auto":
        return "without_replacement" if accountant == "rdp" else "poisson"
    if accountant == "pld" and sampling == "without_replacement":
        raise ConfigError("dp.sampling=without_replacement needs dp.accountant=rdp (dp-accounting's PLD "
                          "accountant supports Poisson sampling only)")
    if sampling not in ("poisson", "without_replacement"):
        raise ConfigError(f"dp.sampling={sampling!r} is not one of auto, poisson, without_replacement")
    return sampling


def neighbouring(sampling: str) -> tuple[str, float]:
    """(relation, L2 distance of neighbouring clipped sums in units of the clip norm) of a sampling model."""
    if sampling == "without_replacement":
        return "replace-one", 2.0
    if sampling == "poisson":
        return "add-or-remove-one", 1.0
    raise ValueError(f"sampling must be poisson or without_replacement, got {sampling!r}")


def dp_event(noise_multiplier: float, population: int, sample_size: int, sampling: str):
    """The dp-accounting event of one round/step: a (subsampled) Gaussian mechanism.

    ``noise_multiplier`` is in dp-accounting's convention, noise std / L2 sensitivity (see :func:`epsilon`).
    """
    import dp_accounting as dpa

    gaussian = dpa.GaussianDpEvent(noise_multiplier)
    if sample_size >= population:
        return gaussian
    if sampling == "poisson":
        return dpa.PoissonSampledDpEvent(sample_size / population, gaussian)
    if sampling == "without_replacement":
        return dpa.SampledWithoutReplacementDpEvent(population, sample_size, gaussian)
    raise ValueError(f"sampling must be poisson or without_replacement, got {sampling!r}")


def epsilon(noise_multiplier: float, population: int, sample_size: int, steps: int, delta: float,
            accountant: str = "rdp", sampling: str = "auto") -> float:
    """(epsilon, delta)-DP after ``steps`` subsampled Gaussian steps, from dp-accounting.

    ``noise_multiplier`` is fedsafe's sigma, noise std / clip norm. Under ``without_replacement`` (replace-one)
    neighbouring sums differ by 2 clip norms, so dp-accounting gets sigma / 2; under ``poisson`` (add/remove-one)
    it gets sigma. Without sampling (``sample_size >= population``) the event is a plain Gaussian with that
    multiplier, whose privacy depends only on it, so it is accounted under dp-accounting's default relation.
    """
    import dp_accounting as dpa
    from dp_accounting import pld, rdp

    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    check_dp_accounting()
    sampling = resolve_sampling(accountant, sampling)
    _, sensitivity = neighbouring(sampling)
    event = dp_event(noise_multiplier / sensitivity, population, sample_size, sampling)
    if accountant == "rdp":
        relation = (dpa.NeighboringRelation.REPLACE_ONE
                    if isinstance(event, dpa.SampledWithoutReplacementDpEvent)
                    else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
        acc = rdp.RdpAccountant(neighboring_relation=relation)
    elif accountant == "pld":  # add/remove-one only: its REPLACE_ONE would apply the factor 2 a second time
        acc = pld.PLDAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    else:
        raise ConfigError(f"dp.accountant={accountant!r} is not one of rdp, pld")
    acc.compose(event, steps)
    return float(acc.get_epsilon(delta))


def _warn_large_delta(delta: float, n: int, what: str) -> None:
    if delta >= 1.0 / n:
        log.warning("dp.delta=%.2e is not below 1/%d (%s): an (epsilon, delta) guarantee with such a delta "
                    "allows leaking one record outright", delta, n, what)


class ClientDPAccountant:
    """Per-round (epsilon, delta) of client-level DP-FedAvg over a run."""

    def __init__(self, dp_cfg, num_clients: int, clients_per_round: int):
        self.dp = dp_cfg  # the ``dp`` section
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.delta = dp_cfg.delta
        self.sampling = resolve_sampling(dp_cfg.accountant, dp_cfg.sampling)
        self.relation, self.sensitivity = neighbouring(self.sampling)
        # the client sample follows the public seed; against an adversary who knows it (the one secure noise is
        # for) sampling hides nothing, so no amplification is claimed: every client counts in every round
        self.amplified = clients_per_round < num_clients and not dp_cfg.secure_noise
        _warn_large_delta(self.delta, num_clients, "clients")

    def epsilon(self, rounds: int) -> float:
        """Epsilon after ``rounds`` rounds at :attr:`delta`."""
        population = self.num_clients if self.amplified else self.clients_per_round
        return epsilon(self.dp.noise_multiplier, population, self.clients_per_round, rounds, self.delta,
                       self.dp.accountant, self.sampling)

    def guarantee(self) -> str:
        """In words: which relation, which adversary, which approximation the epsilon assumes."""
        c = self.dp.clip_norm
        parts = [f"{self.relation} client (N={self.num_clients} public, neighbouring sums differ by up to "
                 f"{self.sensitivity:g}C = {self.sensitivity * c:g})"]
        if self.dp.secure_noise:
            parts.append("noise from OS randomness")
            if self.clients_per_round < self.num_clients:
                parts.append("client sampling follows the public seed, so no amplification by sampling is claimed")
        else:
            parts.append("holds only against an adversary without the experiment seed (the noise can be "
                         "regenerated from config.yaml; use dp.secure_noise=true in a deployment)")
        if self.amplified and self.sampling == "poisson":
            parts.append("approximation: fedsafe samples a fixed number of clients, accounted as Poisson sampling")
        return "; ".join(parts)

    def record(self, round_no: int) -> dict:
        """The ``dp`` metrics record of a finished round."""
        return {"type": "dp", "round": round_no, "level": "client", "epsilon": self.epsilon(round_no),
                "delta": self.delta, "noise_multiplier": self.dp.noise_multiplier, "clip_norm": self.dp.clip_norm,
                "neighbouring": self.relation, "sensitivity": self.sensitivity * self.dp.clip_norm,
                "accounted_noise_multiplier": self.dp.noise_multiplier / self.sensitivity,
                "sampling_rate": (self.clients_per_round / self.num_clients) if self.amplified else 1.0,
                "accountant": self.dp.accountant, "sampling": self.sampling,
                "noise": "os" if self.dp.secure_noise else "seeded", "guarantee": self.guarantee()}


# ------------------------------------------------------------------------------------------------
# Local DP-SGD
# ------------------------------------------------------------------------------------------------

class DPLocalTrainer(LocalTrainer):
    """Local DP-SGD on the LoRA parameters (Abadi et al. 2016): Poisson batches, per-sample clipping, noise.

    Per-sample gradients come from Opacus's ``GradSampleModule`` hooks on PEFT's LoRA ``nn.Linear`` layers
    (attached for the duration of ``fit`` only). Each step draws a Poisson batch (every example with probability
    q = b/n, b = batch_size * grad_accum) and divides the noisy sum by b, so one step is exactly the Poisson
    subsampled Gaussian the accountant composes (add/remove-one example, sensitivity C_local). Each example's
    loss is its mean token loss on response tokens; SCAFFOLD is refused, FedProx's term is added after the
    noise, ``fl.max_grad_norm`` is not used (per-sample clipping replaces it). Data-dependent ``loss_terms``
    (KL) must give one value per example (``per_example``) and go through the per-sample clipping;
    data-independent ones (the proximal term) are added to the privatised gradient. The client's cumulative
    (epsilon, delta) is reported in its metrics (``dp_epsilon``, ``dp_delta``).
    """

    def __init__(self, model, tokenizer, clip_norm: float, noise_multiplier: float, delta: float = 1e-5,
                 accountant: str = "rdp", loss_terms=None, secure_noise: bool = False):
        super().__init__(model, tokenizer, loss_terms)
        for term in self.loss_terms:
            if not getattr(term, "data_independent", False) and not hasattr(term, "per_example"):
                raise ConfigError(f"dp.local=true needs per-example loss terms; {type(term).__name__} has no "
                                  "per_example() (a batch-level term couples examples and breaks the "
                                  "per-example sensitivity)")
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.accountant = accountant
        self.secure_noise = secure_noise
        self._delta_checked: set[int] = set()

    def private_gradient(self, gsm, examples, gen: torch.Generator | None, expected_batch_size: int | None = None):
        """One DP-SGD gradient: (sum_i clip(g_i, C) + N(0, (sigma C)^2)) / b, as a flat vector.

        ``gsm`` is the Opacus ``GradSampleModule`` around the model; ``gen`` draws the noise (None: OS
        randomness); ``b`` is ``expected_batch_size`` (Poisson sampling) or the batch's size. A Poisson batch
        may be empty: the gradient is then noise / b. Returns (gradient, per-example losses, per-example
        gradient norms before clipping).
        """
        from fedsafe.data.format import IGNORE_INDEX, collate

        params = self.flat.params
        numel = sum(p.numel() for p in params)
        b = expected_batch_size or len(examples)
        std = self.noise_multiplier * self.clip_norm
        if not examples:
            empty = torch.zeros(0)
            return gaussian_noise(numel, std, gen).to(self.device) / b, empty, empty
        batch = {k: v.to(self.device) for k, v in collate(examples, self.pad_id).items()}
        out = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), labels,
                                                ignore_index=IGNORE_INDEX, reduction="none")
        valid = (labels != IGNORE_INDEX).float()
        per_example = (nll * valid).sum(1) / valid.sum(1).clamp(min=1)
        per_example_loss = per_example
        for term in self.loss_terms:  # data-dependent terms go through the per-sample clipping, one value each
            if not getattr(term, "data_independent", False):
                per_example_loss = per_example_loss + term.per_example(self.model, batch, out)
        loss = per_example_loss.sum()  # loss_reduction="sum": grad_sample[i] is example i's own gradient
        with warnings.catch_warnings():  # Opacus's full backward hooks on frozen inputs: expected with LoRA
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        with torch.no_grad():
            flat_gs = torch.cat([p.grad_sample.reshape(len(examples), -1) if p.requires_grad
                                 else torch.zeros(len(examples), p.numel(), device=self.device)
                                 for p in params], dim=1).float()
            for p in params:
                p.grad_sample = None
                p.grad = None
            clipped, norms = clip_rows(flat_gs, self.clip_norm)
            noise = gaussian_noise(flat_gs.shape[1], std, gen)
            grad = (clipped.sum(0) + noise.to(clipped.device)) / b
        return grad, per_example.detach(), norms

    def _train(self, client, global_vec: torch.Tensor, rc: RoundConfig,
               client_state: dict | None = None, on_step=None) -> ClientResult:
        """DP-SGD local steps from ``global_vec``; returns the (already privatised) update.

        ``on_step(step, loss)`` runs after each optimizer step, as in :meth:`LocalTrainer.fit`.

        ``LocalTrainer.fit`` calls this with the factors ``rc.trainable`` leaves frozen (fl.lora_aggregation)
        set to ``requires_grad=False``: their per-sample gradients are zero, so clipping covers the trained
        factors only, and their (noise-only) gradient is never applied.
        """
        import time

        from opacus import GradSampleModule
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        if rc.algorithm in ("scaffold",):
            raise ConfigError("dp.local=true cannot be combined with fl.algorithm=scaffold")
        t0 = time.perf_counter()
        state = client_state if client_state is not None else {}
        self.flat.set(global_vec)
        for term in self.loss_terms:
            if hasattr(term, "start"):
                term.start(self.model, global_vec)
        seed = derive_seed(rc.seed, rc.round, client.client_id, "dpsgd")
        torch.manual_seed(seed)  # LoRA dropout: not part of the privacy argument
        # batches and noise: from the seed (reproducible simulation) or from the OS (secure_noise)
        sample_gen = secret_generator() if self.secure_noise else torch.Generator().manual_seed(seed)
        noise_gen = None if self.secure_noise else sample_gen
        params = self.flat.params
        optimizer = torch.optim.AdamW(params, lr=rc.lr, weight_decay=rc.weight_decay)
        prox = None
        if rc.algorithm == "fedprox" and rc.prox_mu > 0:  # data-independent: added after the noise, no privacy cost
            from fedsafe.defenses.constrained_updates.loss_terms import ProximalL2

            prox = ProximalL2(rc.prox_mu)
            prox.start(self.model, global_vec)
        n = client.num_samples
        batch_size = min(rc.batch_size * rc.grad_accum, n)  # expected Poisson batch size b, q = b / n
        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=batch_size / n, generator=sample_gen,
                                                steps=rc.local_steps)
        gsm = GradSampleModule(self.model, batch_first=True, loss_reduction="sum", strict=False)
        self.model.train()
        losses, clipped_frac, batch_sizes = [], [], []
        seen: set[int] = set()  # the Poisson samples; reported only when they follow the public seed (below)
        try:
            for idx in sampler:
                seen.update(int(i) for i in idx)
                optimizer.zero_grad(set_to_none=True)
                grad, per_example, norms = self.private_gradient(gsm, [client.examples[i] for i in idx], noise_gen,
                                                                 expected_batch_size=batch_size)
                for p, spec in zip(params, self.flat.specs):
                    if p.requires_grad:  # a factor frozen by fl.lora_aggregation never moves
                        p.grad = grad[spec.offset: spec.offset + spec.numel].view(spec.shape).to(p.dtype)
                for term in self.loss_terms:  # e.g. the proximal term: no data, so no privacy cost
                    if getattr(term, "data_independent", False):
                        term.add_grad(params)
                if prox is not None:
                    prox.add_grad(params)
                optimizer.step()
                batch_sizes.append(len(idx))
                if len(idx):
                    losses.append(float(per_example.mean()))
                    clipped_frac.append(float((norms > self.clip_norm).float().mean()))
                if on_step is not None:
                    on_step(len(batch_sizes), losses[-1] if len(idx) else float("nan"))
                    self.model.train()
        finally:
            gsm._close()
            for p in params:
                if hasattr(p, "grad_sample"):
                    del p.grad_sample
        local_vec = self.flat.get()
        update = local_vec - global_vec
        steps_total = state.get("dp_steps", 0) + rc.local_steps
        state["dp_steps"] = steps_total
        if n not in self._delta_checked:  # once per dataset size, not every round
            self._delta_checked.add(n)
            _warn_large_delta(self.delta, n, f"samples of client {client.client_id}")
        eps = epsilon(self.noise_multiplier, n, batch_size, steps_total, self.delta, self.accountant, "poisson")
        nan = float("nan")
        metrics = {"loss": sum(losses) / len(losses) if losses else nan,
                   "first_loss": losses[0] if losses else nan, "last_loss": losses[-1] if losses else nan,
                   "steps": rc.local_steps, "samples": n, "update_norm": float(update.norm()),
                   "dp_epsilon": eps, "dp_delta": self.delta, "dp_steps": steps_total,
                   "dp_sampling": "poisson", "dp_sampling_rate": batch_size / n,
                   "dp_mean_batch": sum(batch_sizes) / len(batch_sizes),
                   "dp_noise": "os" if self.secure_noise else "seeded",
                   "dp_clipped_fraction": sum(clipped_frac) / len(clipped_frac) if clipped_frac else nan,
                   "compute_seconds": time.perf_counter() - t0, "seconds": time.perf_counter() - t0}
        if not self.secure_noise:  # seeded batches are public anyway; secret (OS) Poisson samples must stay secret
            metrics["seen_examples"] = sorted(seen)
        return ClientResult(client.client_id, update, n, metrics, {})


# ------------------------------------------------------------------------------------------------
# Wiring (the differential_privacy plug-in, fedsafe.defenses.differential_privacy)
# ------------------------------------------------------------------------------------------------

def wrap_aggregator(dp_cfg, aggregator: Aggregator, aggregator_name: str = "fedavg", seed: int = 0) -> Aggregator:
    """Replace FedAvg with DP-FedAvg when ``dp.client_level`` is on (noise is calibrated to a mean only)."""
    if not dp_cfg.client_level:
        return aggregator
    if aggregator_name != "fedavg":
        raise ConfigError(f"dp.client_level=true needs aggregator.name=fedavg (the noise is calibrated to the "
                          f"clipped mean), got {aggregator_name!r}")
    return DPFedAvg(dp_cfg.clip_norm, dp_cfg.noise_multiplier, seed=seed, secure_noise=dp_cfg.secure_noise)
