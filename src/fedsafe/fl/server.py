"""Server side of a round: seeded client sampling, update validation, aggregation and the server optimiser.

Server optimisers treat the aggregated client update as a pseudo-gradient Delta (Reddi et al.,
"Adaptive Federated Optimization", ICLR 2021, Algorithm 2):

- fedavg / fedprox / scaffold: x <- x + eta * Delta
- fedavgm (Hsu et al. 2019): v <- beta v + Delta;  x <- x + eta v
- fedadagrad: m <- b1 m + (1-b1) Delta;  v <- v + Delta^2;                          x <- x + eta m / (sqrt(v) + tau)
- fedadam:    m <- b1 m + (1-b1) Delta;  v <- b2 v + (1-b2) Delta^2;                x <- x + eta m / (sqrt(v) + tau)
- fedyogi:    m <- b1 m + (1-b1) Delta;  v <- v - (1-b2) Delta^2 sign(v - Delta^2); x <- x + eta m / (sqrt(v) + tau)

eta is ``fl.server_lr``; unset, it is the optimiser's default (``FLConfig.resolved_server_lr``): 1 for the
averaging rules and FedAvgM, 1e-3 for the adaptive ones (OpenFedLLM's fedopt_eta).

A round with no valid update, one the rule skipped (the probe's ``skipped``, or no client kept and a zero
aggregate) or one secure aggregation refused to decrypt leaves the global vector *and* the optimiser state
unchanged: a stateful optimiser must not take a momentum step on a round that carried no information.

SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1): the server keeps c and sets
c <- c + (1/N) sum_{i in S} delta c_i. Here S is the set of clients the aggregation rule kept (weight > 0), each
delta c_i enters with the rule's normalised weight, c <- c + (|S|/N) sum_{i in S} w_i delta c_i (FedAvg with equal
sample counts gives the paper's formula), and delta c_i is validated like an update (finite, right size, norm at
most 2 * fl.max_grad_norm: c_i is a mean of clipped gradients, see fedsafe.fl.client); a client whose delta c_i
fails is dropped with its update. So a client a robust rule excludes cannot move c either.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from fedsafe.config import FLConfig
from fedsafe.errors import ConfigError, FedsafeError
from fedsafe.fl.client import ClientResult, RoundConfig

log = logging.getLogger("fedsafe")


def round_lr(cfg: FLConfig, round_idx: int) -> float:
    """Client learning rate for a 0-based round: cosine over rounds as in OpenFedLLM, or constant."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * round_idx / cfg.rounds))


