"""LASA: layer-adaptive sparsified model aggregation.

Xu, Zhang, Hu, "Achieving Byzantine-Resilient Federated Learning via Layer-Adaptive
Sparsified Model Aggregation" (WACV 2025), checked against the authors' code (JiiahaoXU/LASA,
``algorithms/defense/lasa.py``). On the round's updates x_1..x_n:

    1. clip         S = median_i ||x_i||,  x_i <- x_i * min(1, S / ||x_i||)
    2. sparsify     keep the k = floor(D (1 - s)) largest |x_ij| of each update (a global top-k over all its D
                    values; entries equal to the k-th largest are dropped too, as in the authors' ``>``), the
                    rest set to 0 (pre-aggregation sparsification, ``sparsity`` s)
    3. per layer l (each LoRA tensor: one state-dict key in the authors' code, here one A or B factor of one
       module, from the flat vector's layout :class:`fedsafe.fl.params.FlatLoRA`):
         magnitude  m_i = ||x_i^l||,               MZ_i = |m_i - med(m)| / std(m),   keep if MZ_i < lambda_n
         direction  rho_i = (1 + sum sgn(x_i^l) / sum |sgn(x_i^l)|) / 2   (positive direction purity),
                                                   MZ_i = |rho_i - med(rho)| / std(rho), keep if MZ_i < lambda_s
         admitted   the clients kept by both (all clients when none is)
         aggregate  Delta^l = mean of the admitted clients' sparsified x_i^l

Hyperparameters (the authors' defaults): ``sparsity`` s = 0.3, ``lambda_n`` = 1.0, ``lambda_s`` = 1.0.
``std`` is the population standard deviation (NumPy's ``np.std``); a layer where it is 0 gives every MZ-score
0/0 (NaN) there, which keeps no client by that check, so the layer admits all clients (as in the authors'
code). The median of step 1 is the lower middle value for even n (``torch.median``, as the authors use);
those of step 3 the midpoint (``np.median``). The authors' direction feature also multiplies the ratio by
(1 - s): an affine map common to all clients, which leaves the MZ-scores unchanged, so it is left out.

Where fedsafe had to choose: a layer with no non-zero value left after sparsification has direction purity 1/2
(the authors' code divides 0 by 0 there, which makes every client's score NaN for that layer and admits them
all); a zero update is not rescaled. Without a layout (:meth:`LASA.bind`, done by :meth:`prepare` from the
server's LoRA layout) the whole vector is one layer. Works with any n >= 1.

``client_weights``: the share of the output each client produced: sum over layers of (layer size / D) /
(admitted clients of the layer) for each layer that admits it (the weights sum to 1).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fedsafe.aggregators.base import AggregationResult, Aggregator

log = logging.getLogger("fedsafe")


def sparsify_topk(updates: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each row with only its values strictly above its k-th largest magnitude kept, k = floor(D (1 - s))."""
    n, d = updates.shape
    if sparsity <= 0 or d == 0:
        return updates.clone()
    k = max(1, int(d * (1 - sparsity)))
    mags = updates.abs()
    threshold = torch.kthvalue(mags, d - k + 1, dim=1).values  # the k-th largest of each row
    return torch.where(mags > threshold[:, None], updates, torch.zeros((), dtype=updates.dtype, device=updates.device))


def mz_keep(values: np.ndarray, bound: float) -> np.ndarray:
    """Median-based z-scores |v - med(v)| / std(v) < bound (NaN scores keep nothing)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.abs((values - np.median(values)) / np.std(values))
    return scores < bound


class LASA(Aggregator):
    """Median-norm clipping, top-k sparsification, then a per-layer magnitude and sign MZ-score filter."""

    name = "lasa"

    def __init__(self, sparsity: float = 0.3, lambda_n: float = 1.0, lambda_s: float = 1.0):
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        for key, value in (("lambda_n", lambda_n), ("lambda_s", lambda_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{key} must be > 0, got {value!r}")
        self.sparsity, self.lambda_n, self.lambda_s = float(sparsity), float(lambda_n), float(lambda_s)
        self.spans: list[tuple[int, int]] | None = None  # (start, stop) of each layer in the flat vector
        self._warned = False

    def bind(self, flat) -> LASA:
        """Use the layers of a :class:`~fedsafe.fl.params.FlatLoRA` layout (one per LoRA tensor)."""
        self.spans = [(s.offset, s.offset + s.numel) for s in flat.specs]
        return self

    def prepare(self, context):
        """Round start: take the LoRA layout from the server (once)."""
        flat = getattr(context, "flat", None)
        if self.spans is None and flat is not None:
            self.bind(flat)
        return context.round_config

    def _layers(self, d: int) -> list[tuple[int, int]]:
        if self.spans is not None and self.spans and self.spans[-1][1] == d:
            return self.spans
        if not self._warned:
            log.warning("lasa: no LoRA layout for %d values%s: the whole update is one layer", d,
                        "" if self.spans is None else " (the bound layout has another length)")
            self._warned = True
        return [(0, d)]

    def aggregate(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]) -> AggregationResult:
        n, d = updates.shape
        norms = updates.norm(dim=1)
        clip_to = norms.median()  # the lower middle value for even n, as torch.median in the authors' code
        scale = torch.where(norms > 0, torch.minimum(norms, clip_to) / norms.clamp_min(1e-30), torch.ones_like(norms))
        sparse = sparsify_topk(updates * scale[:, None], self.sparsity)
        out = torch.zeros(d, device=updates.device)
        shares = np.zeros(n)
        layers = self._layers(d)
        admitted_per_layer, dropped_by = [], {"norm": 0, "sign": 0}
        for start, stop in layers:
            block = sparse[:, start:stop]
            mags = block.double().norm(dim=1).cpu().numpy()
            signs = torch.sign(block)
            nonzero = signs.abs().sum(dim=1).double()
            purity = 0.5 * (1 + torch.where(nonzero > 0, signs.sum(dim=1).double() / nonzero.clamp_min(1),
                                            torch.zeros_like(nonzero)))
            keep_norm = mz_keep(mags, self.lambda_n)
            keep_sign = mz_keep(purity.cpu().numpy(), self.lambda_s)
            keep = keep_norm & keep_sign
            if not keep.any():
                keep = np.ones(n, dtype=bool)
            idx = np.flatnonzero(keep)
            out[start:stop] = block[torch.as_tensor(idx, device=updates.device)].mean(dim=0)
            shares[idx] += (stop - start) / max(d, 1) / len(idx)
            admitted_per_layer.append(int(len(idx)))
            dropped_by["norm"] += int((~keep_norm).sum())
            dropped_by["sign"] += int((~keep_sign).sum())
        info = {"layers": len(layers), "median_norm": float(clip_to), "admitted_per_layer": admitted_per_layer,
                "dropped_by_norm": dropped_by["norm"], "dropped_by_sign": dropped_by["sign"]}
        return AggregationResult(out, torch.as_tensor(shares, dtype=torch.float32, device=updates.device), info)

    def __repr__(self) -> str:
        return f"LASA(sparsity={self.sparsity}, lambda_n={self.lambda_n}, lambda_s={self.lambda_s})"
