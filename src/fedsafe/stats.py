"""Means, spreads and 95% intervals of results repeated over seeds and evaluated on a prompt sample.

A number fedsafe reports has two sources of chance: the seed (client sampling, partitions, generated
attack data, LoRA init, local batches) and the finite prompt sample it was measured on.

Method (what ``summary.csv``, ``comparisons.csv`` and the report use; each :class:`Estimate` records it
in ``method``, and :data:`METHOD_LABELS` says it in words):

- **Two or more seeds** (``"t_seeds"``): a Student-t interval on the per-seed values,
  ``mean +- t_{0.975, S-1} * sd / sqrt(S)`` (for a 0/100 rate clipped to [0, 100], for a difference of
  two rates to [-100, 100]). For a per-prompt metric (Rule, Judge, over-refusal: 100 or 0
  per prompt; RM: the reward of each answer) the per-seed value is that seed's mean over its prompts. A
  seed's mean already carries its own prompt-level noise, so the spread of the S seed means measures
  both sources at once (a two-level model: ``var(seed mean) = var_seed + var_prompt / n``) and the t
  quantile accounts for estimating it from S values. When every seed answered the same prompts (the
  default ``eval`` setting, a fixed prompt set) the interval is for the mean on that prompt set; when
  seeds drew their own prompts (``eval.sample_prompts``) it is for the prompt population's mean.
- **One seed** (``"one_seed_wilson"``, ``"one_seed_bootstrap"``): only the prompt sample can be
  resampled, so the interval is labelled *one seed: prompts only* and says nothing about other seeds. A
  0/100 metric gets a Wilson score interval on its share of 100s (:func:`wilson_interval`; it does not
  collapse to a point at 0/n or n/n); any other per-prompt value (a reward, a paired difference) a
  percentile bootstrap over prompts (``n_boot`` resamples, seeded). A metric measured once per seed has
  no interval with one seed.
- **Differences between two settings** are paired by seed: per seed, the mean over the prompts both
  settings answered of ``b - a`` (for a metric without per-prompt values, ``b - a`` of the per-seed
  values), then the same rules (a t-interval on the per-seed differences from two seeds on; with one
  seed a paired bootstrap over the shared prompts). A difference is *significant* when its interval
  excludes 0.
- ``std`` is the sample standard deviation (ddof=1) of the per-seed values; the point estimate is the
  mean of the per-seed values (every seed weighs the same).

Why not a bootstrap over seeds, then prompts (the method before issue 28): with 3-5 seeds the seed stage
sees few distinct resamples and its percentiles act like normal quantiles where a t quantile with S-1
degrees of freedom is needed. On the two-level model of ``tests/test_stats.py`` (per-seed rates with a
25-point SD, 48 Bernoulli prompts per seed, 4,000 simulations) its nominal 95% interval covered the true
mean 84.1% of the time at 3 seeds and 89.5% at 5; the t-interval 95.1% and 95.3%. The t-interval
assumes roughly normal seed means: for seed means skewed against a bound (mean 80, SD 14) it covered
about 92% at 3 seeds. With 2 seeds it is honest but wide (``t_{0.975, 1} = 12.7``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95
N_BOOT = 2000

PerSeed = Mapping[int, Mapping]  # seed -> {prompt id -> value}

# Estimate.method -> what made the interval, in words (tables and summary.csv name it)
METHOD_LABELS = {
    "t_seeds": "Student-t over per-seed means",
    "one_seed_wilson": "one seed: prompts only (Wilson)",
    "one_seed_bootstrap": "one seed: prompts only (bootstrap)",
    "none": "no interval",
}


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
    def method_label(self) -> str:
        """What made the interval, in words (:data:`METHOD_LABELS`)."""
        return METHOD_LABELS.get(self.method, self.method)

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
    scored on a few dozen prompts (a 0/28 over-refusal is not evidence of a 0% rate). Computed by
    ``scipy.stats.binomtest(...).proportion_ci(method="wilson")`` (no continuity correction).
    """
    from scipy.stats import binomtest

    if n <= 0:
        return None, None
    if successes != int(successes) or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes must be a whole number in [0, n={n}], got {successes!r}")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


def _clean(per_seed: PerSeed) -> dict[int, dict]:
    out = {}
    for seed, values in per_seed.items():
        kept = {k: float(v) for k, v in values.items() if v is not None and not math.isnan(float(v))}
        if kept:
            out[int(seed)] = kept
    return out


