"""Compare aggregation rules and defenses from finished runs: Rule, helpfulness proxy, probe AUC, cost.

    .venv/bin/python benchmarks/probe_compare.py GRID_DIR_OR_RUN_DIR [...]

Reads each run directory's ``results.csv`` (written by the evaluation) and ``metrics.jsonl`` (round
records) and prints one row per (method, defense): Rule (% of AdvBench-style prompts refused, higher is
safer), the helpfulness proxy (held-out answer perplexity, lower is better), the probe's ROC-AUC against
the simulator's true roles (cumulative over all scored client-rounds, and the mean of the per-round AUCs,
which ignores calibration drift between rounds; '-' for rules without a probe),
the share of malicious / benign client-rounds the probe flagged, the mean weight s_k the probe gave
malicious / benign client-rounds (1 = untouched; soft modes are labelled ``probe (mode)``), and the mean
wall time per round
(shadow training included). This is the table of ``configs/probe_grid.yaml``.

Probe runs are labelled by their decision rule (``probe (gap)``; the paper's fixed threshold is plain
``probe``). A second table gives, per probe run, the flag rates of *every* decision rule on that run's scores
(the round records log what each other rule would have flagged): when all rules flag the same clients in
every round, their runs are identical (training is deterministic under the seed), so one run stands for all.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def run_dirs(paths: list[str]) -> list[Path]:
    """Run directories under the given grid or run directories (those with a metrics.jsonl)."""
    out = []
    for p in map(Path, paths):
        out.extend(sorted(m.parent for m in p.rglob("metrics.jsonl")))
    return out


def summarise(run_dir: Path) -> list[dict]:
    """One row per evaluated (method, defense) of a run, with the run's probe and timing figures."""
    import csv

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = [r for r in records if r.get("type") == "round"]
    probe = [r["aggregator_info"]["probe"] for r in rounds if (r.get("aggregator_info") or {}).get("probe")]
    auc = probe[-1].get("auc_cumulative") if probe else None
    flagged = {True: [0, 0], False: [0, 0]}  # truth -> [flagged, scored]
    weight = {True: [], False: []}  # truth -> the probe's weight s_k per client-round
    for info in probe:
        for cid, is_mal in (info.get("malicious") or {}).items():
            flagged[is_mal][1] += 1
            flagged[is_mal][0] += cid in info.get("flagged", [])
            if cid in (info.get("weight") or {}):
                weight[is_mal].append(info["weight"][cid])
    sec = [r["seconds"] for r in rounds if r.get("seconds") is not None]
    per_round = [i["auc"] for i in probe if i.get("auc") is not None]
    base = {"probe_auc": auc, "round_auc": sum(per_round) / len(per_round) if per_round else None,
            "s_per_round": sum(sec) / len(sec) if sec else None,
            "flag_mal": flagged[True][0] / flagged[True][1] if flagged[True][1] else None,
            "flag_ben": flagged[False][0] / flagged[False][1] if flagged[False][1] else None,
            "w_mal": sum(weight[True]) / len(weight[True]) if weight[True] else None,
            "w_ben": sum(weight[False]) / len(weight[False]) if weight[False] else None}
    mode = probe[-1].get("mode") if probe else None
    decision = probe[-1].get("decision", "fixed") if probe else None
    results = run_dir / "results.csv"
    if not results.exists():
        return []
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        if row.get("method") == "base":
            continue
        method = row["method"]
        if decision and decision != "fixed":
            method = f"{method} ({decision})"
        if mode and mode != "exclude":  # the same rule name under another weighting mode is another method
            method = f"{method} ({mode})"
        if row.get("scenario") == "no_attack":  # the reference run: same rule name, no attackers
            method = f"{method} (no attack)"
        out.append({"method": method, "defense": row["defense"], "rule": _float(row.get("rule")),
                    "over_refusal": _float(row.get("over_refusal")),
                    "helpfulness_proxy": _float(row.get("helpfulness_proxy")), **base,
                    "run": run_dir.name})
    return out


def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def main(argv: list[str]) -> None:
    if not argv:
        print(__doc__)
        raise SystemExit(2)
    rows = [r for d in run_dirs(argv) for r in summarise(d)]
    seen, unique = set(), []
    for r in rows:  # a defended run repeats its attack row; keep the first
        key = (r["method"], r["defense"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    table = Table(title="probe comparison (Rule: higher is safer; over-refusal: lower is better; proxy: "
                        "perplexity, lower is better)")
    for col in ("method", "defense", "Rule", "over-refusal", "helpfulness proxy", "probe AUC", "AUC / round",
                "flagged mal.", "flagged ben.", "weight mal.", "weight ben.", "s / round"):
        table.add_column(col, justify="left" if col in ("method", "defense") else "right")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in unique:
        table.add_row(r["method"], r["defense"], fmt(r["rule"], ".1f"), fmt(r["over_refusal"], ".1f"),
                      fmt(r["helpfulness_proxy"], ".2f"),
                      fmt(r["probe_auc"], ".3f"), fmt(r["round_auc"], ".3f"), fmt(r["flag_mal"], ".2f"), fmt(r["flag_ben"], ".2f"),
                      fmt(r["w_mal"], ".2f"), fmt(r["w_ben"], ".2f"), fmt(r["s_per_round"], ".1f"))
    Console(width=180).print(table)
    rules_table(run_dirs(argv))


def rules_table(dirs: list[Path]) -> None:
    """Per probe run: the flag rates of every decision rule on that run's scores (acting rule first)."""
    from fedsafe.evaluation.probe_scores import flag_rates

    table = Table(title="decision rules on each probe run's scores (flagged malicious = TPR / flagged benign = FPR)")
    for col in ("run", "rule", "flagged mal.", "flagged ben.", "client-rounds mal. / ben."):
        table.add_column(col, justify="left" if col in ("run", "rule") else "right")
    shown = 0
    for d in dirs:
        records = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
        for name, r in flag_rates(records).items():
            table.add_row(d.name, name, "-" if r["tpr"] is None else f"{r['tpr']:.2f}",
                          "-" if r["fpr"] is None else f"{r['fpr']:.2f}", f"{r['malicious']} / {r['benign']}")
            shown += 1
    if shown:
        Console(width=180).print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
