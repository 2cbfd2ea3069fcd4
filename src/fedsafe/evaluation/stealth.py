"""Stealth analysis (Ye et al., "Emerging Safety Attack and Defense in Federated Instruction Tuning of
LLMs", Figure 2): how alike malicious and benign updates look to the server, and how much aggregation
weight each rule gives to malicious clients.

Every round record in ``metrics.jsonl`` (written by :func:`fedsafe.fl.loop.run_rounds`) carries the
pairwise cosine matrix of the updates, the clients' true roles and malicious flags (known to the simulator,
never to the aggregator), the weights the aggregator gave, and under ``compare_weights`` the weights that
each rule listed in ``aggregator.compare`` would have given to the same updates.

:func:`plot_stealth` draws three PNG files under ``RUN_DIR/plots/``:

- ``stealth_similarity.png``: the cosine-similarity heatmap of the last round, clients ordered by role;
- ``stealth_weights.png``: each client's aggregation weight per rule (mean over the rounds it was sampled);
- ``stealth_malicious_weight.png``: per round, the fraction of aggregation weight that went to malicious
  clients, one line per rule, with the malicious share of the sampled clients for reference.

Command line until the report issue mounts it: ``python -m fedsafe.evaluation.stealth RUN_DIR``.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path

import torch



def rule_weights(record: dict) -> dict[str, list[float]]:
    """The client weights of one round record per rule: the aggregator's own, then each compare rule's."""
    out = {str(record.get("aggregator", "aggregator")): list(record.get("client_weights") or [])}
    for label, weights in (record.get("compare_weights") or {}).items():
        if weights is not None:
            out[label if label not in out else f"{label} (compare)"] = list(weights)
    return out


def malicious_weight_fraction(weights: list[float], malicious: list) -> float:
    """Share of the total aggregation weight that went to malicious clients (NaN if all weights are 0)."""
    total = sum(weights)
    if total <= 0:
        return float("nan")
    return sum(w for w, m in zip(weights, malicious) if m) / total


def _mean_block(cos: list[list[float]], rows: list[int], cols: list[int]) -> float | None:
    vals = [cos[i][j] for i in rows for j in cols if i != j]
    return sum(vals) / len(vals) if vals else None


def round_stealth(record: dict) -> dict:
    """One round's stealth figures: mean cosines within/between groups and the malicious weight per rule."""
    malicious = [bool(m) for m in (record.get("malicious") or [])]
    bad = [i for i, m in enumerate(malicious) if m]
    good = [i for i, m in enumerate(malicious) if not m]
    cos = record.get("cosine")
    out = {"round": record.get("round"), "n_clients": len(malicious), "n_malicious": len(bad),
           "malicious_share_of_clients": len(bad) / len(malicious) if malicious else float("nan")}
    if cos is not None:
        out["cos_benign_benign"] = _mean_block(cos, good, good)
        out["cos_malicious_malicious"] = _mean_block(cos, bad, bad)
        out["cos_benign_malicious"] = _mean_block(cos, good, bad)
    out["malicious_weight"] = {rule: malicious_weight_fraction(w, malicious)
                               for rule, w in rule_weights(record).items() if len(w) == len(malicious)}
    return out


def stealth_rounds(run_dir: str | Path) -> list[dict]:
    """:func:`round_stealth` for every round of a run directory."""
    return [round_stealth(r) for r in _round_records(run_dir)]


def _round_records(run_dir: str | Path) -> list[dict]:
    from fedsafe.rundir import RunDir

    return RunDir(Path(run_dir)).records("round")


def _role_order(record: dict) -> list[int]:
    """Client positions ordered benign first, then by role name, then by client id."""
    roles = record.get("roles") or [None] * len(record["clients"])
    malicious = record.get("malicious") or [False] * len(record["clients"])
    return sorted(range(len(record["clients"])),
                  key=lambda i: (bool(malicious[i]), str(roles[i]), str(record["clients"][i])))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write the figure atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        from fedsafe.io import default_file_mode

        os.chmod(tmp, default_file_mode())  # mkstemp made it 0600; every run-directory file has one mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _pyplot().close(fig)
    return path


def plot_similarity(record: dict, path: Path) -> Path | None:
    """Heatmap of one round's cosine-similarity matrix, clients ordered by role (benign, then malicious)."""
    if record.get("cosine") is None:
        return None
    plt = _pyplot()
    order = _role_order(record)
    cos = torch.tensor(record["cosine"])[order][:, order]
    roles = record.get("roles") or [None] * len(order)
    malicious = record.get("malicious") or [False] * len(order)
    labels = [f"{record['clients'][i]} ({roles[i]})" for i in order]
    size = max(4.0, 0.45 * len(order) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cos.numpy(), cmap="coolwarm", vmin=-1, vmax=1)
    ax.set_xticks(range(len(order)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(order)), labels, fontsize=7)
    for tick_list in (ax.get_xticklabels(), ax.get_yticklabels()):
        for tick, i in zip(tick_list, order):
            tick.set_color("tab:red" if malicious[i] else "black")
    n_good = sum(1 for i in order if not malicious[i])
    if 0 < n_good < len(order):
        ax.axhline(n_good - 0.5, color="k", lw=1)
        ax.axvline(n_good - 0.5, color="k", lw=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="cosine similarity")
    ax.set_title(f"Update similarity, round {record.get('round')} (red: malicious)")
    return _save(fig, path)