def _bootstrap_prompts(values: np.ndarray, confidence: float, n_boot: int, rng_seed: int) -> tuple[float, float]:
    """Percentile bootstrap of the mean of one seed's per-prompt values (resampled by integer counts, so
    the interval of a constant is exactly that constant)."""
    rng = np.random.default_rng(rng_seed)
    n = values.size
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n), rng.integers(0, n, size=n_boot * n)), 1.0)
    stats = counts @ values / n
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _is_binary_percent(values: np.ndarray) -> bool:
    return bool(np.all((values == 0.0) | (values == 100.0)))


def _bounds(data: dict[int, dict], difference: bool) -> tuple[float, float]:
    """The range a mean of these values can take: [0, 100] for 0/100 rates, [-100, 100] for paired
    differences of such rates (whatever signs this sample shows), unbounded otherwise (a t-interval is
    clipped to it; the true mean lies inside)."""
    values = np.concatenate([np.fromiter(v.values(), dtype=float) for v in data.values()])
    if not _is_binary_percent(np.abs(values)):
        return -math.inf, math.inf
    return (-100.0, 100.0) if difference else (0.0, 100.0)


def _summarize(data: dict[int, dict], confidence: float, n_boot: int, rng_seed: int, difference: bool) -> Estimate:
    if not data:
        return Estimate(float("nan"), None, None, None, 0, 0, "none")
    seed_means = [float(np.mean(list(v.values()))) for v in data.values()]
    n_prompts = int(round(np.mean([len(v) for v in data.values()])))
    if len(data) >= 2:
        mean, lo, hi = t_interval(seed_means, confidence)
        low, high = _bounds(data, difference)
        lo, hi = max(lo, low), min(hi, high)
        return Estimate(mean, float(np.std(seed_means, ddof=1)), lo, hi, len(data), n_prompts, "t_seeds")
    values = np.fromiter(next(iter(data.values())).values(), dtype=float)
    mean = float(values.mean())
    if not difference and _is_binary_percent(values):
        lo, hi = wilson_interval(float((values == 100.0).sum()), values.size, confidence)
        return Estimate(mean, None, 100.0 * lo, 100.0 * hi, 1, n_prompts, "one_seed_wilson")
    lo, hi = _bootstrap_prompts(values, confidence, n_boot, rng_seed)
    return Estimate(mean, None, lo, hi, 1, n_prompts, "one_seed_bootstrap")


def summarize_per_prompt(per_seed: PerSeed, confidence: float = CONFIDENCE, n_boot: int = N_BOOT,
                         rng_seed: int = 0) -> Estimate:
    """Mean over seeds of the per-seed prompt means, their std, and the interval of the module docstring.

    ``per_seed`` maps a seed to ``{prompt id: value}``. Two or more seeds: a Student-t interval on the
    per-seed means. One seed: prompts only (Wilson for 0/100 values, else a bootstrap over prompts).
    """
    return _summarize(_clean(per_seed), confidence, n_boot, rng_seed, difference=False)


def summarize_per_seed(values: Sequence[float | None], confidence: float = CONFIDENCE) -> Estimate:
    """Mean, std and Student-t interval of one value per seed."""
    x = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not x:
        return Estimate(float("nan"), None, None, None, 0, None, "none")
    mean, lo, hi = t_interval(x, confidence)
    std = float(np.std(x, ddof=1)) if len(x) > 1 else None
    return Estimate(mean, std, lo, hi, len(x), None, "t_seeds" if lo is not None else "none")


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
    """``b - a`` paired by seed and prompt: a t-interval on the per-seed mean differences over shared prompts
    (two or more seeds), or a paired bootstrap over the shared prompts (one seed)."""
    return _summarize(paired_per_prompt(a, b), confidence, n_boot, rng_seed, difference=True)


def paired_seed_difference(a: Mapping[int, float | None], b: Mapping[int, float | None],
                           confidence: float = CONFIDENCE) -> Estimate:
    """``b - a`` paired by seed (one value per seed and side), with a Student-t interval."""
    diffs = [float(b[s]) - float(a[s]) for s in sorted(set(a) & set(b))
             if a[s] is not None and b[s] is not None and not math.isnan(float(a[s])) and not math.isnan(float(b[s]))]
    return summarize_per_seed(diffs, confidence)
