"""Draw a fixed mix of two row pools (aligned + normal), shared by the post-hoc defense and ``model.align``."""

from __future__ import annotations

import random

from fedsafe.errors import ConfigError


def mix_rows(aligned: list[dict], normal: list[dict], n_samples: int, aligned_ratio: float, seed: int,
             field: str = "posthoc") -> list[dict]:
    """Sample ``n_samples`` rows with ``round(n*ratio)`` aligned and the rest normal (with replacement if short),
    shuffled under ``seed``; ``field`` names the config section in errors."""
    rng = random.Random(seed)
    n_aligned = round(n_samples * aligned_ratio)
    n_normal = n_samples - n_aligned
    if n_aligned and not aligned:
        raise ConfigError(f"{field}: aligned_ratio > 0 but no aligned data is available")
    if n_normal and not normal:
        raise ConfigError(f"{field}: aligned_ratio < 1 but no normal data is available")

    def take(pool: list[dict], k: int) -> list[dict]:
        if k <= len(pool):
            return rng.sample(pool, k)
        return pool + [rng.choice(pool) for _ in range(k - len(pool))]

    rows = take(aligned, n_aligned) + take(normal, n_normal)
    rng.shuffle(rows)
    return rows
