"""Operations on stacked client updates ``[n, d]`` shared by the round loop, the rules and the defenses: row
clipping (DP-FedAvg, weak DP), Gaussian noise (seeded or from the OS) and pairwise cosine similarity (the stealth
statistics). One copy of each, below every module that uses them."""

from __future__ import annotations

import math
import os

import numpy as np
import torch


def clip_factors(x: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row factors min(1, clip_norm / ||x_i||) that clip each row of ``x`` [n, d] to L2 norm <= ``clip_norm``,
    and the rows' norms; nothing of size [n, d] is built (a weighted mean folds the factors into its weights)."""
    norms = x.norm(dim=1)
    return (clip_norm / (norms + 1e-12)).clamp(max=1.0), norms


def clip_rows(x: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each row of ``x`` [n, d] to L2 norm <= ``clip_norm``; returns (clipped, original norms)."""
    factors, norms = clip_factors(x, clip_norm)
    return x * factors[:, None], norms


def os_gaussian(numel: int) -> torch.Tensor:
    """``numel`` standard normal samples (float64) from the OS's CSPRNG (``os.urandom``), by Box-Muller."""
    pairs = (numel + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53  # (0, 1]: log(u1) is finite
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # [0, 1)
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * math.pi * u2
    return torch.from_numpy(np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:numel])


def gaussian_noise(numel: int, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, std^2) noise [numel] (float32): from ``generator`` (seeded simulation) or, if None, from the OS."""
    if generator is None:
        return (os_gaussian(numel) * std).float()
    return torch.randn(numel, generator=generator) * std


def cosine_matrix(updates: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of client updates ``[n, d] -> [n, n]`` (zero rows give 0)."""
    x = updates.float()
    norms = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    unit = x / norms
    return unit @ unit.T
