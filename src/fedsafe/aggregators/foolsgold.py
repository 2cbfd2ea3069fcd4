"""FoolsGold.

Fung, Yoon, Beschastnikh, "The Limitations of Federated Learning in Sybil Settings" (RAID 2020),
Algorithm 1. The server keeps, per client id, the sum of all its past updates H_i (its history). Each round,
over the clients present:

    cs_ij  = cos(H_i, H_j) for i != j, cs_ii = 0;   v_i = max_j cs_ij
    pardoning: cs_ij <- cs_ij * v_i / v_j  when v_j > v_i  (i != j)
    alpha_i = 1 - max_j cs_ij, clipped to [0, 1];  alpha_i <- alpha_i / max_j alpha_j
    logit:   alpha_i <- kappa * (ln(alpha_i / (1 - alpha_i)) + 0.5), clipped to [0, 1]
             (alpha_i = 1 is first set to 0.99, as in the authors' code)

The zero diagonal is the authors' code (DistributedML/FoolsGold, ``deep-fg/fg/foolsgold.py`` and
``ML/code/model_aggregator.py``: ``cs = cosine_similarity(H) - eye(n)``): it keeps every v_i >= 0, so
pardoning only ever shrinks a similarity towards 0 and a client whose history points away from all the
others (v_i = 0) gets all its similarities pardoned to 0 and weight 1. (With the diagonal left out of the
maximum, v_i < 0 would make the ratio v_i / v_j negative and turn cs_ij = -1 into +1, down-weighting that
client to 0.) Their ML code also adds 1e-5 to v and inside the log, which moves a weight by about 1e-5; it is
not copied. A zero history has cosine 0 with everyone, as in scikit-learn's ``cosine_similarity``.

Sybils that push the same objective keep similar histories and are driven to weight 0; honest clients
with diverse data keep weight close to 1. The paper's optional importance weighting of output-layer
features is not used: LoRA update vectors have no softmax-layer features to weight.

Aggregate: the paper adds sum_i alpha_i delta_i to the model. With ``normalize=True`` (default) the
weights are divided by their sum, so the step has FedAvg's scale (the server optimiser then applies it
like any other rule); ``normalize=False`` is the literal sum. When every alpha is 0 the update is zero.

``client_weights``: the weight each update got in the aggregate (alpha / sum(alpha), or alpha).

State: the histories (a [d] float32 vector per client id seen) via ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

import math

import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator, gram_matrix


def foolsgold_weights(history: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """FoolsGold's per-client weights alpha ``[n]`` from the stacked histories ``[n, d]``."""
    n = history.shape[0]
    if n == 1:
        return torch.ones(1, dtype=torch.float64, device=history.device)
    gram = gram_matrix(history)
    norms = gram.diagonal().clamp_min(0).sqrt().clamp_min(1e-12)
    cs = gram / norms[:, None] / norms[None, :]
    cs.fill_diagonal_(0.0)  # the authors' cosine_similarity(H) - eye(n): v_i >= 0 for every client
    v = cs.max(dim=1).values
    # pardoning: scale cs_ij by v_i / v_j wherever v_j > v_i (the more suspicious client j does not
    # drag down client i); v_j > v_i >= 0 there, so the ratio is in [0, 1) and keeps the sign of cs_ij
    ratio = v[:, None] / torch.where(v == 0, torch.ones_like(v), v)[None, :]
    cs = torch.where(v[None, :] > v[:, None], cs * ratio, cs)
    cs.fill_diagonal_(0.0)  # the authors' loop skips i == j
    alpha = (1 - cs.max(dim=1).values).clamp(0, 1)
    top = alpha.max()
    if top <= 0:
        return torch.zeros(n, dtype=torch.float64, device=history.device)
    alpha = alpha / top
    alpha = torch.where(alpha == 1, torch.full_like(alpha, 0.99), alpha)
    with torch.no_grad():
        logit = kappa * (torch.log(alpha / (1 - alpha)) + 0.5)
    logit = torch.nan_to_num(logit, nan=0.0, posinf=1.0, neginf=0.0)
    return logit.clamp(0, 1)


class FoolsGold(Aggregator):
    """History-based sybil down-weighting with pardoning and the logit confidence."""

    name = "foolsgold"

    def __init__(self, kappa: float = 1.0, normalize: bool = True):
        if kappa <= 0:
            raise ValueError(f"kappa must be > 0, got {kappa}")
        self.kappa = float(kappa)
        self.normalize = bool(normalize)
        self.history: dict[str, torch.Tensor] = {}

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        n, d = updates.shape
        for cid, u in zip(client_ids, updates):
            prev = self.history.get(cid)
            self.history[cid] = u.clone() if prev is None or prev.numel() != d else prev + u
        hist = torch.stack([self.history[c] for c in client_ids])
        alpha = foolsgold_weights(hist, self.kappa).float()
        total = float(alpha.sum())
        if self.normalize:
            weights = alpha / total if total > 0 else torch.zeros(n, device=updates.device)
        else:
            weights = alpha
        info = {"alpha": alpha.tolist()}
        if total == 0 or not math.isfinite(total):
            info["all_zero"] = True
        return AggregationResult(weights @ updates, weights, info)

    def state_dict(self) -> dict:
        return {"history": {k: v.clone() for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: v.clone() for k, v in (state.get("history") or {}).items()}

    def __repr__(self) -> str:
        return f"FoolsGold(kappa={self.kappa}, normalize={self.normalize})"
