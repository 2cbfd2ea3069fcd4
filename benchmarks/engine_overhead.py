"""Per-round wall time of the same experiment on in-process, Flower simulation and loopback deployments.

Every engine runs the same config (2 clients, both sampled every round). The round time is the ``seconds``
field of each round record (sampling -> all replies -> validation/aggregation -> adapter and checkpoint
writes); ``client compute`` is the clients' forward/backward/optimizer time summed over the round. The
loopback deployments start a SuperLink and one SuperNode per client as separate processes on 127.0.0.1, with
TLS and SuperNode authentication (``--insecure``: plain text). Flower 1.41 starts a fresh ClientApp process
for every message:

- ``deployment``: each SuperNode has a warm worker (:mod:`fedsafe.engines.flower.worker`) that keeps the model
  loaded; the per-message ClientApp process only forwards the message to it;
- ``deployment-noworker``: every ClientApp process imports torch and builds the model and data itself;
- ``deployment-flowerpoll``: as ``deployment`` but with Flower's own SuperNode waits (3 s after an empty pull,
  0.5 s for a reply) instead of fedsafe's 0.2 s cap (:mod:`fedsafe.engines.flower.supernode`).

In-process and simulation have no worker to switch: they train on the pipeline's own model, loaded once.
``--trace`` records timestamps (:mod:`fedsafe.engines.flower.trace`) and prints where a deployed train
message's time goes, averaged over the rounds after the first.

    python benchmarks/engine_overhead.py                    # tiny model, then the embedded model
    python benchmarks/engine_overhead.py --skip-embedded --trace
    python benchmarks/engine_overhead.py --rounds 4 --engines inprocess,deployment

On a CPU shared with other jobs, run it with ``OMP_WAIT_POLICY=PASSIVE``: with OpenMP's default spin-waiting,
torch in a process's main thread (the in-process engine, each deployed ClientApp) was ~30x slower than in a
worker thread (the simulation's ClientApp) on a 2-core machine at load 18, which measures the machine, not
the engine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedsafe.config import load_config
from fedsafe.rundir import RunDir

console = Console(width=150)  # the table is the output: never wrap it to a pipe's 80 columns


def experiment(model: str, rounds: int, out: str, max_length: int) -> list[str]:
    """``--set`` overrides shared by every engine."""
    return [f"output_dir={out}", "name=engine-bench", f"model.name={model}", "eval.helpfulness_proxy=false",
            "roles.0.clients=2", "data.samples_per_client=8", f"data.max_length={max_length}",
            f"fl.rounds={rounds}", "fl.clients_per_round=2", "fl.local_steps=2", "fl.batch_size=2",
            "fl.save_every_round=false", "flower.round_timeout_s=900", "flower.connect_timeout_s=300"]


def run_engine(engine: str, overrides: list[str], secure: bool = True) -> tuple[Path, float]:
    """Run one experiment on ``engine``; returns its run directory and the total wall time."""
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    if engine == "inprocess":
        from fedsafe.pipeline import run_experiment

        run_dir = run_experiment(cfg, progress=False).run_dir
    elif engine == "simulation":
        from fedsafe.engines.flower.simulation import run_flower_experiment

        run_dir = run_flower_experiment(cfg, progress=False).run_dir
    elif engine in ("deployment", "deployment-noworker", "deployment-flowerpoll"):
        from fedsafe.config import dump_config
        from fedsafe.engines.flower.deploy import SUPERNODE_POLL_S, LocalFederation, write_app

        warm = engine != "deployment-noworker"
        poll_s = 0.0 if engine == "deployment-flowerpoll" else SUPERNODE_POLL_S
        workdir = Path(tempfile.mkdtemp(prefix="fedsafe-bench-"))
        preload = None
        if warm:  # as `fedsafe flower local`: the workers load the base model while everything starts
            preload = workdir / "experiment.yaml"
            preload.write_text(dump_config(cfg))
        with LocalFederation(cfg.num_clients, workdir=workdir, secure=secure, warm_worker=warm,
                             worker_config=preload, poll_s=poll_s) as fed:
            app = write_app(fed.workdir / "app", cfg)
            run_dir = fed.submit(app, timeout_s=3600)
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    return Path(run_dir), time.perf_counter() - t0


def summarize(model: str, engine: str, run_dir: Path, total_s: float) -> dict:
    rounds = RunDir.open(run_dir).records("round")
    secs = [r["seconds"] for r in rounds]
    compute = [r["compute_seconds"] for r in rounds]
    later = secs[1:] or secs
    return {"model": model, "engine": engine, "rounds": len(rounds), "first_s": secs[0],
            "later_s": statistics.mean(later), "compute_s": statistics.mean(compute[1:] or compute),
            "total_s": total_s, "failed": sum(len(r.get("failed", [])) for r in rounds)}


def print_breakdown(model: str, engine: str, trace_path: Path) -> None:
    """Mean seconds per phase of a deployed train message (rounds after the first) from a trace file."""
    from fedsafe.engines.flower.trace import breakdown, read

    if not trace_path.exists():
        return
    rows = [r for r in breakdown(read(trace_path)) if (r["round"] or 0) > 1] or breakdown(read(trace_path))
    if not rows:
        return
    labels = [k for k in rows[0] if k not in ("mid", "round", "total")]
    for r in rows[1:]:
        labels += [k for k in r if k not in ("mid", "round", "total") and k not in labels]
    table = Table(title=f"{model} / {engine}: one train message, mean of {len(rows)} (rounds >= 2)")
    table.add_column("phase")
    table.add_column("mean (s)", justify="right")
    table.add_column("min-max (s)", justify="right")
    for label in labels + ["total"]:
        vals = [r.get(label) or 0.0 for r in rows]
        table.add_row(label, f"{statistics.mean(vals):.2f}", f"{min(vals):.2f}-{max(vals):.2f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", default="inprocess,simulation,deployment,deployment-noworker")
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument("--only-embedded", action="store_true")
    parser.add_argument("--insecure", action="store_true", help="deployments without TLS and node auth")
    parser.add_argument("--trace", action="store_true", help="print the per-phase breakdown of deployed rounds")
    args = parser.parse_args()
    engines = args.engines.split(",")
    models = ([] if args.only_embedded else [("tiny", 256)]) + ([] if args.skip_embedded else [("embedded", 128)])
    rows = []
    for model, max_length in models:
        for engine in engines:
            with tempfile.TemporaryDirectory() as out:
                console.print(f"[bold]{model} / {engine}[/] ...")
                trace_path = Path(out) / "trace.jsonl"
                if args.trace:
                    os.environ["FEDSAFE_FLOWER_TRACE"] = str(trace_path)
                try:
                    run_dir, total = run_engine(engine, experiment(model, args.rounds, out, max_length),
                                                secure=not args.insecure)
                finally:
                    os.environ.pop("FEDSAFE_FLOWER_TRACE", None)
                rows.append(summarize(model, engine, run_dir, total))
                console.print(rows[-1])
                if args.trace and engine.startswith("deployment"):
                    print_breakdown(model, engine, trace_path)
    table = Table(title=f"per-round wall time, 2 clients x 2 local steps, {args.rounds} rounds")
    for col in ("model", "engine", "round 1 (s)", "later rounds, mean (s)", "client compute / round (s)",
                "overhead / round (s)", "whole run (s)", "failed"):
        table.add_column(col, justify="left" if col in ("model", "engine") else "right")
    for r in rows:
        table.add_row(r["model"], r["engine"], f"{r['first_s']:.2f}", f"{r['later_s']:.2f}", f"{r['compute_s']:.2f}",
                      f"{r['later_s'] - r['compute_s']:.2f}", f"{r['total_s']:.1f}", str(r["failed"]))
    console.print(table)


if __name__ == "__main__":
    main()
