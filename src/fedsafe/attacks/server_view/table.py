"""The table a user needs: what the server learns (per view) next to utility and cost, per run.

    python -m fedsafe.attacks.server_view.table GRID/runs/*/ --out GRID

One row per (run, view): the mean over attacked rounds of the membership AUCs, and over rounds >= 2 of the
reconstruction scores (PEFT's B = 0 makes round 1's A update zero, so round 1 never reveals tokens); the
helpfulness proxy (perplexity of held-out reference answers, exp of the held-out loss after training: lower is
better); cost: mean seconds per round and bytes each client sends per round (ciphertext bytes under secure
aggregation, 4 bytes per float otherwise). ``sees``: whether the server actually sees this view in that run
(individual updates are not visible under secure aggregation; ``dp_individual`` is a counterfactual).
"""

from __future__ import annotations

import math
from pathlib import Path

COLUMNS = ("run", "defense", "view", "sees", "rounds", "mia_auc", "mia_auc_ref", "rec_token_precision",
           "rec_token_recall", "rec_rougeL_mean", "rec_exact_rate", "rec_recovered_rate", "rec_method",
           "heldout_loss", "helpfulness_proxy", "round_seconds", "client_bytes", "eps_client", "eps_example")


def _mean(xs):
    xs = [x for x in xs if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def server_view_rows(run_dirs) -> list[dict]:
    """Rows of the server-view table from run (or grid) directories."""
    import yaml

    from fedsafe.evaluation.leakage import defense_label, expand_run_dirs
    from fedsafe.rundir import RunDir

    rows = []
    for rd in expand_run_dirs(run_dirs):
        cfg = yaml.safe_load((rd / "config.yaml").read_text()) or {}
        recs = RunDir(rd).records()
        sv = [r for r in recs if r.get("type") == "server_view"]
        if not sv:
            continue
        secure = bool((cfg.get("secure_agg") or {}).get("enabled"))
        label = defense_label(cfg)
        if secure:
            sa = cfg["secure_agg"]
            label = "+".join(p for p in (f"secure-agg(prune={sa.get('prune_start')}-{sa.get('prune_end')})",
                                         None if label == "none" else label) if p)
        heldout = [r for r in recs if r.get("type") == "heldout"]
        loss = heldout[-1].get("after") if heldout else None
        clients = [r for r in recs if r.get("type") == "client"]
        he_bytes = _mean([r.get("he_bytes") for r in clients])
        dp = [r for r in recs if r.get("type") == "dp"]
        local = [r.get("dp_epsilon") for r in clients if r.get("dp_epsilon") is not None]
        common = {"run": rd.name, "defense": label, "heldout_loss": loss,
                  "helpfulness_proxy": math.exp(loss) if loss is not None else None,
                  "round_seconds": _mean([r.get("seconds") for r in recs if r.get("type") == "round"]),
                  "client_bytes": he_bytes if he_bytes is not None else _mean([r.get("update_bytes") for r in sv]),
                  "eps_client": dp[-1].get("epsilon") if dp else None, "eps_example": max(local) if local else None}
        for view in ("individual", "dp_individual", "aggregate"):
            vs = [r for r in sv if r.get("view") == view]
            if not vs:
                continue
            later = [r for r in vs if r.get("round", 0) >= 2]
            methods = sorted({r.get("rec_method") for r in later if r.get("rec_method")})
            rows.append({**common, "view": view, "sees": view == "aggregate" or (view == "individual" and not secure),
                         "rounds": ",".join(str(x) for x in sorted({r["round"] for r in vs})),
                         "mia_auc": _mean([r.get("mia_auc") for r in vs]),
                         "mia_auc_ref": _mean([r.get("mia_auc_ref") for r in vs]),
                         **{k: _mean([r.get(k) for r in later]) for k in
                            ("rec_token_precision", "rec_token_recall", "rec_rougeL_mean", "rec_exact_rate",
                             "rec_recovered_rate")},
                         "rec_method": "/".join(methods) or None})
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1000 else f"{v:.3f}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_server_view_table(run_dirs, out_dir) -> dict:
    """Write server_view_table.{csv,md} and plots/server_view_leakage_utility.png into ``out_dir``."""
    import csv
    import io

    from fedsafe.io import atomic_write_text

    out = Path(out_dir)
    rows = server_view_rows(run_dirs)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "server_view_table.csv", buf.getvalue())
    intro = (__doc__ or "").split("\n\n", 1)[1]
    md = "# What an honest-but-curious server learns from the updates it sees\n\n" + intro + "\n" + markdown(rows)
    atomic_write_text(out / "server_view_table.md", md)
    return {"rows": rows, "md": out / "server_view_table.md", "plot": _plot(rows, out / "plots" /
                                                                            "server_view_leakage_utility.png")}


def _plot(rows, path):
    pts = [r for r in rows if r["sees"] and r.get("helpfulness_proxy") is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "mia_auc", "membership AUC (what the server sees)"),
                           (axes[1], "rec_token_recall", "tokens recovered (recall)")):
        for r in pts:
            if r.get(key) is None:
                continue
            ax.scatter(r["helpfulness_proxy"], r[key], marker="s" if r["view"] == "aggregate" else "o")
            ax.annotate(r["defense"], (r["helpfulness_proxy"], r[key]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("helpfulness proxy (perplexity, lower is better)")
        ax.set_title(title, fontsize=9)
    from fedsafe.results import save_figure as _save  # atomic write, the one figure saver

    return _save(fig, path)


def main(argv=None) -> None:
    """CLI: python -m fedsafe.attacks.server_view.table RUN_OR_GRID_DIRS... --out DIR"""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    res = write_server_view_table(args.runs, args.out)
    print(markdown(res["rows"]))
    print(f"written: {res['md']}" + (f", {res['plot']}" if res["plot"] else ""))


if __name__ == "__main__":
    main()