class ServerOptimizer:
    """Applies the aggregated update to the global vector (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)."""

    def __init__(self, cfg: FLConfig, numel: int):
        self.cfg = cfg
        self.kind = cfg.algorithm
        self.lr = cfg.resolved_server_lr
        self.state: dict[str, torch.Tensor] = {}
        if self.kind == "fedavgm":
            self.state["v"] = torch.zeros(numel)
        elif self.kind in ("fedadam", "fedyogi", "fedadagrad"):
            self.state["m"] = torch.zeros(numel)
            # Reddi et al. initialise v to tau^2 so the first step is bounded
            self.state["v"] = torch.full((numel,), cfg.tau ** 2)

    def step(self, global_vec: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Return the new global vector given the pseudo-gradient ``delta``."""
        c = self.cfg
        if self.kind == "fedavgm":
            v = self.state["v"].mul_(c.server_momentum).add_(delta)
            return global_vec + self.lr * v
        if self.kind in ("fedadam", "fedyogi", "fedadagrad"):
            m, v = self.state["m"], self.state["v"]
            m.mul_(c.beta1).add_(delta, alpha=1 - c.beta1)
            sq = delta * delta
            if self.kind == "fedadagrad":
                v.add_(sq)
            elif self.kind == "fedadam":
                v.mul_(c.beta2).add_(sq, alpha=1 - c.beta2)
            else:
                v.sub_((1 - c.beta2) * sq * torch.sign(v - sq))
            return global_vec + self.lr * m / (v.sqrt() + c.tau)
        return global_vec + self.lr * delta

    def state_dict(self) -> dict:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        for k in self.state:
            self.state[k] = state[k].clone()


def sample_clients(client_ids: list[str], k: int, seed: int, round_idx: int) -> list[str]:
    """Sample ``k`` clients for a round, seeded by (seed, round) so resumed runs sample the same."""
    rng = np.random.default_rng([seed, round_idx, 7919])
    chosen = rng.choice(len(client_ids), size=k, replace=False)
    return [client_ids[i] for i in sorted(chosen.tolist())]


class Server:
    """Holds the global adapter and server-side state; aggregates one round of client results."""

    def __init__(self, fl_cfg: FLConfig, global_vec: torch.Tensor, aggregator, seed: int = 0,
                 max_update_norm: float | None = None, num_clients: int = 1, secure=None):
        self.cfg = fl_cfg
        self.secure = secure  # SecureAggServer under HE: only ciphertexts arrive (fedsafe.defenses.secure_aggregation.protocol)
        self.global_vec = global_vec.clone()
        self.aggregator = aggregator
        self.seed = seed
        self.max_update_norm = max_update_norm
        self.num_clients = num_clients
        self.optimizer = ServerOptimizer(fl_cfg, global_vec.numel())
        log.info("server optimiser %s with server_lr=%g%s", fl_cfg.algorithm, self.optimizer.lr,
                 " (the optimiser's default)" if fl_cfg.server_lr is None else "")
        self.scaffold_c = torch.zeros_like(global_vec) if fl_cfg.algorithm == "scaffold" else None
        self.compare: dict = {}  # label -> rule run on the same updates for analysis only (aggregator.compare)
        self.round = 0  # rounds completed
        self._context = None  # RoundContext of the round in progress (set by prepare_round)
        self.shadow = None  # the probe's shadow trainer (set by the probe plug-in), given to the rule each round
        self.lora = None  # LoRAAggregation of fl.lora_aggregation, attached once the LoRA layout is known
        self._lora_state: dict | None = None  # restored from a checkpoint before the layout is attached

    def round_config(self, round_idx: int, total_samples: int = 0) -> RoundConfig:
        """The plain config sent to every client in 0-based round ``round_idx``."""
        c = self.cfg
        from fedsafe.fl.lora_aggregation import trainable_factors

        rc = RoundConfig(round=round_idx + 1, lr=round_lr(c, round_idx), local_steps=c.local_steps,
                           batch_size=c.batch_size, grad_accum=c.grad_accum, seed=self.seed,
                           algorithm=c.algorithm, prox_mu=c.prox_mu if c.algorithm == "fedprox" else 0.0,
                           max_grad_norm=c.max_grad_norm, weight_decay=c.weight_decay, optimizer=c.optimizer,
                           scaffold_c=self.scaffold_c, total_samples=total_samples)
        rc.trainable = trainable_factors(c.lora_aggregation, round_idx + 1)  # ffa / rolora freeze a factor
        rc.base_residual_round = self.lora.residual_round if self.lora is not None else 0  # fedex
        return rc

    def attach_lora(self, lora) -> None:
        """Attach the :class:`~fedsafe.fl.lora_aggregation.LoRAAggregation` (restoring a checkpoint's residual)."""
        self.lora = lora
        if self._lora_state is not None:
            lora.load_state_dict(self._lora_state)
            self._lora_state = None
        lora.attach()

    def _trained_only(self, delta: torch.Tensor) -> torch.Tensor:
        """Zero the aggregate on factors frozen this round: a rule's noise (DP) or bias must not move them."""
        if self.lora is None or delta is None:
            return delta
        return torch.where(self.lora.mask(self.round + 1), delta, torch.zeros((), dtype=delta.dtype))

    def prepare_round(self, rc: RoundConfig, truth: dict[str, bool] | None = None, shadow=None) -> RoundConfig:
        """Give a stateful rule its round-start hook (probe: shadow training); returns the RoundConfig to send."""
        from fedsafe.aggregators.base import RoundContext

        self._context = RoundContext(round=rc.round, global_vec=self.global_vec, round_config=rc, truth=truth,
                                     shadow=shadow if shadow is not None else self.shadow,
                                     flat=getattr(self.lora, "flat", None))
        prepare = getattr(self.aggregator, "prepare", None)
        return prepare(self._context) if prepare is not None else rc

    def aggregate(self, results: list[ClientResult]) -> dict:
        """Validate, aggregate and apply one round's results; return the round's aggregate statistics.

        A skipped round (see the module docstring) carries ``stats["skipped"]``, the reason.
        """
        from fedsafe.aggregators.validation import validate_updates

        if self._context is not None:
            self._context.client_extra = {r.client_id: r.extra for r in results}
        if self.secure is not None:  # sum ciphertexts, a key holder decrypts; the linear step keeps pruned coords
            delta, stats = self.secure.aggregate(results, self.global_vec, self.round + 1)
            stats = {"client_weights": [0.0] * len(results), "dropped": [], "aggregator_info": {}, "kept": [],
                     **stats}
            for d in stats["dropped"]:
                log.warning("round %d: dropped update of %s: %s", self.round + 1, d["client_id"], d["reason"])
            if delta is None or not stats["kept"]:  # refused to decrypt (too few clients) or nothing to decrypt
                self._skip_round(stats.get("skipped") or "no valid update", stats)
            else:
                self.global_vec = self.optimizer.step(self.global_vec, self._trained_only(delta))
            stats["aggregation_error"] = None  # the server never sees a client's factors under HE
            self.round += 1
            return stats

        ids = [r.client_id for r in results]
        candidates, dropped = self._validate_scaffold(results)
        stacked, kept_sub, dropped_updates = validate_updates(
            [results[i].update for i in candidates], [ids[i] for i in candidates],
            expected_numel=self.global_vec.numel(), max_norm=self.max_update_norm)
        kept = [candidates[j] for j in kept_sub]
        dropped += dropped_updates
        for d in dropped:
            log.warning("round %d: dropped update of %s: %s", self.round + 1, d["client_id"], d["reason"])
        weights_full = [0.0] * len(results)
        info: dict = {}
        compare_weights: dict = {}
        stats = {"client_weights": weights_full, "dropped": dropped, "update_norm": 0.0,
                 "aggregator_info": {}, "kept": kept, "compare_weights": compare_weights}
        if kept:  # the default norm bound (fl.max_norm_ratio), before the rule sees the updates
            stacked, stats["clipped"] = bound_update_norms(stacked, [ids[i] for i in kept], self.cfg.max_norm_ratio,
                                                           self.round + 1)
        if not kept:
            self._skip_round("no valid update", stats)
        else:
            kept_results = [results[i] for i in kept]
            num_samples = torch.tensor([float(r.num_samples) for r in kept_results])
            try:
                res = self.aggregator(stacked, num_samples, [r.client_id for r in kept_results])
            except ConfigError as exc:  # e.g. krum after drops left fewer than 2f+3 updates: skip, don't crash
                self._skip_round(f"the aggregation rule refused {len(kept)} updates: {exc}", stats)
                self.round += 1
                self._context = None
                return stats
            delta = res.update.float().cpu()
            rule_weights = torch.as_tensor(res.client_weights, dtype=torch.float32).cpu().reshape(-1)
            for j, i in enumerate(kept):
                weights_full[i] = float(rule_weights[j])
            info = res.info
            received = getattr(res, "received", None)  # a server_view hook replaced updates (full-knowledge attack)
            if received is not None:
                stacked = received.to(stacked.dtype)
                stats["received"] = {r.client_id: stacked[j] for j, r in enumerate(kept_results)}
            compare_weights.update(self._compare_weights(stacked, num_samples, kept_results, kept, len(results)))
            stats["aggregator_info"] = _jsonable(info)
            skipped = _rule_skipped(info, rule_weights, delta)
            if skipped is not None:
                self._skip_round(skipped, stats)
            else:
                global_before = self.global_vec
                delta = self._trained_only(delta)
                self.global_vec = self.optimizer.step(self.global_vec, delta)
                stats["update_norm"] = float(delta.norm())
                if self.lora is not None:  # aggregation error (and FedEx's residual) of fl.lora_aggregation
                    # fedex's residual follows what the rule did with these updates (clipping, exclusion, ...)
                    stats.update(self.lora.after_round(self.round + 1, global_before, stacked, rule_weights,
                                                       self.global_vec, rule=self.aggregator, rule_output=delta,
                                                       num_samples=num_samples,
                                                       client_ids=[r.client_id for r in kept_results], info=info))
                if self.scaffold_c is not None:
                    self._update_scaffold_c([r.extra["delta_c"] for r in kept_results], rule_weights)
        self.round += 1
        self._context = None
        return stats

    def _skip_round(self, reason: str, stats: dict) -> None:
        """A round that carries no update: the global vector, optimiser state and SCAFFOLD's c stay as they are."""
        log.warning("round %d: %s; the global adapter and the server optimiser state are unchanged",
                    self.round + 1, reason)
        stats["skipped"] = reason
        stats["update_norm"] = 0.0

    def _validate_scaffold(self, results: list[ClientResult]) -> tuple[list[int], list[dict]]:
        """Indices of results whose SCAFFOLD delta_c is acceptable (all of them without SCAFFOLD), and the drops.

        An honest client's c_i is a mean of gradients clipped to fl.max_grad_norm, so its delta_c
        = c_i+ - c_i has norm at most 2 * max_grad_norm (1% slack for low-precision gradients).
        """
        from fedsafe.aggregators.validation import check_update

        if self.scaffold_c is None:
            return list(range(len(results))), []
        bound = 2 * self.cfg.max_grad_norm if self.cfg.max_grad_norm else None
        ok, dropped = [], []
        for i, r in enumerate(results):
            dc = r.extra.get("delta_c")
            reason = check_update(dc, self.global_vec.numel()) if dc is not None else "missing from the result"
            if reason is None and bound is not None and float(dc.float().norm()) > bound * 1.01:
                reason = (f"L2 norm {float(dc.float().norm()):.4g} exceeds 2*fl.max_grad_norm={bound:g}, the most an "
                          "honest client's control-variate change can have")
            if reason is None:
                ok.append(i)
            else:
                dropped.append({"client_id": r.client_id, "reason": f"SCAFFOLD delta_c: {reason}"})
        return ok, dropped

    def _update_scaffold_c(self, delta_cs: list[torch.Tensor], rule_weights: torch.Tensor) -> None:
        """c <- c + (|S|/N) sum_{i in S} w_i delta_c_i over the clients S the rule kept, weights normalised over S."""
        w = rule_weights.float()
        sel = torch.nonzero(w > 0).flatten().tolist()
        if not sel:
            return
        w_sel = w[sel] / w[sel].sum()
        step = sum(float(wi) * delta_cs[j].detach().float().cpu() for wi, j in zip(w_sel, sel))
        self.scaffold_c = self.scaffold_c + step * (len(sel) / self.num_clients)

    def _compare_weights(self, stacked, num_samples, kept_results, kept, n_results) -> dict:
        """Client weights each ``aggregator.compare`` rule would give (None where the rule refuses)."""
        out = {}
        for label, rule in self.compare.items():
            try:
                res = rule(stacked, num_samples, [r.client_id for r in kept_results])
            except FedsafeError as exc:
                log.info("round %d: compare rule %s skipped: %s", self.round + 1, label, exc)
                out[label] = None
                continue
            full = [0.0] * n_results
            for j, i in enumerate(kept):
                full[i] = float(res.client_weights[j])
            out[label] = full
        return out

    def state_dict(self) -> dict:
        """Everything needed to resume after the last completed round."""
        agg_state = self.aggregator.state_dict() if hasattr(self.aggregator, "state_dict") else {}
        return {"round": self.round, "global_vec": self.global_vec.clone(),
                "optimizer": self.optimizer.state_dict(), "aggregator": agg_state,
                "compare": {k: r.state_dict() for k, r in self.compare.items()},
                "scaffold_c": None if self.scaffold_c is None else self.scaffold_c.clone(),
                "lora": self.lora.state_dict() if self.lora is not None else self._lora_state}

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state["round"])
        self.global_vec = state["global_vec"].clone()
        self.optimizer.load_state_dict(state["optimizer"])
        if hasattr(self.aggregator, "load_state_dict") and state.get("aggregator"):
            self.aggregator.load_state_dict(state["aggregator"])
        if state.get("scaffold_c") is not None:
            self.scaffold_c = state["scaffold_c"].clone()
        if state.get("lora") is not None:  # FedEx's residual: applied to the model when the layout is attached
            self._lora_state = state["lora"]
            if self.lora is not None:
                self.attach_lora(self.lora)
        for label, rule_state in (state.get("compare") or {}).items():
            if label in self.compare:
                self.compare[label].load_state_dict(rule_state)


def bound_update_norms(stacked: torch.Tensor, client_ids: list[str], ratio: float | None,
                       round_no: int) -> tuple[torch.Tensor, list[dict]]:
    """The default norm bound (``fl.max_norm_ratio``): an update whose L2 norm exceeds ``ratio`` times the round's
    lower median update norm is scaled down to that bound; returns the updates and one record per clipped client.

    Norm bounding as a defense against boosted updates is Sun et al., "Can You Really Backdoor Federated
    Learning?" (2019); the bound follows the round's own norms, as the quantile-based bound of Andrew et al.,
    "Differentially Private Learning with Adaptive Clipping" (NeurIPS 2021), here the median, with a wide
    margin so that honest updates are never touched. The lower median (the smaller of the middle two) means that
    with two clients the smaller update sets the bound: one client cannot raise it. With fewer than two updates
    or a zero median there is no reference and nothing is clipped.
    """
    if ratio is None or stacked is None or stacked.shape[0] < 2:
        return stacked, []
    norms = stacked.float().norm(dim=1)
    median = float(norms.sort().values[(len(norms) - 1) // 2])
    bound = ratio * median
    if not median > 0 or not bool((norms > bound).any()):
        return stacked, []
    clipped, scale = [], torch.ones(len(norms), dtype=stacked.dtype)
    for j, norm in enumerate(norms.tolist()):
        if norm > bound:
            scale[j] = bound / norm
            clipped.append({"client_id": client_ids[j], "norm": norm, "bound": bound, "median_norm": median})
            log.warning("round %d: update of %s has L2 norm %.4g > fl.max_norm_ratio=%g x the round's median norm "
                        "%.4g: scaled down to %.4g (fl.max_norm_ratio: null switches this off)", round_no,
                        client_ids[j], norm, ratio, median, bound)
    return stacked * scale[:, None], clipped


def _rule_skipped(info: dict, rule_weights: torch.Tensor, delta: torch.Tensor) -> str | None:
    """Why the rule's result is no update at all (None when it is one): the probe's skip, or nobody kept."""
    probe = info.get("probe") if isinstance(info, dict) else None
    if isinstance(probe, dict) and probe.get("skipped"):
        return f"the probe skipped the round (mean client weight {probe.get('mean_weight', float('nan')):.3g})"
    if isinstance(info, dict) and info.get("skipped"):
        return f"the aggregation rule skipped the round ({info['skipped']})"
    if rule_weights.numel() and not bool((rule_weights > 0).any()) and not bool(delta.abs().sum() > 0):
        return "the aggregation rule kept no client"
    return None


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 10_000 else f"<tensor {tuple(obj.shape)}>"
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
