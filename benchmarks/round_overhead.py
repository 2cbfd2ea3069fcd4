"""Framework overhead of a federated round: time inside forward/backward/optimizer vs total round time.

For each round it prints the compute seconds (the clients' forward, backward and optimizer steps, summed),
the total wall time of the round (sampling, LoRA swaps, batching, validation, aggregation, logging, adapter
and checkpoint writes included) and the overhead share, plus the process's peak RSS. A second part runs
20 rounds of the tiny model and checks that memory stays flat (RSS growth between round 5 and round 20).

    python benchmarks/round_overhead.py                 # embedded model (3 rounds) + tiny model (20 rounds)
    python benchmarks/round_overhead.py --skip-embedded # tiny model only
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import psutil
from rich.console import Console
from rich.table import Table

import fedsafe.fl.loop as loop
import fedsafe.pipeline as pipeline
from fedsafe.config import load_config

console = Console()


def measure(overrides: list[str]) -> list[dict]:
    """Run one experiment and return per-round {compute_s, total_s, rss_mb} rows."""
    proc = psutil.Process()
    rows: list[dict] = []
    original = loop.run_rounds

    def timed_run_rounds(*args, on_round_end=None, **kwargs):
        last = [time.perf_counter()]

        def hook(round_no, record):
            now = time.perf_counter()
            rows.append({"round": round_no, "compute_s": record["compute_seconds"], "total_s": now - last[0],
                         "rss_mb": proc.memory_info().rss / 2**20})
            if on_round_end is not None:
                on_round_end(round_no, record)
            last[0] = time.perf_counter()  # the caller's printing is not part of the round

        return original(*args, on_round_end=hook, **kwargs)

    pipeline.run_rounds = timed_run_rounds
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(None, [f"output_dir={out}", "name=bench", "eval.helpfulness_proxy=false",
                                     *overrides])
            pipeline.run_experiment(cfg, progress=False)
    finally:
        pipeline.run_rounds = original
    return rows


def show(title: str, rows: list[dict]) -> tuple[float, float]:
    table = Table(title=title)
    for col in ("round", "compute s", "round s", "overhead s", "overhead %", "RSS MiB"):
        table.add_column(col, justify="right")
    for r in rows:
        over = r["total_s"] - r["compute_s"]
        table.add_row(str(r["round"]), f"{r['compute_s']:.3f}", f"{r['total_s']:.3f}", f"{over:.3f}",
                      f"{100 * over / r['total_s']:.1f}", f"{r['rss_mb']:.0f}")
    compute = sum(r["compute_s"] for r in rows)
    total = sum(r["total_s"] for r in rows)
    table.add_row("all", f"{compute:.3f}", f"{total:.3f}", f"{total - compute:.3f}",
                  f"{100 * (total - compute) / total:.1f}", f"{max(r['rss_mb'] for r in rows):.0f}")
    console.print(table)
    return compute, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-embedded", action="store_true")
    ap.add_argument("--embedded-rounds", type=int, default=3)
    ap.add_argument("--tiny-rounds", type=int, default=20)
    args = ap.parse_args()
    summary = {}
    if not args.skip_embedded:
        rows = measure(["model.name=embedded", f"fl.rounds={args.embedded_rounds}", "fl.clients_per_round=2",
                        "fl.local_steps=4", "fl.batch_size=4", "data.max_length=128",
                        "data.samples_per_client=40"])
        c, t = show("embedded SmolLM2-135M, LoRA r16 all-linear, 2 clients x 4 steps of 4x128 per round", rows)
        summary["embedded_overhead_pct"] = 100 * (t - c) / t
    rows = measure(["model.name=tiny", f"fl.rounds={args.tiny_rounds}", "fl.clients_per_round=2",
                    "fl.local_steps=4", "fl.batch_size=4", "data.max_length=128", "data.samples_per_client=40",
                    "fl.lr=1e-3"])
    c, t = show(f"tiny Llama, {args.tiny_rounds} rounds, 2 clients x 4 steps", rows)
    summary["tiny_overhead_pct"] = 100 * (t - c) / t
    if len(rows) >= 10:
        growth = rows[-1]["rss_mb"] - rows[4]["rss_mb"]
        summary["tiny_rss_growth_round5_to_last_mb"] = growth
        verdict = "flat" if growth < 20 else "GROWING"
        console.print(f"memory over {len(rows)} rounds: RSS round 5 {rows[4]['rss_mb']:.0f} MiB -> last "
                      f"{rows[-1]['rss_mb']:.0f} MiB ({growth:+.1f} MiB): {verdict}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
