"""Centered clipping (CC), stateful across rounds.

Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization" (ICML 2021), Algorithm 2.
Starting from a centre v_0, L iterations of

    v_l = v_{l-1} + (1/n) * sum_i clip_tau(x_i - v_{l-1}),    clip_tau(z) = z * min(1, tau / ||z||)

and the aggregate is v_L. The centre is the previous round's aggregate (zero before the first round),
which is what makes the rule robust without a majority-based selection. The authors' code
(epfml/byzantine-robust-optimizer, codes/aggregator/clipping.py, ``Clipping``) keeps it the same way, as the
aggregator's state between calls (named ``momentum`` there, started at zeros, overwritten by each call's
result). An update within tau of the centre enters unchanged; one farther away moves the centre
by at most tau / n.

Hyperparameters: ``tau`` (the clipping radius, in the units of the update norms) and ``iterations`` L
(default 1). What the authors' code runs: the comparison with the other rules (momentum-robustness/
cifar10-all.py) uses ``Clipping(tau=100, n_iter=1)``; the hyperparameter sweep (cifar10-CC-HP-explore.sh)
tries tau in {0.1, 10, 1000} with L in {1, 3, 5} (its docstring also lists 7). Their inputs are one
SGD step's worker gradients, or worker momenta with beta in {0, 0.9, 0.99}, of a CIFAR-10 ResNet-20 (25
workers, learning rate 0.1), not the multi-step LoRA updates fedsafe aggregates, so tau = 100 carries over
to no fedsafe run; fedsafe asks for tau (no default) rather than invent a data-driven rule the paper does
not use.
Unweighted by sample counts, as in the authors' code. Works with any n >= 1.

``client_weights``: the aggregate is an affine combination v_L = c_0 v_0 + sum_i c_i x_i (each iteration
multiplies the previous coefficients by 1 - mean_i s_i and adds s_i / n to x_i's, s_i = min(1, tau/||x_i -
v_{l-1}||)); the weights are the c_i, and ``info["centre_weight"]`` is c_0 = 1 - sum_i c_i.

State: the centre (a [d] vector) via ``state_dict`` / ``load_state_dict``, so a resumed run continues from the
same centre (like FoolsGold's histories); a centre of another length (a different adapter) restarts at zero.
"""

from __future__ import annotations

import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator
from fedsafe.aggregators.geometric_median import distances_to


class CenteredClipping(Aggregator):
    """Iterative clipping around the previous aggregate (Karimireddy, He and Jaggi 2021)."""

    name = "centered_clipping"

    def __init__(self, tau: float, iterations: int = 1):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        self.tau = float(tau)
        self.iterations = int(iterations)
        self.centre: torch.Tensor | None = None

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        n, d = updates.shape
        if self.centre is None or self.centre.numel() != d:
            v = torch.zeros(d, device=updates.device)
        else:
            v = self.centre.to(updates.device, torch.float32)
        coef = torch.zeros(n, dtype=torch.float64, device=updates.device)
        centre_coef = 1.0
        for _ in range(self.iterations):
            dist = distances_to(updates, v)  # float64 from the differences themselves
            scale = (self.tau / dist.clamp_min(1e-300)).clamp(max=1.0)
            mean_scale = float(scale.mean())
            # v + mean_i s_i (x_i - v), without an [n, d] copy of the differences
            v = (scale / n).float() @ updates + (1.0 - mean_scale) * v
            coef = (1.0 - mean_scale) * coef + scale / n
            centre_coef *= 1.0 - mean_scale
        self.centre = v.detach().clone()
        info = {"tau": self.tau, "iterations": self.iterations, "centre_weight": centre_coef,
                "clipped": (dist > self.tau).tolist()}
        return AggregationResult(v, coef.float(), info)

    def state_dict(self) -> dict:
        return {"centre": None if self.centre is None else self.centre.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        centre = (state or {}).get("centre")
        self.centre = None if centre is None else centre.clone()

    def __repr__(self) -> str:
        return f"CenteredClipping(tau={self.tau}, iterations={self.iterations})"
