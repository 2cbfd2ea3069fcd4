"""Magnitude pruning of LoRA updates with a shared mask, for bandwidth-efficient secure aggregation.

FedShield-LLM (Mia & Amini, "FedShield-LLM: A Secure and Scalable Federated Fine-Tuned Large Language
Model", 2025) prunes the least important LoRA parameters by L1 magnitude with a pruning ratio that rises
linearly over rounds (0.2 -> 0.5 in its experiments). In its code every client prunes its *own* local
adapter, so masks differ between clients, the pruned entries are encrypted as zeros and then averaged in,
which saves nothing and biases the mean.

Here the mask is a deterministic function of the *global* adapter that every party already holds, so all
clients of a round and the server agree on it without a message:

    keep_t = top-(1 - p_t) fraction of |w_global| inside each LoRA tensor (A and B separately),
    p_t    = p_start + (p_end - p_start) * (t - 1) / (T - 1)          (t = 1..T)

Only kept coordinates are encrypted and sent; pruned coordinates get a zero delta, i.e. keep their global
value. Ties are broken by position (the earlier coordinate is kept), and the sort runs on the CPU in
float32, so the mask is bit-identical on every machine that holds the same global vector.

LoRA B starts at zero (PEFT initialisation), so in round 1 every B entry has magnitude 0 and a magnitude
ranking carries no information. A tensor whose entries are all zero is therefore kept whole: pruning it
would freeze arbitrary entries at exactly zero, and an untouched zero stays the smallest magnitude in every
later round, so those entries would never train. From round 2 on, B is dense and is ranked like A.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from fedsafe.errors import ConfigError

# Guards floor(ratio * numel) against values like 0.29 * 100 = 28.999999999999996.
_FLOOR_EPS = 1e-9


class _Segment(Protocol):
    offset: int

    @property
    def numel(self) -> int: ...


def pruning_schedule(round: int, total_rounds: int, start: float = 0.2, end: float = 0.5) -> float:
    """Pruning ratio of round ``round`` (1-based): linear from ``start`` at round 1 to ``end`` at the last round."""
    if total_rounds < 1:
        raise ConfigError(f"secure_agg.total_rounds must be >= 1, got {total_rounds}")
    if not 1 <= round <= total_rounds:
        raise ConfigError(f"round must be in 1..{total_rounds} (secure_agg.total_rounds), got {round}")
    for name, value in (("prune_start", start), ("prune_end", end)):
        if not (0.0 <= value < 1.0):
            raise ConfigError(f"secure_agg.{name} must be in [0, 1), got {value}")
    if total_rounds == 1:
        return float(start)
    return float(start + (end - start) * (round - 1) / (total_rounds - 1))


def pruning_mask(
    global_vec: torch.Tensor, ratio: float, specs: Sequence[_Segment] | None = None
) -> torch.Tensor:
    """Boolean keep-mask (CPU) over the flat LoRA vector: the largest-|value| (1 - ratio) of each tensor."""
    if not isinstance(global_vec, torch.Tensor) or global_vec.ndim != 1:
        raise ConfigError("pruning_mask: global_vec must be a 1-D tensor (the flat LoRA vector)")
    if not (0.0 <= ratio < 1.0):
        raise ConfigError(f"pruning ratio must be in [0, 1), got {ratio}")
    # Same bits on every machine: CPU float32, whatever device or dtype the caller holds it in.
    magnitude = global_vec.detach().to("cpu", torch.float32).abs()
    if not bool(torch.isfinite(magnitude).all()):
        raise ConfigError("pruning_mask: the global vector contains NaN or Inf")
    total = magnitude.numel()
    mask = torch.ones(total, dtype=torch.bool)
    if ratio == 0.0:
        return mask
    for offset, numel in _segments(specs, total):
        n_prune = min(int(math.floor(ratio * numel + _FLOOR_EPS)), numel - 1)  # every tensor keeps >= 1
        segment = magnitude[offset: offset + numel]
        if n_prune <= 0 or not bool(segment.any()):
            continue  # nothing to prune, or an all-zero tensor (LoRA B at init): keep it whole
        # Stable descending sort: equal magnitudes stay in index order, so the earlier one is kept.
        order = torch.sort(segment, descending=True, stable=True).indices
        mask[offset + order[numel - n_prune:]] = False
    return mask


class MaskSchedule:
    """The shared keep-mask of each round, pruning_mask(global, pruning_schedule(t, T, start, end), specs).

    Needs no key: clients, the server and the key holder each build one from public data (the LoRA layout,
    the schedule and the global adapter) and agree. The last mask is cached, keyed by the round and a hash
    of the global vector, since every party of a simulated round asks for the same one.
    """

    def __init__(self, specs: Sequence[_Segment] | None, start: float = 0.2, end: float = 0.5,
                 total_rounds: int = 1):
        pruning_schedule(1, total_rounds, start, end)  # fail early on bad values
        self.specs = tuple(specs) if specs is not None else None
        self.start, self.end, self.total_rounds = float(start), float(end), int(total_rounds)
        self._cache: tuple[int, str, torch.Tensor] | None = None

    def ratio(self, round: int) -> float:
        """Pruning ratio of 1-based round ``round``."""
        return pruning_schedule(round, self.total_rounds, self.start, self.end)

    def mask(self, global_vec: torch.Tensor, round: int) -> torch.Tensor:
        """The keep-mask of round ``round`` for this global adapter."""
        vec = global_vec.detach().to("cpu", torch.float32).contiguous()
        key = hashlib.sha256(vec.numpy().tobytes()).hexdigest()
        if self._cache is not None and self._cache[:2] == (round, key):
            return self._cache[2]
        mask = pruning_mask(vec, self.ratio(round), self.specs)
        self._cache = (round, key, mask)
        return mask


def mask_digest(mask: torch.Tensor) -> str:
    """Short SHA-256 fingerprint of a keep-mask, so parties can check that they agree."""
    bits = np.packbits(mask.detach().to("cpu").numpy().astype(np.bool_))
    h = hashlib.sha256()
    h.update(str(mask.numel()).encode())
    h.update(bits.tobytes())
    return h.hexdigest()[:16]


def _segments(specs: Sequence[_Segment] | None, total: int) -> list[tuple[int, int]]:
    # The specs must tile the vector exactly; otherwise a coordinate would silently escape the ranking.
    if specs is None:
        return [(0, total)]
    segments = sorted((int(s.offset), int(s.numel)) for s in specs)
    cursor = 0
    for offset, numel in segments:
        if offset != cursor or numel <= 0:
            raise ConfigError(
                f"pruning specs do not tile the LoRA vector: expected a tensor at offset {cursor}, got "
                f"offset {offset} with {numel} entries"
            )
        cursor += numel
    if cursor != total:
        raise ConfigError(f"pruning specs cover {cursor} coordinates but the LoRA vector has {total}")
    return segments
