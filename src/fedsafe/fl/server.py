"""Server side of a round: seeded client sampling, update validation, aggregation and the server optimiser.

Server optimisers treat the aggregated client update as a pseudo-gradient Delta (Reddi et al.,
"Adaptive Federated Optimization", ICLR 2021, Algorithm 2):

- fedavg / fedprox / scaffold: x <- x + eta * Delta (eta = server_lr, 1 by default)
- fedavgm (Hsu et al. 2019): v <- beta v + Delta;  x <- x + eta v
- fedadagrad: m <- b1 m + (1-b1) Delta;  v <- v + Delta^2;                          x <- x + eta m / (sqrt(v) + tau)
- fedadam:    m <- b1 m + (1-b1) Delta;  v <- b2 v + (1-b2) Delta^2;                x <- x + eta m / (sqrt(v) + tau)
- fedyogi:    m <- b1 m + (1-b1) Delta;  v <- v - (1-b2) Delta^2 sign(v - Delta^2); x <- x + eta m / (sqrt(v) + tau)

SCAFFOLD (Karimireddy et al., ICML 2020): the server keeps c and sets c <- c + (|S|/N) mean_i(delta c_i).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from fedsafe.config import FLConfig
from fedsafe.errors import FedsafeError
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
            return global_vec + c.server_lr * v
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
            return global_vec + c.server_lr * m / (v.sqrt() + c.tau)
        return global_vec + c.server_lr * delta

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
        self.secure = secure  # SecureAggServer under HE: only ciphertexts arrive (fedsafe.defenses.secure_agg)
        self.global_vec = global_vec.clone()
        self.aggregator = aggregator
        self.seed = seed
        self.max_update_norm = max_update_norm
        self.num_clients = num_clients
        self.optimizer = ServerOptimizer(fl_cfg, global_vec.numel())
        self.scaffold_c = torch.zeros_like(global_vec) if fl_cfg.algorithm == "scaffold" else None
        self.compare: dict = {}  # label -> rule run on the same updates for analysis only (aggregator.compare)
        self.round = 0  # rounds completed
        self._context = None  # RoundContext of the round in progress (set by prepare_round)

    def round_config(self, round_idx: int, total_samples: int = 0) -> RoundConfig:
        """The plain config sent to every client in 0-based round ``round_idx``."""
        c = self.cfg
        return RoundConfig(round=round_idx + 1, lr=round_lr(c, round_idx), local_steps=c.local_steps,
                           batch_size=c.batch_size, grad_accum=c.grad_accum, seed=self.seed,
                           algorithm=c.algorithm, prox_mu=c.prox_mu if c.algorithm == "fedprox" else 0.0,
                           max_grad_norm=c.max_grad_norm, weight_decay=c.weight_decay,
                           scaffold_c=self.scaffold_c, total_samples=total_samples)

    def prepare_round(self, rc: RoundConfig, truth: dict[str, bool] | None = None, shadow=None) -> RoundConfig:
        """Give a stateful rule its round-start hook (probe: shadow training); returns the RoundConfig to send."""
        from fedsafe.aggregators.base import RoundContext

        self._context = RoundContext(round=rc.round, global_vec=self.global_vec, round_config=rc, truth=truth,
                                     shadow=shadow)
        prepare = getattr(self.aggregator, "prepare", None)
        return prepare(self._context) if prepare is not None else rc

    def aggregate(self, results: list[ClientResult]) -> dict:
        """Validate, aggregate and apply one round's results; return the round's aggregate statistics."""
        from fedsafe.aggregators.validation import validate_updates

        if self._context is not None:
            self._context.client_extra = {r.client_id: r.extra for r in results}
        if self.secure is not None:  # sum ciphertexts, a key holder decrypts; the linear step keeps pruned coords
            delta, stats = self.secure.aggregate(results, self.global_vec, self.round + 1)
            for d in stats["dropped"]:
                log.warning("round %d: dropped update of %s: %s", self.round + 1, d["client_id"], d["reason"])
            self.global_vec = self.optimizer.step(self.global_vec, delta)
            self.round += 1
            return stats

        ids = [r.client_id for r in results]
        stacked, kept, dropped = validate_updates([r.update for r in results], ids,
                                                  expected_numel=self.global_vec.numel(),
                                                  max_norm=self.max_update_norm)
        for d in dropped:
            log.warning("round %d: dropped update of %s: %s", self.round + 1, d["client_id"], d["reason"])
        weights_full = [0.0] * len(results)
        info: dict = {}
        compare_weights: dict = {}
        if not kept:
            log.warning("round %d: no valid update; the global adapter is unchanged", self.round + 1)
            delta = torch.zeros_like(self.global_vec)
        else:
            kept_results = [results[i] for i in kept]
            num_samples = torch.tensor([float(r.num_samples) for r in kept_results])
            res = self.aggregator(stacked, num_samples, [r.client_id for r in kept_results])
            delta = res.update.float().cpu()
            for j, i in enumerate(kept):
                weights_full[i] = float(res.client_weights[j])
            info = res.info
            compare_weights = self._compare_weights(stacked, num_samples, kept_results, kept, len(results))
            if self.scaffold_c is not None:
                dcs = [kept_results[j].extra["delta_c"] for j in range(len(kept_results))]
                self.scaffold_c = self.scaffold_c + torch.stack(dcs).mean(0) * (len(dcs) / self.num_clients)
        self.global_vec = self.optimizer.step(self.global_vec, delta)
        self.round += 1
        self._context = None
        return {"client_weights": weights_full, "dropped": dropped, "update_norm": float(delta.norm()),
                "aggregator_info": _jsonable(info), "kept": kept, "compare_weights": compare_weights}

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
                "scaffold_c": None if self.scaffold_c is None else self.scaffold_c.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state["round"])
        self.global_vec = state["global_vec"].clone()
        self.optimizer.load_state_dict(state["optimizer"])
        if hasattr(self.aggregator, "load_state_dict") and state.get("aggregator"):
            self.aggregator.load_state_dict(state["aggregator"])
        if state.get("scaffold_c") is not None:
            self.scaffold_c = state["scaffold_c"].clone()
        for label, rule_state in (state.get("compare") or {}).items():
            if label in self.compare:
                self.compare[label].load_state_dict(rule_state)


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
