"""Means, spreads and 95% intervals of results repeated over seeds and evaluated on a prompt sample.

A number fedsafe reports has two sources of chance: the seed (client sampling, partitions, generated
attack data, LoRA init, local batches) and the finite prompt sample it was measured on. The intervals
here combine both.

Method (what ``summary.csv`` and the report use):

- **Per-prompt metrics** (Rule and Judge: 100 or 0 per prompt; RM: the reward of each answer) get a
  two-stage (hierarchical) percentile bootstrap (Davison & Hinkley, *Bootstrap Methods and their
  Application*, 1997, sec. 3.8; Field & Welsh, JRSS-B 2007): each of ``n_boot`` resamples draws the S
  seeds with replacement, then the prompts with replacement, and takes the mean over the drawn seeds of
  each seed's prompt mean. When every seed was evaluated on the same prompts (a crossed design, the
  default ``eval`` setting) one prompt resample is shared by all drawn seeds, since the prompt sample is
  then common to all of them; when seeds drew their own prompts (``eval.sample_prompts``) each drawn
  seed resamples its own prompts (a nested design). The interval is the 2.5th-97.5th percentile of the
  resampled means. With one seed it is a plain bootstrap over prompts.
- **Metrics measured once per seed** (helpfulness proxy, MT-1 without per-prompt data): a Student-t
  interval over seeds, ``mean +- t_{0.975, S-1} * sd / sqrt(S)``; no interval with one seed.
- **Differences between two settings** are paired: per seed, only the prompts both settings answered,
  ``d = b - a`` per prompt, and the same bootstrap on ``d`` (a t-interval on per-seed differences for
  metrics without per-prompt data). A difference is *significant* when its interval excludes 0.
- ``std`` is the sample standard deviation (ddof=1) of the per-seed values; the point estimate is the
  mean of the per-seed values (every seed weighs the same).

Caveat: with few seeds (3 is common) the seed stage of a bootstrap sees few distinct resamples and
understates the between-seed spread by a factor of about sqrt((S-1)/S); read intervals from 3 seeds
as approximate. Resampling is seeded, so a report is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95
N_BOOT = 2000

PerSeed = Mapping[int, Mapping]  # seed -> {prompt id -> value}


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its spread over seeds and its interval (None where it cannot be computed)."""

    mean: float
    std: float | None
    lo: float | None
    hi: float | None
    n_seeds: int
    n_prompts: int | None = None
    method: str = "none"

    @property
    def significant(self) -> bool | None:
        """For a difference: True when the interval excludes 0 (None without an interval)."""
        if self.lo is None or self.hi is None:
            return None
        return not (self.lo <= 0.0 <= self.hi)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float | None, float | None]:
    """Student-t interval of the mean: ``(mean, lo, hi)``; lo/hi are None for fewer than 2 values."""
    from scipy.stats import t

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if x.size == 0:
        return float("nan"), None, None
    mean = float(x.mean())
    if x.size < 2:
        return mean, None, None
    half = float(t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion ``successes / n`` (as fractions; None, None for n = 0).

    Wilson, "Probable inference, the law of succession, and statistical inference" (JASA 1927). Unlike a
    bootstrap over prompts it does not collapse to a point at 0/n or n/n, which matters for one adapter
    scored on a few dozen prompts (a 0/28 over-refusal is not evidence of a 0% rate).
    """
    from scipy.stats import norm

    if n <= 0:
        return None, None
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def _clean(per_seed: PerSeed) -> dict[int, dict]:
    out = {}
    for seed, values in per_seed.items():
        kept = {k: float(v) for k, v in values.items() if v is not None and not math.isnan(float(v))}
        if kept:
            out[int(seed)] = kept
    return out


def hierarchical_bootstrap(per_seed: PerSeed, confidence: float = CONFIDENCE, n_boot: int = N_BOOT,
                           rng_seed: int = 0) -> tuple[float, float, float]:
    """Two-stage bootstrap (seeds, then prompts) of the mean over seeds of per-seed prompt means.

    ``per_seed`` maps a seed to ``{prompt id: value}``. Returns ``(mean, lo, hi)``. Seeds that share their
    prompt ids share one prompt resample (crossed design); otherwise each drawn seed resamples its own.
    """
    data = _clean(per_seed)
    if not data:
        return float("nan"), float("nan"), float("nan")
    seeds = sorted(data)
    rng = np.random.default_rng(rng_seed)
    n_seeds = len(seeds)
    seed_draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    mean = float(np.mean([np.mean(list(data[s].values())) for s in seeds]))
    ids = [sorted(data[s], key=str) for s in seeds]
    if all(i == ids[0] for i in ids):  # crossed: the same prompts for every seed
        values = np.array([[data[s][k] for k in ids[0]] for s in seeds])  # [S, n]
        n = values.shape[1]
        # resample counts (integers, so the mean of a constant stays exactly that constant)
        seed_counts = np.zeros((n_boot, n_seeds))
        np.add.at(seed_counts, (np.repeat(np.arange(n_boot), n_seeds), seed_draws.ravel()), 1.0)
        prompt_draws = rng.integers(0, n, size=(n_boot, n))
        prompt_counts = np.zeros((n_boot, n))
        np.add.at(prompt_counts, (np.repeat(np.arange(n_boot), n), prompt_draws.ravel()), 1.0)
        stats = np.einsum("bs,sn,bn->b", seed_counts, values, prompt_counts) / (n_seeds * n)
    else:  # nested: each drawn seed resamples its own prompts
        per_seed_means = np.empty((n_boot, n_seeds))
        for k in range(n_seeds):
            for j, s in enumerate(seeds):
                rows = seed_draws[:, k] == j
                if not rows.any():
                    continue
                v = np.fromiter(data[s].values(), dtype=float)
                draws = rng.integers(0, v.size, size=(int(rows.sum()), v.size))
                per_seed_means[rows, k] = v[draws].mean(axis=1)
        stats = per_seed_means.mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return mean, float(lo), float(hi)


def summarize_per_prompt(per_seed: PerSeed, confidence: float = CONFIDENCE, n_boot: int = N_BOOT,
                         rng_seed: int = 0) -> Estimate:
    """Mean over seeds, std of the per-seed means, and the hierarchical-bootstrap interval."""
    data = _clean(per_seed)
    if not data:
        return Estimate(float("nan"), None, None, None, 0, 0, "none")
    seed_means = [float(np.mean(list(v.values()))) for v in data.values()]
    mean, lo, hi = hierarchical_bootstrap(data, confidence, n_boot, rng_seed)
    std = float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else None
    n_prompts = int(round(np.mean([len(v) for v in data.values()])))
    return Estimate(mean, std, lo, hi, len(data), n_prompts, "bootstrap")


def summarize_per_seed(values: Sequence[float | None], confidence: float = CONFIDENCE) -> Estimate:
    """Mean, std and Student-t interval of one value per seed."""
    x = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not x:
        return Estimate(float("nan"), None, None, None, 0, None, "none")
    mean, lo, hi = t_interval(x, confidence)
    std = float(np.std(x, ddof=1)) if len(x) > 1 else None
    return Estimate(mean, std, lo, hi, len(x), None, "t" if lo is not None else "none")


def paired_per_prompt(a: PerSeed, b: PerSeed) -> dict[int, dict]:
    """Per seed, ``b - a`` on the prompts both answered (seeds or prompts only one side has are dropped)."""
    a, b = _clean(a), _clean(b)
    out = {}
    for seed in sorted(set(a) & set(b)):
        common = set(a[seed]) & set(b[seed])
        if common:
            out[seed] = {k: b[seed][k] - a[seed][k] for k in common}
    return out


def paired_difference(a: PerSeed, b: PerSeed, confidence: float = CONFIDENCE, n_boot: int = N_BOOT,
                      rng_seed: int = 0) -> Estimate:
    """``b - a`` paired by seed and prompt, with its hierarchical-bootstrap interval."""
    return summarize_per_prompt(paired_per_prompt(a, b), confidence, n_boot, rng_seed)


def paired_seed_difference(a: Mapping[int, float | None], b: Mapping[int, float | None],
                           confidence: float = CONFIDENCE) -> Estimate:
    """``b - a`` paired by seed (one value per seed and side), with a Student-t interval."""
    diffs = [float(b[s]) - float(a[s]) for s in sorted(set(a) & set(b))
             if a[s] is not None and b[s] is not None and not math.isnan(float(a[s])) and not math.isnan(float(b[s]))]
    return summarize_per_seed(diffs, confidence)
