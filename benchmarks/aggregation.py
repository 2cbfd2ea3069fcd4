"""Time and peak extra memory of every aggregation rule on stacked updates [n, d], with the ratio to FedAvg.

    python benchmarks/aggregation.py                       # n in {10, 50, 100}, d = 2^20 (shared-CPU default)
    python benchmarks/aggregation.py --d 16777216          # Llama-2-7B LoRA r=32 on q,v: 32*2*2*4096*32
    python benchmarks/aggregation.py --n 10 --rules median krum
    python benchmarks/aggregation.py --vs-partition        # issue 32: median / trimmed mean / norm_clip against
                                                           # np.partition and torch.kthvalue, n = 10, 30

f (assumed attackers) is max(1, n // 10) for every rule that takes it, so Bulyan's n >= 4f + 3 holds.
Times are the best of up to 3 calls after a warm-up call (1 call when it takes over 2 s).
Peak memory is the largest resident-set growth above the level before the call, sampled every 2 ms (it
includes numpy and torch buffers). The residual rule costs O(n^2 log n) per coordinate (the repeated
median); where the estimate exceeds ``--max-seconds`` it is timed on fewer coordinates and scaled linearly
in d (every step of it is per-coordinate), marked with ``*``. Timings on a shared machine are noisy; the
ratio column compares rules measured back to back on the same data. Times include the client weights (a run
always asks for them, for the stealth analysis).

``--vs-partition`` prints, for n = 10 and 30 (``--n``), each order-statistic rule's CPU time (process time, one
thread, best of ``--repeats``: steadier than wall time on a shared machine) for the aggregate alone and with
its client weights, beside a plain ``np.partition`` and ``torch.kthvalue`` computation of the same statistic
on the same array, and the ratio to the faster reference; and norm_clip's time and peak extra memory beside
FedAvg's (clipping without a copy of the update matrix). Run it with ``PYTHONPATH=<old checkout>/src`` for the
"before" column.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import threading
import time

# spinning OpenMP workers slow torch badly on a shared, oversubscribed CPU (see tests/conftest.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import psutil  # noqa: E402
import torch  # noqa: E402

from fedsafe import aggregators  # noqa: E402

RULES = {
    "fedavg": lambda n: {},
    "median": lambda n: {},
    "trimmed_mean": lambda n: {"beta": 0.1},
    "krum": lambda n: {"f": max(1, n // 10)},
    "multikrum": lambda n: {"f": max(1, n // 10)},
    "bulyan": lambda n: {"f": max(1, n // 10)},
    "dnc": lambda n: {"f": max(1, n // 10)},
    "foolsgold": lambda n: {},
    "residual": lambda n: {},
    "geometric_median": lambda n: {},
    "norm_clip": lambda n: {"max_norm": 1.0},
}


class PeakRSS:
    """Largest RSS growth (bytes) above the level at entry, sampled on a background thread."""

    def __init__(self, interval_s: float = 0.002):
        self.proc, self.interval_s, self.peak = psutil.Process(), interval_s, 0

    def __enter__(self):
        gc.collect()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra_bytes(self) -> int:
        return self.peak - self.base


def measure(name: str, params: dict, updates: torch.Tensor, repeats: int = 1) -> tuple[float, int, dict]:
    """(best seconds, peak extra bytes, info) over ``repeats`` calls, each on fresh rule state."""
    n = updates.shape[0]
    ids = [f"c{i}" for i in range(n)]
    samples = torch.ones(n)
    best, peak = float("inf"), 0
    for _ in range(repeats):
        agg = aggregators.get(name, **params)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            res = agg(updates, samples, ids)
            res.client_weights  # noqa: B018  (a run asks for them; a rule may compute them on first access)
            seconds = time.perf_counter() - t0
        best, peak = min(best, seconds), max(peak, mem.extra_bytes)
        if seconds > 2.0:  # slow rules: one timing is enough
            break
    assert res.update.shape == (updates.shape[1],) and torch.isfinite(res.update).all(), name
    return best, peak, res.info


def cpu_best(fn, repeats: int) -> float:
    """Best process (CPU) time of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def partition_references(x: torch.Tensor, lo: int, hi: int) -> dict[str, callable]:
    """Plain computations of the mean of the sorted places lo..hi of every column of ``x`` [n, d]."""
    import numpy as np

    xn = x.numpy()

    def np_partition():
        part = np.partition(xn, sorted({lo, hi}), axis=0)
        return part[lo:hi + 1].mean(axis=0)

    def kthvalue():
        if hi - lo > 1:
            return None  # the middle of a trimmed mean is not one order statistic: np.partition only
        low = torch.kthvalue(x, lo + 1, dim=0).values
        return low if hi == lo else (low + torch.kthvalue(x, hi + 1, dim=0).values) / 2

    return {"np.partition": np_partition, "torch.kthvalue": kthvalue}


