"""Run an attack x defense grid (configs/adaptive*.yaml) and write its matrix (issue 18).

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/adaptive_matrix.py configs/adaptive_small.yaml [--only PAT]
    python benchmarks/adaptive_matrix.py --report GRID_DIR        (only the matrix of a finished grid)

Runs ``fedsafe grid`` and then :func:`fedsafe.evaluation.attack_matrix.write_attack_matrix`, and prints the
wall time.
"""

from __future__ import annotations

import argparse
import time

from fedsafe.evaluation.attack_matrix import write_attack_matrix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid", nargs="?")
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--resume")
    ap.add_argument("--report", help="write the matrix of this finished grid directory and exit")
    args = ap.parse_args()
    if args.report:
        for p in write_attack_matrix(args.report):
            print(p)
        return
    from fedsafe.grid import load_grid, print_results, run_grid, select_settings

    t0 = time.perf_counter()
    spec, settings = load_grid(args.grid)
    settings = select_settings(settings, args.only)
    grid_dir = run_grid(spec, settings, progress=False, resume=args.resume)
    print_results(grid_dir, f"{spec.name}: {len(settings)} settings")
    for p in write_attack_matrix(grid_dir):
        print(p)
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    print(grid_dir)


if __name__ == "__main__":
    main()
