"""Seeds of one grid run in several grid directories: one table of means with 95% intervals, and paired differences.

    .venv/bin/python benchmarks/merge_grids.py GRID_DIR [GRID_DIR ...] [--reference no_attack/no_attack]
        [--pair "fedavg/attack:probe_gap/attack" ...]

A long grid is often run in pieces (``--seeds 1,2 --only ...`` one day, other settings the next). Each piece
writes its own ``results.csv`` and ``outcomes.jsonl``; this script reads them all and summarises them as
``fedsafe grid`` would have in one directory (``fedsafe.report.summarize``: a Student-t interval on the per-seed
means from two seeds on; one seed: "one seed: prompts only", see :mod:`fedsafe.stats`). Rows are keyed by
``<matrix cell>/<scenario>``, where the cell is the setting name without its last matrix axis
(``probe_gap-posthoc`` and ``probe_gap-none`` share training, so their ``attack`` rows are the same run) and the
scenario is ``attack``, ``attack_posthoc``, ``no_attack`` ... Paired differences (``b - a``: per seed the mean
over shared prompts, then a t-interval over seeds, ``fedsafe.stats.paired_difference``), each with its
interval's method and whether it excludes 0, are printed against ``--reference`` and for each ``--pair a:b``.

Defense variants from ``benchmarks/posthoc_sweep.py`` (other post-hoc settings applied to a grid's trained
adapters) join with ``--sweep SWEEP_CSV=CELL``: each variant V becomes the row ``<CELL>/attack_posthoc+V``.
``--posthoc-label GRID_DIR=V`` names a grid directory's own post-hoc rows the same way (for pieces run with a
post-hoc override such as ``--set posthoc.validation_rows=32``), so they merge with the sweep's variant V.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedsafe.report import summarize  # noqa: E402
from fedsafe.stats import paired_difference, paired_seed_difference  # noqa: E402

AXIS_SUFFIXES = ("-none", "-posthoc")  # the defense axis of configs/probe_grid.yaml and configs/adaptive*.yaml


def cell(setting: str) -> str:
    for suffix in AXIS_SUFFIXES:
        if setting.endswith(suffix):
            return setting[: -len(suffix)]
    return setting


def _label(rec: dict, label: str | None) -> dict:
    """Rows are keyed by cell and scenario only (method and defense follow from them); a labelled post-hoc row
    becomes ``attack_posthoc+<label>``."""
    rec["method"] = rec["defense"] = ""
    if label and rec.get("scenario") == "attack_posthoc":
        rec["scenario"] = f"attack_posthoc+{label}"
    return rec


def read(dirs: list[Path], labels: dict[Path, str] | None = None) -> tuple[list[dict], list[dict]]:
    rows, outcomes = [], []
    labels = {Path(k).resolve(): v for k, v in (labels or {}).items()}
    for d in dirs:
        label = labels.get(Path(d).resolve())
        for r in csv.DictReader(open(d / "results.csv", newline="")):
            row = {k: (float(v) if v not in ("", None) and k not in ("setting", "scenario", "method", "defense", "defends")
                       else (v or None)) for k, v in r.items()}
            row["seed"], row["setting"] = int(row["seed"]), cell(r["setting"])
            rows.append(_label(row, label))
        for line in open(d / "outcomes.jsonl"):
            rec = json.loads(line)
            rec["setting"] = cell(rec["setting"])
            outcomes.append(_label(rec, label))
    return rows, outcomes


def read_sweep(path: Path, cell_name: str) -> tuple[list[dict], list[dict]]:
    """A posthoc_sweep run (its CSV and ``<stem>.outcomes.jsonl``): each defended variant V as the rows of
    ``<cell_name>/attack_posthoc+V`` (Rule, over-refusal and borderline refusal per prompt, the proxy per seed)."""
    rows, outcomes = [], []
    for r in csv.DictReader(open(path, newline="")):
        help_ = r.get("help_posthoc")
        rows.append({"setting": cell_name, "scenario": f"attack_posthoc+{r['variant']}", "method": "",
                     "defense": "", "seed": int(r["seed"]), "rule": float(r["rule_posthoc"]),
                     "over_refusal": float(r["or_posthoc"]),
                     "borderline_refusal": float(r["xs_posthoc"]) if r.get("xs_posthoc") not in ("", None) else None,
                     "helpfulness_proxy": float(help_) if help_ not in ("", None) else None})
    for line in open(path.with_name(path.stem + ".outcomes.jsonl")):
        rec = json.loads(line)
        if rec.get("role") != "posthoc":
            continue
        out = {"setting": cell_name, "scenario": f"attack_posthoc+{rec['variant']}", "method": "",
               "defense": "", "seed": rec["seed"], "prompt_ids": list(range(len(rec["rule"]))),
               "rule": rec["rule"], "over_refusal": rec["over_refusal"],
               "over_refusal_prompt_ids": list(range(len(rec["over_refusal"])))}
        if rec.get("xstest_refusal"):  # the sweep's name for the config's borderline prompts
            out["borderline_refusal"] = rec["xstest_refusal"]
            out["borderline_refusal_prompt_ids"] = list(range(len(rec["xstest_refusal"])))
        outcomes.append(out)
    return rows, outcomes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid_dirs", nargs="+", type=Path)
    ap.add_argument("--reference", default="no_attack/no_attack", help="<cell>/<scenario> to compare every row with")
    ap.add_argument("--pair", action="append", default=[], help="a:b, each <cell>/<scenario>: print b - a")
    ap.add_argument("--sweep", action="append", default=[],
                    help="SWEEP_CSV=CELL: benchmarks/posthoc_sweep.py variants as <CELL>/attack_posthoc+<variant>")
    ap.add_argument("--posthoc-label", action="append", default=[],
                    help="GRID_DIR=V: that directory's attack_posthoc rows become attack_posthoc+V")
    ap.add_argument("--by-source", action="store_true",
                    help="also split over-refusal / borderline refusal by prompt source (a joined eval set)")
    args = ap.parse_args()
    labels = dict(item.rsplit("=", 1) for item in args.posthoc_label)
    rows, outcomes = read(args.grid_dirs, labels)
    for item in args.sweep:
        path, _, cell_name = item.rpartition("=")
        more = read_sweep(Path(path), cell_name)
        rows += more[0]
        outcomes += more[1]
    groups = summarize(rows, outcomes)
    by = {f"{g['setting']}/{g['scenario']}": g for g in groups}

    def est(e, digits=1):
        if e is None:
            return "-"
        return f"{e.mean:.{digits}f} [{e.lo:.{digits}f}, {e.hi:.{digits}f}]" if e.lo is not None else f"{e.mean:.{digits}f}"

    methods = sorted({e.method_label for g in groups for e in g["metrics"].values()})
    print(f"intervals: {'; '.join(methods)} (fedsafe.stats)")

    print("| row | seeds | Rule | refused harmful (detector) | over-refusal | borderline refusal | helpfulness proxy "
          "| Rule per seed | over-refusal per seed | borderline per seed |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def per_seed(g, metric):
        vals = [g["per_seed"][s].get(metric) for s in sorted(g["per_seed"])]
        return " / ".join("-" if v is None else f"{v:.1f}" for v in vals)

    for key, g in by.items():
        m = g["metrics"]
        print(f"| {key} | {' '.join(map(str, g['seeds']))} | {est(m.get('rule'))} | {est(m.get('refusal'))} | "
              f"{est(m.get('over_refusal'))} | {est(m.get('borderline_refusal'))} | "
              f"{est(m.get('helpfulness_proxy'), 3)} | {per_seed(g, 'rule')} | {per_seed(g, 'over_refusal')} | "
              f"{per_seed(g, 'borderline_refusal')} |")

    def paired(a_key: str, b_key: str) -> None:
        a, b = by.get(a_key), by.get(b_key)
        if a is None or b is None:
            print(f"{b_key} - {a_key}: missing ({', '.join(k for k in (a_key, b_key) if k not in by)})")
            return
        rule = paired_difference({s: v.get("rule") for s, v in a["per_prompt"].items()},
                                 {s: v.get("rule") for s, v in b["per_prompt"].items()})
        extra = []
        for metric, label in (("over_refusal", "over-refusal"), ("borderline_refusal", "borderline refusal")):
            if all(v.get(metric) for v in a["per_prompt"].values()) and all(
                    v.get(metric) for v in b["per_prompt"].values()):
                d = paired_difference({s: v.get(metric) for s, v in a["per_prompt"].items()},
                                      {s: v.get(metric) for s, v in b["per_prompt"].items()})
                iv = f" [{d.lo:+.1f}, {d.hi:+.1f}]" if d.lo is not None else ""
                extra.append(f"{label} {d.mean:+.1f}{iv}")
        proxy = paired_seed_difference({s: v.get("helpfulness_proxy") for s, v in a["per_seed"].items()},
                                       {s: v.get("helpfulness_proxy") for s, v in b["per_seed"].items()})
        interval = f" [{rule.lo:+.1f}, {rule.hi:+.1f}]" if rule.lo is not None else ""
        sig = {True: "significant", False: "not significant", None: "no interval"}[rule.significant]
        print(f"{b_key} - {a_key}: Rule {rule.mean:+.1f}{interval} ({rule.method_label}, {sig}; seeds "
              f"{sorted(set(a['seeds']) & set(b['seeds']))}); helpfulness proxy {proxy.mean:+.3f}"
              + "".join(f"; {e}" for e in extra))

    for key in by:
        if key != args.reference:
            paired(args.reference, key)
    for pair in args.pair:
        paired(*pair.split(":", 1))
    if args.by_source:
        by_source(args.grid_dirs, by, args.reference, [p.split(":", 1) for p in args.pair])


def source_of_ids(grid_dir: Path) -> dict[str, dict[int, str]]:
    """metric -> {prompt id: source name} for a grid whose eval joins several prompt sources (its first run's
    config decides: every run of a grid scores the same prompts)."""
    from fedsafe.config import load_config
    from fedsafe.evaluation.runner import REFUSAL_SETS, benign_sets, prompt_source_names

    run = next(iter(sorted(grid_dir.glob("runs/*/config.yaml"))), None)
    if run is None:
        return {}
    cfg = load_config(str(run))
    out = {}
    for metric, (field, ids, prompts) in benign_sets(cfg.eval, cfg.seed).items():
        source = getattr(cfg.eval, REFUSAL_SETS[metric][0])
        if isinstance(source, list):
            out[metric] = dict(zip(ids, prompt_source_names(prompts, source)))
    return out


def by_source(grid_dirs: list[Path], by: dict, reference: str, pairs: list[list[str]]) -> None:
    """Over-refusal and borderline refusal split by the source of each prompt (a joined everyday set can hide a
    distribution the model refuses), with the same intervals and paired differences as the main table."""
    from fedsafe.stats import paired_difference, summarize_per_prompt

    origin: dict[str, dict[int, str]] = {}
    for d in grid_dirs:
        for metric, ids in source_of_ids(d).items():
            if origin.setdefault(metric, ids) != ids:
                raise SystemExit(f"{d}: its {metric} prompts differ from the other grid directories'")
    if not origin:
        print("by source: no grid directory joins several prompt sources")
        return

    def part(g, metric, src):
        return {s: {i: v for i, v in (vals.get(metric) or {}).items() if origin[metric].get(int(i)) == src}
                for s, vals in g["per_prompt"].items()}

    for metric, ids in origin.items():
        sources = list(dict.fromkeys(ids.values()))
        print(f"\n{metric} by source ({', '.join(f'{s}: {list(ids.values()).count(s)} prompts' for s in sources)})")
        print("| row | " + " | ".join(sources) + " |")
        print("|---|" + "---|" * len(sources))
        for key, g in by.items():
            cells = []
            for src in sources:
                e = summarize_per_prompt(part(g, metric, src))
                iv = f" [{e.lo:.1f}, {e.hi:.1f}]" if e.lo is not None else ""
                seeds = " / ".join(f"{sum(v.values()) / len(v):.1f}" for _, v in sorted(part(g, metric, src).items())
                                   if v)
                cells.append(f"{e.mean:.1f}{iv} ({seeds})")
            print(f"| {key} | " + " | ".join(cells) + " |")
        for a_key, b_key in [(reference, k) for k in by if k != reference] + [tuple(p) for p in pairs]:
            a, b = by.get(a_key), by.get(b_key)
            if a is None or b is None:
                continue
            diffs = []
            for src in sources:
                d = paired_difference(part(a, metric, src), part(b, metric, src))
                iv = f" [{d.lo:+.1f}, {d.hi:+.1f}]" if d.lo is not None else ""
                diffs.append(f"{src} {d.mean:+.1f}{iv}")
            print(f"{b_key} - {a_key}, {metric}: " + "; ".join(diffs))


if __name__ == "__main__":
    main()
