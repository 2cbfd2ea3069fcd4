"""Stealth analysis (Ye et al., Figure 2): how alike malicious and benign updates look to the server."""

from __future__ import annotations

import torch


def cosine_matrix(updates: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of client updates ``[n, d] -> [n, n]`` (zero rows give 0)."""
    x = updates.float()
    norms = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    unit = x / norms
    return unit @ unit.T