def plot_weights(records: list[dict], path: Path) -> Path | None:
    """Grouped bars: each client's aggregation weight per rule, averaged over the rounds it was sampled."""
    records = [r for r in records if r.get("client_weights")]
    if not records:
        return None
    sums: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    malicious_of: dict[str, bool] = {}
    role_of: dict[str, str] = {}
    for rec in records:
        mal = rec.get("malicious") or [False] * len(rec["clients"])
        roles = rec.get("roles") or [None] * len(rec["clients"])
        for rule, weights in rule_weights(rec).items():
            if len(weights) != len(rec["clients"]):
                continue
            for cid, w, m, role in zip(rec["clients"], weights, mal, roles):
                sums.setdefault(rule, {}).setdefault(cid, 0.0)
                sums[rule][cid] += w
                counts.setdefault(rule, {}).setdefault(cid, 0)
                counts[rule][cid] += 1
                malicious_of[cid], role_of[cid] = bool(m), str(role)
    clients = sorted(malicious_of, key=lambda c: (malicious_of[c], role_of[c], c))
    rules = list(sums)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(clients) * max(1, len(rules)) / 2 + 3), 3.8))
    width = 0.8 / len(rules)
    for k, rule in enumerate(rules):
        vals = [sums[rule].get(c, 0.0) / counts[rule][c] if counts[rule].get(c) else 0.0 for c in clients]
        ax.bar([i + (k - (len(rules) - 1) / 2) * width for i in range(len(clients))], vals, width, label=rule)
    ax.set_xticks(range(len(clients)), [f"{c}\n({role_of[c]})" for c in clients], fontsize=7)
    for tick, c in zip(ax.get_xticklabels(), clients):
        tick.set_color("tab:red" if malicious_of[c] else "black")
    ax.set_ylabel("aggregation weight (mean over rounds sampled)")
    ax.set_title(f"Client weights per rule over {len(records)} rounds (red: malicious)")
    ax.legend(fontsize=7, ncol=min(4, len(rules)))
    return _save(fig, path)


def plot_malicious_weight(records: list[dict], path: Path) -> Path | None:
    """Per round and rule, the fraction of aggregation weight that went to malicious clients."""
    stats = [round_stealth(r) for r in records]
    if not stats:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    rules = list(dict.fromkeys(rule for s in stats for rule in s["malicious_weight"]))
    for rule in rules:
        pts = [(s["round"], s["malicious_weight"][rule]) for s in stats
               if rule in s["malicious_weight"] and not math.isnan(s["malicious_weight"][rule])]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=rule)
    ax.plot([s["round"] for s in stats], [s["malicious_share_of_clients"] for s in stats], "k--", lw=1,
            label="malicious share of sampled clients")
    ax.set_xlabel("round")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("weight on malicious clients")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Aggregation weight given to malicious clients")
    ax.legend(fontsize=7)
    return _save(fig, path)


# the report's title for each plot file plot_stealth writes (by file stem)
PLOT_TITLES = {"stealth_similarity": "Stealth: how similar the clients' updates are (last round)",
               "stealth_weights": "Stealth: the weight each rule gives each client",
               "stealth_malicious_weight": "Stealth: aggregation weight given to malicious clients",
               "probe_scores": "Probe scores per client and round"}


def plot_stealth(run_dir: str | Path) -> list[Path]:
    """Draw the three stealth plots from ``RUN_DIR/metrics.jsonl`` into ``RUN_DIR/plots/``; return the paths."""
    run_dir = Path(run_dir)
    records = _round_records(run_dir)
    if not records:
        return []
    plots = run_dir / "plots"
    with_cos = [r for r in records if r.get("cosine") is not None]
    made = [plot_similarity(with_cos[-1], plots / "stealth_similarity.png") if with_cos else None,
            plot_weights(records, plots / "stealth_weights.png"),
            plot_malicious_weight(records, plots / "stealth_malicious_weight.png")]
    from fedsafe.evaluation.probe_scores import plot_probe_scores  # probe runs: scores, threshold, flag rates

    made.append(plot_probe_scores(records, plots / "probe_scores.png"))
    return [p for p in made if p is not None]


def main(argv: list[str] | None = None) -> int:
    """``python -m fedsafe.evaluation.stealth RUN_DIR``: draw the plots and print per-round figures."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fedsafe.evaluation.stealth RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    if not (run_dir / "metrics.jsonl").exists():
        print(f"error: {run_dir} has no metrics.jsonl", file=sys.stderr)
        return 2
    for s in stealth_rounds(run_dir):
        mw = ", ".join(f"{k}={v:.3f}" for k, v in s["malicious_weight"].items())
        cos = s.get("cos_benign_malicious")
        print(f"round {s['round']}: {s['n_malicious']}/{s['n_clients']} malicious; weight on malicious: {mw}"
              + (f"; cos benign-malicious {cos:.3f}" if cos is not None else ""))
    for p in plot_stealth(run_dir):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
