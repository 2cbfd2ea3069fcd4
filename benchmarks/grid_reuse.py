"""A grid without and with shared client updates (fedsafe.fl.update_cache), back to back with the same command.

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/grid_reuse.py configs/adaptive_small.yaml \\
        --only minmax-fedavg --only minmax-probe --only minmax-krum --only none-fedavg

Runs ``fedsafe grid GRID --no-progress [--only ...]`` twice, first with ``--no-reuse`` (every client training in
every run), then as the grid runs by default (trainings with the same inputs run once), and prints a table: wall
time of each and, from the second grid's reuse.json, the client trainings reused and computed per run and the
training seconds saved. Extra arguments after ``--`` go to both ``fedsafe grid`` commands (e.g. ``--set``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run_grid(grid: str, only: list[str], extra: list[str], reuse: bool) -> tuple[float, Path]:
    """Wall seconds of one ``fedsafe grid`` command and its grid directory (the last line it prints)."""
    exe = Path(sys.executable).with_name("fedsafe")
    cmd = [str(exe), "grid", grid, "--no-progress", *[a for p in only for a in ("--only", p)], *extra]
    if not reuse:
        cmd.append("--no-reuse")
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    seconds = time.perf_counter() - t0
    return seconds, Path(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid")
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("extra", nargs="*", help="arguments for both fedsafe grid commands (after --)")
    args = ap.parse_args()
    off_s, off_dir = run_grid(args.grid, args.only, args.extra, reuse=False)
    print(f"reuse off: {off_s:.0f} s, {off_dir}", flush=True)
    on_s, on_dir = run_grid(args.grid, args.only, args.extra, reuse=True)
    print(f"reuse on:  {on_s:.0f} s, {on_dir}", flush=True)
    reuse = json.loads((on_dir / "reuse.json").read_text())
    print()
    print(f"| grid ({len(args.only) or 'all'} settings) | wall s | client trainings reused | computed | "
          "not cacheable | training s saved |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| reuse off (--no-reuse) | {off_s:.0f} | - | - | - | - |")
    t = reuse["totals"]
    print(f"| reuse on (default) | {on_s:.0f} | {t['reused']} | {t['computed']} | {t['not_cached']} | "
          f"{t['seconds_saved']:.0f} |")
    print(f"| on / off | {on_s / off_s:.2f} | | | | |")
    print()
    print("| run (reuse on) | reused | computed | not cacheable | training s saved |")
    print("|---|---:|---:|---:|---:|")
    for name, r in reuse["runs"].items():
        print(f"| {name} | {r['reused']} | {r['computed']} | {r['not_cached']} | {r['seconds_saved']:.0f} |")


if __name__ == "__main__":
    main()
