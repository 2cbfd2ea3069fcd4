"""Server-side checks of client updates before aggregation: finite values, shape, dtype and norm bound."""

from __future__ import annotations

import torch


def check_update(update, expected_numel: int, max_norm: float | None = None) -> str | None:
    """The reason ``update`` must be dropped, or None when it is acceptable."""
    if not isinstance(update, torch.Tensor):
        return f"not a tensor ({type(update).__name__})"
    if not (update.is_floating_point()):
        return f"dtype {update.dtype} is not floating point"
    if update.ndim != 1 or update.numel() != expected_numel:
        return f"shape {tuple(update.shape)} != expected ({expected_numel},)"
    if not torch.isfinite(update).all():
        bad = int((~torch.isfinite(update)).sum())
        return f"{bad} non-finite values (NaN/Inf)"
    if max_norm is not None:
        norm = float(update.float().norm())
        if norm > max_norm:
            return f"L2 norm {norm:.4g} exceeds aggregator.max_update_norm={max_norm:g}"
    return None


def validate_updates(updates: list, client_ids: list[str], expected_numel: int,
                     max_norm: float | None = None) -> tuple[torch.Tensor | None, list[int], list[dict]]:
    """Stack the acceptable updates ``[k, d]``; return (stacked, kept indices, dropped {client_id, reason})."""
    kept, dropped, rows = [], [], []
    for i, (u, cid) in enumerate(zip(updates, client_ids)):
        reason = check_update(u, expected_numel, max_norm)
        if reason is None:
            kept.append(i)
            rows.append(u.detach().float().cpu())
        else:
            dropped.append({"client_id": cid, "reason": reason})
    stacked = torch.stack(rows) if rows else None
    return stacked, kept, dropped