def vs_partition(args) -> None:
    """Order-statistic rules against np.partition / torch.kthvalue, and norm_clip's copy (issue 32 item 4)."""
    from fedsafe.aggregators.requirements import trimmed_per_side

    torch.set_num_threads(1)
    print(f"vs partition: d={args.d:,}, CPU seconds (process time, 1 thread, best of {args.repeats})")
    print("| n | rule | aggregate (s) | + client weights (s) | np.partition (s) | torch.kthvalue (s) | "
          "x best reference (with weights) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for n in args.n:
        g = torch.Generator().manual_seed(args.seed + n)
        x = torch.randn(n, args.d, generator=g) * 1e-3
        ids, samples = [f"c{i}" for i in range(n)], torch.ones(n)
        k = trimmed_per_side(n, 0.1)
        for name, params, (lo, hi) in (("median", {}, ((n - 1) // 2, n // 2)),
                                       ("trimmed_mean", {"beta": 0.1}, (k, n - k - 1))):
            rule = aggregators.get(name, **params)
            alone = cpu_best(lambda: rule(x, samples, ids).update, args.repeats)  # noqa: B023
            full = cpu_best(lambda: rule(x, samples, ids).client_weights, args.repeats)  # noqa: B023
            refs = {label: (cpu_best(fn, args.repeats) if fn() is not None else None)
                    for label, fn in partition_references(x, lo, hi).items()}
            best = min(v for v in refs.values() if v is not None)
            cells = " | ".join("n/a" if v is None else f"{v:.3f}" for v in refs.values())
            print(f"| {n} | {name} | {alone:.3f} | {full:.3f} | {cells} | {full / best:.2f} |", flush=True)
        for name, params in (("fedavg", {}), ("norm_clip", {"max_norm": 1.0})):
            rule = aggregators.get(name, **params)
            secs = cpu_best(lambda: rule(x, samples, ids).client_weights, args.repeats)  # noqa: B023
            with PeakRSS() as mem:
                rule(x, samples, ids)
            print(f"| {n} | {name} | {secs:.3f} | peak extra memory {mem.extra_bytes / 2**20:.0f} MiB "
                  f"(the update matrix: {x.numel() * 4 / 2**20:.0f} MiB) | | | |", flush=True)
        del x
        gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10, 50, 100], help="clients per round")
    ap.add_argument("--d", type=int, default=1 << 20, help="update dimension (full LoRA size: 16777216)")
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--max-seconds", type=float, default=20.0,
                    help="time the residual rule on fewer coordinates when its estimate exceeds this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vs-partition", action="store_true", help="order-statistic rules against np.partition / "
                                                                "torch.kthvalue (default n: 10 30)")
    ap.add_argument("--repeats", type=int, default=5, help="--vs-partition: best of this many calls")
    args = ap.parse_args()
    if args.vs_partition:
        if args.n == [10, 50, 100]:
            args.n = [10, 30]
        vs_partition(args)
        return
    torch.set_num_threads(args.threads)
    print(f"aggregation benchmark: d={args.d:,}, n={args.n}, torch {torch.__version__}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM")
    rows = []
    for n in args.n:
        g = torch.Generator().manual_seed(args.seed + n)
        updates = torch.randn(n, args.d, generator=g) * 1e-3
        updates[0] *= 1e3  # one outlier, as a defence would see under attack
        fed_s = None
        for name in ["fedavg"] + [r for r in args.rules if r != "fedavg"]:
            params = RULES[name](n)
            d_used = args.d
            if name == "residual":
                # probe on 2^10 coordinates, then pick a size that fits the time budget
                probe_s, _, _ = measure(name, params, updates[:, : min(args.d, 1024)].contiguous())
                per_coord = probe_s / min(args.d, 1024)
                d_used = min(args.d, max(1024, int(args.max_seconds / max(per_coord, 1e-12))))
            x = updates if d_used == args.d else updates[:, :d_used].contiguous()
            measure(name, params, x[:, :4096].contiguous())  # warm-up: first-call and import costs
            seconds, extra, info = measure(name, params, x, repeats=3)
            seconds_full = seconds * args.d / d_used
            extra_full = extra * args.d / d_used
            if name == "fedavg":
                fed_s = seconds
                if name not in args.rules:
                    continue
            rows.append((n, name, params, seconds_full, extra_full, seconds_full / fed_s, d_used != args.d,
                         info.get("iterations")))
            print(f"  n={n:<4} {name:<17} {seconds_full:9.3f} s{'*' if d_used != args.d else ' '}", flush=True)
        del updates
        gc.collect()

    size_gib = lambda n: n * args.d * 4 / 2**30  # noqa: E731
    print()
    print(f"| n | rule | params | time (s) | peak extra memory (MiB) | x FedAvg time | input (GiB) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for n, name, params, secs, extra, ratio, scaled, iters in rows:
        p = ", ".join(f"{k}={v}" for k, v in params.items())
        if iters is not None:
            p = (p + ", " if p else "") + f"{iters} Weiszfeld iters"
        mark = "*" if scaled else ""
        print(f"| {n} | {name} | {p} | {secs:.3f}{mark} | {extra / 2**20:.0f}{mark} | {ratio:.1f}{mark} | "
              f"{size_gib(n):.2f} |")
    if any(r[6] for r in rows):
        print("\n* timed on fewer coordinates and scaled linearly to d (per-coordinate cost)")


if __name__ == "__main__":
    main()
