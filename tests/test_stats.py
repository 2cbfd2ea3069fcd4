"""fedsafe.stats: intervals over seeds and prompts against formulas and invariants."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from fedsafe.stats import (METHOD_LABELS, paired_difference, paired_seed_difference, summarize_per_prompt,
                           summarize_per_seed, t_interval, wilson_interval)


def _bernoulli(hits: int, n: int) -> dict:
    return {i: (100.0 if i < hits else 0.0) for i in range(n)}


def test_t_interval_matches_scipy():
    values = [5.4, 6.1, 5.8, 5.2]
    mean, lo, hi = t_interval(values)
    ref_lo, ref_hi = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert (lo, hi) == (pytest.approx(ref_lo), pytest.approx(ref_hi))
    assert t_interval([3.0])[1:] == (None, None)  # one seed: no interval
    est = summarize_per_seed([5.4, None, 6.1])
    assert est.n_seeds == 2 and est.std == pytest.approx(np.std([5.4, 6.1], ddof=1)) and est.method == "t_seeds"


def test_interval_of_a_constant_has_zero_width():
    per_seed = {s: {i: 100.0 for i in range(20)} for s in range(3)}
    est = summarize_per_prompt(per_seed)
    assert est.mean == 100.0 and est.std == 0.0
    assert est.hi - est.lo == pytest.approx(0.0, abs=1e-9) and est.lo == pytest.approx(100.0)
    assert summarize_per_seed([7.0, 7.0, 7.0]).lo == pytest.approx(7.0)


def test_single_seed_is_labelled_prompts_only_wilson_for_rates_bootstrap_otherwise():
    # 24 refusals in 48 prompts: the Wilson interval, labelled as resting on the prompt sample alone
    est = summarize_per_prompt({0: _bernoulli(24, 48)})
    lo, hi = wilson_interval(24, 48)
    assert est.mean == 50.0 and est.std is None and est.n_seeds == 1 and est.n_prompts == 48
    assert (est.lo, est.hi) == (pytest.approx(100 * lo), pytest.approx(100 * hi))
    assert est.method == "one_seed_wilson" and est.method_label == "one seed: prompts only (Wilson)"
    assert summarize_per_prompt({0: _bernoulli(0, 28)}).hi > 5.0  # 0/28 is not evidence of a 0% rate
    # a reward per prompt: percentile bootstrap over prompts, close to the normal approximation
    rewards = {i: float(v) for i, v in enumerate(np.random.default_rng(0).normal(1.0, 2.0, 200))}
    est = summarize_per_prompt({0: rewards})
    x = np.array(list(rewards.values()))
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert est.method == "one_seed_bootstrap" and est.method_label.startswith("one seed: prompts only")
    assert est.lo == pytest.approx(x.mean() - half, abs=0.1) and est.hi == pytest.approx(x.mean() + half, abs=0.1)
    assert set(METHOD_LABELS) >= {"t_seeds", "one_seed_wilson", "one_seed_bootstrap", "none"}


def test_several_seeds_get_a_t_interval_on_the_per_seed_prompt_means():
    rng = np.random.default_rng(3)
    per_seed = {s: {i: float(rng.random() < 0.3 + 0.2 * s) * 100 for i in range(30)} for s in range(3)}
    est = summarize_per_prompt(per_seed)
    means = [np.mean(list(v.values())) for v in per_seed.values()]
    ref = sps.t.interval(0.95, 2, loc=np.mean(means), scale=sps.sem(means))
    assert est.method == "t_seeds" and est.mean == pytest.approx(np.mean(means))
    assert (est.lo, est.hi) == (pytest.approx(ref[0]), pytest.approx(ref[1]))
    # same overall mean (50), but seeds that disagree give a wider interval than seeds that agree
    agree = {s: _bernoulli(10, 20) for s in range(3)}
    disagree = {0: _bernoulli(2, 20), 1: _bernoulli(10, 20), 2: _bernoulli(18, 20)}
    a, d = summarize_per_prompt(agree), summarize_per_prompt(disagree)
    assert a.mean == d.mean == 50.0
    assert d.hi - d.lo > a.hi - a.lo + 10
    assert d.std == pytest.approx(40.0)  # per-seed means 10, 50, 90
    # a rate's interval stays inside [0, 100] (mean 95.8 +- 17.9 unclipped), a paired difference in [-100, 100]
    high = summarize_per_prompt({0: _bernoulli(48, 48), 1: _bernoulli(48, 48), 2: _bernoulli(42, 48)})
    assert high.hi == 100.0 and high.lo == pytest.approx(95.8333 - 4.302653 * 7.216878 / math.sqrt(3), abs=1e-3)
    low = {0: _bernoulli(0, 48), 1: _bernoulli(0, 48), 2: _bernoulli(6, 48)}
    drop = paired_difference({s: _bernoulli(48, 48) for s in range(3)}, low)
    assert drop.lo == -100.0 and drop.hi < 0
    gain = paired_difference(low, {s: _bernoulli(48, 48) for s in range(3)})  # every prompt's difference >= 0
    assert gain.lo == pytest.approx(95.8333 - 4.302653 * 7.216878 / math.sqrt(3), abs=1e-3) and gain.hi == 100.0
    # every prompt's difference is 0 or +100 here, yet the true difference may be negative: clipped at -100, not 0
    same = {s: _bernoulli(24, 48) for s in range(3)}
    up = paired_difference(same, {0: _bernoulli(24, 48), 1: _bernoulli(24, 48), 2: _bernoulli(48, 48)})
    assert up.mean == pytest.approx(50 / 3)  # per-seed differences 0, 0, +50
    assert up.lo == pytest.approx(50 / 3 - 4.302653 * np.std([0, 0, 50], ddof=1) / math.sqrt(3)) and up.lo < -50


def _coverage(n_seeds: int, n_sims: int, rng, seed_sd: float = 0.25, n_prompts: int = 48) -> float:
    """Share of simulated 95% intervals that contain the true mean of a two-level model: per-seed true
    rates p_s ~ N(0.5, seed_sd) (clipped to [0, 1], symmetric, so the true mean is exactly 50), then one
    Bernoulli(p_s) outcome (0 or 100) per prompt."""
    hits = 0
    for _ in range(n_sims):
        p = np.clip(rng.normal(0.5, seed_sd, n_seeds), 0.0, 1.0)
        outcomes = (rng.random((n_seeds, n_prompts)) < p[:, None]) * 100.0
        est = summarize_per_prompt({s: dict(enumerate(outcomes[s])) for s in range(n_seeds)})
        hits += est.lo <= 50.0 <= est.hi
    return hits / n_sims


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_interval_coverage_is_close_to_nominal_with_few_seeds(n_seeds, test_seed):
    # between-seed SD 25 points on the 0-100 Rule scale, as fedsafe measures (per-seed Rule of one setting
    # spans e.g. 33-100); 4000 simulations: the coverage estimate's standard error is about 0.0035. The
    # two-stage bootstrap over seeds, then prompts (before issue 28), covered 0.841 (3 seeds) and 0.895
    # (5 seeds) in this test.
    coverage = _coverage(n_seeds, 4000, np.random.default_rng(1000 + test_seed))
    assert 0.92 <= coverage <= 0.98, coverage


def test_nested_prompts_when_seeds_drew_different_prompts():
    per_seed = {0: {i: 100.0 * (i % 2) for i in range(0, 20)}, 1: {i: 100.0 * (i % 2) for i in range(10, 30)}}
    est = summarize_per_prompt(per_seed)
    assert est.mean == 50.0 and est.n_seeds == 2 and est.n_prompts == 20
    per_seed[1] = {i: 100.0 * (i % 4 == 0) for i in range(10, 30)}
    est = summarize_per_prompt(per_seed)
    assert est.lo < est.mean < est.hi and est.method == "t_seeds"


def test_paired_difference_of_identical_settings_is_zero_and_not_significant():
    rng = np.random.default_rng(0)
    a = {s: {i: float(rng.random() < 0.5) * 100 for i in range(40)} for s in range(3)}
    est = paired_difference(a, a)
    assert (est.mean, est.lo, est.hi) == (0.0, 0.0, 0.0)
    assert est.significant is False


def test_paired_difference_pairs_by_seed_and_prompt():
    a = {0: {i: 0.0 for i in range(10)}, 1: {i: 0.0 for i in range(10)}}
    b = {0: {i: 100.0 for i in range(10)}, 1: {i: 100.0 for i in range(5)}, 2: {i: 0.0 for i in range(10)}}
    est = paired_difference(a, b)
    assert est.n_seeds == 2  # seed 2 has no partner
    assert (est.mean, est.lo, est.hi) == (100.0, 100.0, 100.0) and est.significant is True
    # one seed pairs prompt by prompt: a paired bootstrap over the shared prompts
    one = paired_difference({0: {i: 0.0 for i in range(40)}}, {0: {i: 100.0 * (i < 20) for i in range(40)}})
    assert one.method == "one_seed_bootstrap" and one.mean == 50.0 and 30 < one.lo < 50 < one.hi < 70
    # a large shared per-prompt effect is significant although the settings' own intervals overlap
    rng = np.random.default_rng(1)
    base = {s: {i: float(rng.random() < 0.5) * 100 for i in range(48)} for s in range(3)}
    better = {s: {i: (100.0 if i % 4 == 0 else v) for i, v in p.items()} for s, p in base.items()}
    diff = paired_difference(base, better)
    assert diff.mean > 0 and diff.lo > 0 and diff.significant
    assert summarize_per_prompt(better).lo < summarize_per_prompt(base).hi


def test_paired_difference_is_a_t_interval_on_per_seed_mean_differences_over_shared_prompts():
    a = {0: {i: 0.0 for i in range(10)}, 1: {i: 0.0 for i in range(10)}, 2: {i: 100.0 for i in range(10)}}
    b = {0: {i: 100.0 * (i < 3) for i in range(10)},  # +30 on prompts 0-9
         1: {i: 100.0 * (i < 2) for i in range(5)},  # only prompts 0-4 shared: +40
         2: {i: 100.0 * (i < 8) for i in range(20)}}  # -20 on the shared prompts 0-9 (10-19 unpaired)
    d = [30.0, 40.0, -20.0]
    est = paired_difference(a, b)
    ref = sps.t.interval(0.95, 2, loc=np.mean(d), scale=sps.sem(d))
    assert est.method == "t_seeds" and est.n_seeds == 3 and est.mean == pytest.approx(np.mean(d))
    assert (est.lo, est.hi) == (pytest.approx(ref[0]), pytest.approx(ref[1])) and est.significant is False


def test_paired_seed_difference_is_a_t_interval_on_per_seed_differences():
    a = {0: 5.0, 1: 6.0, 2: 5.5}
    b = {0: 5.5, 1: 6.7, 2: 5.9}
    est = paired_seed_difference(a, b)
    d = [0.5, 0.7, 0.4]
    ref = sps.t.interval(0.95, 2, loc=np.mean(d), scale=sps.sem(d))
    assert est.mean == pytest.approx(np.mean(d)) and (est.lo, est.hi) == (pytest.approx(ref[0]), pytest.approx(ref[1]))
    assert paired_seed_difference({0: 1.0}, {0: 2.0}).significant is None  # one seed: no interval


def test_eval_prompt_sample_follows_the_seed(tmp_path):
    import json

    from fedsafe.evaluation.runner import select_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"placeholder request {i}"}) for i in range(50)))
    ids, prompts = select_prompts(str(path), 8)
    assert ids == list(range(8)) and prompts[3] == "placeholder request 3"  # default: the first n, every seed
    a, b = select_prompts(str(path), 8, sample=True, seed=0), select_prompts(str(path), 8, sample=True, seed=1)
    assert a == select_prompts(str(path), 8, sample=True, seed=0)  # reproducible
    assert a[0] != b[0] and len(set(a[0])) == 8 and a[0] == sorted(a[0])
    assert all(p == f"placeholder request {i}" for i, p in zip(*a))  # ids are positions in the prompt set
    assert select_prompts(str(path), 80, sample=True, seed=1)[0] == list(range(50))


@pytest.mark.parametrize("k, n, lo, hi", [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605),
                                          (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_matches_newcombes_published_values(k, n, lo, hi):
    # Newcombe, "Two-sided confidence intervals for the single proportion" (Stat. Med. 1998), Table II,
    # method 3 (score interval without continuity correction)
    got = wilson_interval(k, n)
    assert got == (pytest.approx(lo, abs=5e-5), pytest.approx(hi, abs=5e-5))


def test_wilson_interval_is_the_closed_form_score_interval():
    # the formula fedsafe computed by hand before it called scipy: same values, every k/n and level
    for n in (1, 2, 8, 28, 48, 100):
        for k in range(n + 1):
            for conf in (0.9, 0.95, 0.99):
                z = sps.norm.ppf(0.5 + conf / 2)
                p, den = k / n, 1 + z * z / n
                mid = (p + z * z / (2 * n)) / den
                half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
                lo, hi = wilson_interval(float(k), n, conf)
                assert lo == pytest.approx(max(0.0, mid - half), abs=1e-12)
                assert hi == pytest.approx(min(1.0, mid + half), abs=1e-12)
    assert wilson_interval(0, 0) == (None, None)
    with pytest.raises(ValueError, match="whole number"):
        wilson_interval(2.5, 8)


@pytest.mark.parametrize("n", [48, 64, 280])
def test_wilson_interval_coverage_over_prompts_is_near_nominal(n):
    """One seed's interval over prompts (Wilson) at the prompt counts fedsafe reports (48 / 64 AdvBench prompts,
    280 everyday requests): its exact coverage of a binomial rate, summed over the binomial's outcomes, for rates
    2-98%. Only the prompt sampling is covered: a seed-to-seed spread is not in a one-seed interval. A Wald
    interval fails this (about 0.62 at p = 0.02, n = 48)."""
    from scipy.stats import binom

    intervals = [wilson_interval(k, n) for k in range(n + 1)]
    coverage = []
    for p in np.linspace(0.02, 0.98, 49):
        pmf = binom.pmf(np.arange(n + 1), n, p)
        coverage.append(sum(pmf[k] for k, (lo, hi) in enumerate(intervals) if lo <= p <= hi))
    assert 0.94 <= float(np.mean(coverage)) <= 0.96, np.mean(coverage)
    assert min(coverage) >= 0.92, min(coverage)
