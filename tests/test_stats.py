"""fedsafe.stats: intervals over seeds and prompts against formulas and invariants."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from fedsafe.stats import (hierarchical_bootstrap, paired_difference, paired_seed_difference, summarize_per_prompt,
                           summarize_per_seed, t_interval)


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
    assert est.n_seeds == 2 and est.std == pytest.approx(np.std([5.4, 6.1], ddof=1)) and est.method == "t"


def test_interval_of_a_constant_has_zero_width():
    per_seed = {s: {i: 100.0 for i in range(20)} for s in range(3)}
    est = summarize_per_prompt(per_seed)
    assert est.mean == 100.0 and est.std == 0.0
    assert est.hi - est.lo == pytest.approx(0.0, abs=1e-9) and est.lo == pytest.approx(100.0)
    assert summarize_per_seed([7.0, 7.0, 7.0]).lo == pytest.approx(7.0)


def test_single_seed_bootstrap_matches_the_binomial_interval():
    # 24 refusals in 48 prompts: normal approximation 50 +- 1.96 * sqrt(.25 / 48) * 100 = 50 +- 14.1
    est = summarize_per_prompt({0: _bernoulli(24, 48)})
    half = 1.96 * math.sqrt(0.25 / 48) * 100
    assert est.mean == 50.0 and est.std is None and est.n_seeds == 1 and est.n_prompts == 48
    assert est.lo == pytest.approx(50 - half, abs=3.0) and est.hi == pytest.approx(50 + half, abs=3.0)


def test_bootstrap_interval_contains_the_mean_and_widens_with_seed_spread():
    rng = np.random.default_rng(3)
    for _ in range(5):
        per_seed = {s: {i: float(rng.random() < 0.3 + 0.2 * s) * 100 for i in range(30)} for s in range(3)}
        mean, lo, hi = hierarchical_bootstrap(per_seed)
        assert lo <= mean <= hi
        assert mean == pytest.approx(np.mean([np.mean(list(v.values())) for v in per_seed.values()]))
    # same overall mean (50), but seeds that disagree give a wider interval than seeds that agree
    agree = {s: _bernoulli(10, 20) for s in range(3)}
    disagree = {0: _bernoulli(2, 20), 1: _bernoulli(10, 20), 2: _bernoulli(18, 20)}
    a, d = summarize_per_prompt(agree), summarize_per_prompt(disagree)
    assert a.mean == d.mean == 50.0
    assert d.hi - d.lo > a.hi - a.lo + 10
    assert d.std == pytest.approx(40.0)  # per-seed means 10, 50, 90


def test_nested_prompts_when_seeds_drew_different_prompts():
    per_seed = {0: {i: 100.0 * (i % 2) for i in range(0, 20)}, 1: {i: 100.0 * (i % 2) for i in range(10, 30)}}
    est = summarize_per_prompt(per_seed)
    assert est.mean == 50.0 and est.lo < 50.0 < est.hi and est.n_seeds == 2


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
    # a large shared per-prompt effect is significant although the settings' own intervals overlap
    rng = np.random.default_rng(1)
    base = {s: {i: float(rng.random() < 0.5) * 100 for i in range(48)} for s in range(3)}
    better = {s: {i: (100.0 if i % 4 == 0 else v) for i, v in p.items()} for s, p in base.items()}
    diff = paired_difference(base, better)
    assert diff.mean > 0 and diff.lo > 0 and diff.significant


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
