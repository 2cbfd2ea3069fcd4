"""Speed of the leakage metric (best-match ROUGE-L of every generation against the victims' training texts).

    python benchmarks/leakage.py                      # 1k x 1k with the exhaustive check, then 10k x 10k
    python benchmarks/leakage.py --sizes 2000 --exhaustive

Synthetic corpus: training texts of 20-80 words from a 5,000-word Zipf vocabulary; generations are a mix
of noisy copies of training texts (words dropped/replaced at 10-30%) and unrelated text, as extraction
attacks produce. "agree" is the share of generations whose prefiltered best score equals the exhaustive
one, over the noisy copies (what leakage is about) and over all generations (unrelated text has a weak
best match, ROUGE-L ~0.3-0.5 on this Zipf corpus, that the prefilter need not find); computed for
n <= 1000 or with --exhaustive (O(n^2) LCS calls). The prefiltered score is a lower bound of the exhaustive
one; "max gap" is the largest amount by which it falls short (``privacy.exhaustive: true`` closes it).
"""

from __future__ import annotations

import argparse
import random
import time

from fedsafe.evaluation import leakage as lk


def corpus(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` training texts and ``n`` generations (half noisy copies, half unrelated)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    refs = [" ".join(rng.choices(vocab, weights, k=rng.randint(20, 80))) for _ in range(n)]
    gens = []
    for i in range(n):
        if i % 2:
            gens.append(" ".join(rng.choices(vocab, weights, k=rng.randint(20, 80))))
        else:
            noise = rng.uniform(0.1, 0.3)
            words = rng.choice(refs).split()
            gens.append(" ".join(w if rng.random() > noise else rng.choice(vocab) for w in words
                                 if rng.random() > noise / 2))
    return refs, gens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--exhaustive", action="store_true", help="also run the exhaustive search (slow)")
    args = ap.parse_args()
    print(f"| generations x training texts | index s | prefiltered s | gen/s | mean ROUGE-L | near-exact | "
          f"exhaustive s | agree (copies) | agree (all) | max gap |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        refs, gens = corpus(n)
        t0 = time.perf_counter()
        index = lk.ReferenceIndex(refs)
        t_index = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = lk.leakage(gens, index, candidates=args.candidates)
        t_fast = time.perf_counter() - t0
        ex_s, agree, agree_all, gap = "-", "-", "-", "-"
        if args.exhaustive or n <= 1000:
            t0 = time.perf_counter()
            full = [index.best_match(g, exhaustive=True).score for g in gens]
            ex_s = f"{time.perf_counter() - t0:.1f}"
            same = [abs(a.score - b) < 1e-9 for a, b in zip(rep.matches, full)]
            agree = f"{sum(same[0::2]) / len(same[0::2]):.3f}"
            agree_all = f"{sum(same) / n:.3f}"
            assert all(a.score <= b + 1e-12 for a, b in zip(rep.matches, full))  # a lower bound, always
            gap = f"{max(b - a.score for a, b in zip(rep.matches, full)):.3f}"
        print(f"| {n} x {n} | {t_index:.1f} | {t_fast:.1f} | {n / t_fast:.0f} | {rep.summary['rougeL_mean']:.3f} | "
              f"{rep.summary['near_exact_rate']:.3f} | {ex_s} | {agree} | {agree_all} | {gap} |")


if __name__ == "__main__":
    main()
