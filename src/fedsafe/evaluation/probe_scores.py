"""The shadow probe's view per round: score distributions of benign and malicious clients with the decision
threshold drawn in, flag rates and the benign false-positive rate (issue 19).

Reads the round records' ``aggregator_info.probe`` (written by :class:`fedsafe.aggregators.probe.ProbeAggregator`):
each client's logit, the acting rule's flags and threshold, the other rules' flags (``decisions``) and the
simulator's true roles (``malicious``, used here for the analysis only; no decision reads it).

    python -m fedsafe.evaluation.probe_scores RUN_DIR
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def probe_infos(records: list[dict]) -> list[dict]:
    """The probe's info of every round record that has one, in round order."""
    out = []
    for r in records:
        if r.get("type") not in (None, "round"):
            continue
        info = (r.get("aggregator_info") or {}).get("probe")
        if isinstance(info, dict):
            out.append({**info, "round": info.get("round", r.get("round"))})
    return sorted(out, key=lambda i: (i.get("round") is None, i.get("round") or 0))


def _logits(info: dict) -> dict[str, float]:
    if info.get("logit"):
        return dict(info["logit"])
    p = info.get("probability") or {}  # records written before issue 19 carry probabilities only
    return {c: math.log(max(v, 1e-12) / max(1 - v, 1e-12)) for c, v in p.items()}


def flag_rates(records: list[dict]) -> dict[str, dict]:
    """Per rule (the acting one and every logged alternative): true-positive rate on malicious client-rounds,
    false-positive rate on benign ones, and the counts; needs the simulator's roles in the records."""
    counts: dict[str, list[int]] = {}  # rule -> [flagged malicious, malicious, flagged benign, benign]
    for info in probe_infos(records):
        truth = info.get("malicious") or {}
        if not truth:
            continue
        rules = {f"{info.get('decision', 'fixed')} (acting)": info.get("flagged") or []}
        rules.update({name: flagged for name, flagged in (info.get("decisions") or {}).items()})
        for name, flagged in rules.items():
            c = counts.setdefault(name, [0, 0, 0, 0])
            for cid, is_mal in truth.items():
                hit = cid in flagged
                if is_mal:
                    c[0] += hit
                    c[1] += 1
                else:
                    c[2] += hit
                    c[3] += 1
    return {name: {"tpr": c[0] / c[1] if c[1] else None, "fpr": c[2] / c[3] if c[3] else None,
                   "malicious": c[1], "benign": c[3]} for name, c in counts.items()}


def plot_probe_scores(records: list[dict], path: Path) -> Path | None:
    """Per round: each client's probe logit (benign o, malicious x, flagged filled red) and the acting
    rule's threshold as a bar; the title gives the flag rates. None when the run has no probe."""
    infos = probe_infos(records)
    if not infos:
        return None
    from fedsafe.results import pyplot as _pyplot
    from fedsafe.results import save_figure as _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(infos) + 2.5), 3.6))
    for k, info in enumerate(infos):
        truth = info.get("malicious") or {}
        flagged = set(info.get("flagged") or [])
        logits = _logits(info)
        ids = sorted(logits)
        for j, cid in enumerate(ids):
            x = k + (j - (len(ids) - 1) / 2) * (0.5 / max(len(ids), 1))
            mal = truth.get(cid)
            marker = "x" if mal else "o"
            color = "tab:red" if cid in flagged else ("0.35" if mal is None else "tab:blue")
            ax.scatter([x], [logits[cid]], marker=marker, s=36, color=color,
                       facecolors=color if marker == "x" else ("tab:red" if cid in flagged else "none"),
                       linewidths=1.4, zorder=3)
        thr = info.get("threshold_logit")
        if thr is None and info.get("decision", "fixed") == "fixed" and info.get("threshold"):
            t = float(info["threshold"])
            thr = math.log(t / (1 - t)) if 0 < t < 1 else None
        if thr is not None:
            ax.plot([k - 0.35, k + 0.35], [thr, thr], color="k", linewidth=1.6, zorder=2)
    ax.set_xticks(range(len(infos)), [str(i.get("round")) for i in infos])
    ax.set_xlabel("round")
    ax.set_ylabel("probe logit  (p = sigmoid)")
    rates = flag_rates(records)
    acting = next((v for k, v in rates.items() if k.endswith("(acting)")), None)
    rule = infos[-1].get("decision", "fixed")
    title = f"Probe scores (o benign, x malicious, red: flagged; bar: {rule} threshold)"
    if acting and acting["tpr"] is not None and acting["fpr"] is not None:
        title += f"\nflagged: malicious {acting['tpr']:.0%}, benign (FPR) {acting['fpr']:.0%}"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Print per-round scores, thresholds and flag rates of a run, and draw ``plots/probe_scores.png``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fedsafe.evaluation.probe_scores RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        print(f"error: {run_dir} has no metrics.jsonl", file=sys.stderr)
        return 2
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    for info in probe_infos(records):
        truth = info.get("malicious") or {}
        logits = _logits(info)
        ben = sorted(v for c, v in logits.items() if truth.get(c) is False)
        mal = sorted(v for c, v in logits.items() if truth.get(c))
        thr = info.get("threshold_logit")
        print(f"round {info['round']}: {info.get('decision', 'fixed')} threshold "
              f"{'-' if thr is None else format(thr, '.3f')}; benign {[round(v, 3) for v in ben]}; "
              f"malicious {[round(v, 3) for v in mal]}; flagged {info.get('flagged')}")
    for name, r in flag_rates(records).items():
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{name}: malicious flagged {fmt(r['tpr'])} of {r['malicious']}, benign flagged (FPR) "
              f"{fmt(r['fpr'])} of {r['benign']}")
    p = plot_probe_scores(records, run_dir / "plots" / "probe_scores.png")
    if p is not None:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
