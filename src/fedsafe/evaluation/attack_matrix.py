"""The attack x defense matrix of a grid (issue 18): heatmaps of Rule and the helpfulness proxy, the worst
attack per defense marked, and the stealth view per attack.

    python -m fedsafe.evaluation.attack_matrix GRID_DIR

reads the grid's ``grid.yaml`` (its ``attack`` and ``defense`` axes, else the first two axes), ``summary.csv``
(means and 95% intervals over seeds and prompts; else ``results.csv``) and the runs' ``metrics.jsonl``, and
writes ``attack_matrix.csv``, ``attack_matrix.md`` and ``plots/attack_matrix_{rule,helpfulness_proxy}.png``
(+ ``plots/stealth_by_attack.png``). A cell is the setting ``<attack>-<defense>``; for a defense whose label
contains ``posthoc`` the cell is the row after the post-hoc step. The worst attack of a defense is the one with
the lowest Rule (least refusal of harmful prompts) and, for the helpfulness proxy (a perplexity), the highest;
the attack ``none`` is the reference and never the worst.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import yaml

METRICS = {"rule": ("Rule (% refusals of harmful prompts; higher is safer)", min),
           "helpfulness_proxy": ("helpfulness proxy (perplexity; lower is better)", max)}
REFERENCE_ATTACKS = ("none",)


def _float(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _axes(grid_dir: Path) -> tuple[list[str], list[str]]:
    """Attack and defense labels: the two axes, then those of explicit settings named ``<attack>-<defense>``."""
    spec = yaml.safe_load((grid_dir / "grid.yaml").read_text()) or {}
    matrix = spec.get("matrix") or {}
    names = list(matrix)
    attack_axis = "attack" if "attack" in matrix else names[0]
    defense_axis = "defense" if "defense" in matrix else next(n for n in names if n != attack_axis)
    attacks, defenses = list(matrix[attack_axis]), list(matrix[defense_axis])
    for setting in spec.get("settings") or []:
        attack, _, defense = str(setting.get("name", "")).partition("-")
        if defense:
            attacks += [attack] if attack not in attacks else []
            defenses += [defense] if defense not in defenses else []
    return attacks, defenses


def read_matrix(grid_dir: str | Path) -> dict:
    """``{"attacks": [...], "defenses": [...], "cells": {(attack, defense): {metric: (mean, lo, hi, n_seeds)}}}``."""
    grid_dir = Path(grid_dir)
    attacks, defenses = _axes(grid_dir)
    summary = grid_dir / "summary.csv"
    rows = list(csv.DictReader((summary if summary.exists() else grid_dir / "results.csv").open()))
    cells: dict[tuple[str, str], dict] = {}
    for row in rows:
        setting = row.get("setting", "")
        match = [(a, d) for a in attacks for d in defenses if setting == f"{a}-{d}"]
        if not match or row.get("scenario") == "base":
            continue
        attack, defense = match[0]
        after_posthoc = row.get("defense", "none") != "none"
        if after_posthoc != ("posthoc" in defense):
            continue
        values = {}
        for m in METRICS:
            mean = _float(row.get(f"{m}_mean", row.get(m)))
            if mean is not None:
                values[m] = (mean, _float(row.get(f"{m}_ci_low")), _float(row.get(f"{m}_ci_high")),
                             int(_float(row.get("n_seeds")) or 1))
        cells[(attack, defense)] = values
    attacks = [a for a in attacks if any((a, d) in cells for d in defenses)]
    defenses = [d for d in defenses if any((a, d) in cells for a in attacks)]
    return {"attacks": attacks, "defenses": defenses, "cells": cells}


def worst_attacks(matrix: dict, metric: str) -> dict[str, str]:
    """Defense -> the attack with the worst value of ``metric`` (lowest Rule / highest perplexity; on a tie the
    first in the grid's order)."""
    pick = METRICS[metric][1]
    out = {}
    for d in matrix["defenses"]:
        vals = [(matrix["cells"][(a, d)][metric][0], a) for a in matrix["attacks"]
                if a not in REFERENCE_ATTACKS and metric in matrix["cells"].get((a, d), {})]
        if vals:
            worst = pick(v for v, _ in vals)
            out[d] = next(a for v, a in vals if v == worst)
    return out


def is_worst(matrix: dict, metric: str, attack: str, defense: str) -> bool:
    """Whether the cell ties with the worst attack of its defense (all tied attacks are marked)."""
    worst = worst_attacks(matrix, metric).get(defense)
    cell = matrix["cells"].get((attack, defense), {}).get(metric)
    return (worst is not None and cell is not None and attack not in REFERENCE_ATTACKS
            and cell[0] == matrix["cells"][(worst, defense)][metric][0])


def _fmt(cell) -> str:
    mean, lo, hi, n = cell
    if lo is not None and hi is not None:  # 95% interval (over seeds and prompts, fedsafe.stats)
        return f"{mean:.1f} [{lo:.1f}, {hi:.1f}]"
    return f"{mean:.1f}" if abs(mean) >= 10 else f"{mean:.2f}"


def markdown(matrix: dict) -> str:
    """One table per metric: attacks as rows, defenses as columns, the worst attack per defense in bold."""
    out = []
    for m, (title, _) in METRICS.items():
        worst = worst_attacks(matrix, m)
        if not worst and not any(m in c for c in matrix["cells"].values()):
            continue
        out += [f"### {title}", "", "| attack | " + " | ".join(matrix["defenses"]) + " |",
                "|---|" + "---|" * len(matrix["defenses"])]
        for a in matrix["attacks"]:
            cells = []
            for d in matrix["defenses"]:
                c = matrix["cells"].get((a, d), {}).get(m)
                text = "-" if c is None else _fmt(c)
                cells.append(f"**{text}**" if is_worst(matrix, m, a, d) else text)
            out.append(f"| {a} | " + " | ".join(cells) + " |")
        out += ["", "Bold: the worst attack of each defense, ties included (`none` is the reference); "
                    "brackets: 95% interval.", ""]
    return "\n".join(out)


def plot_heatmap(matrix: dict, metric: str, path: Path) -> Path | None:
    """A heatmap of ``metric`` with the value (and interval) in each cell and the worst attack boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attacks, defenses = matrix["attacks"], matrix["defenses"]
    grid = np.full((len(attacks), len(defenses)), np.nan)
    for i, a in enumerate(attacks):
        for j, d in enumerate(defenses):
            c = matrix["cells"].get((a, d), {}).get(metric)
            if c is not None:
                grid[i, j] = c[0]
    if np.isnan(grid).all():
        return None
    # at least 5 inches wide: the two-line title must fit over a matrix of one or two defenses
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 + 1.25 * len(defenses)), 1.0 + 0.55 * len(attacks)))
    cmap = "RdYlGn" if metric == "rule" else "RdYlGn_r"
    im = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=0 if metric == "rule" else None,
                   vmax=100 if metric == "rule" else None)
    ax.set_xticks(range(len(defenses)), defenses, rotation=35, ha="right")
    ax.set_yticks(range(len(attacks)), attacks)
    for i, a in enumerate(attacks):
        for j, d in enumerate(defenses):
            c = matrix["cells"].get((a, d), {}).get(metric)
            if c is not None:
                ax.text(j, i, _fmt(c).replace(" [", "\n["), ha="center", va="center", fontsize=7)
            if is_worst(matrix, metric, a, d):
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2.5, ec="black"))
    ax.set_title(METRICS[metric][0].replace(" (", "\n(", 1) + "\nboxed: the worst attack per defense", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def stealth_by_attack(grid_dir: Path, matrix: dict) -> dict[str, dict[str, list[float]]]:
    """Per attack, over all its runs: each client's mean cosine to the benign clients of its round
    (``benign`` / ``malicious``), its distance to the benign clients' mean update relative to the benign clients'
    mean such distance in that round (``benign_distance`` / ``malicious_distance``; 1: as far as a typical benign
    client) and the probe's probability for malicious clients (``probe``). The round records describe the updates
    the rule received (crafted ones, for either ``knowledge``)."""
    settings = {}
    path = grid_dir / "settings.csv"
    if path.exists():
        for row in csv.DictReader(path.open()):
            settings.setdefault(row["setting"], set()).add(row["run_dir"])
    out: dict[str, dict[str, list[float]]] = {}
    for a in matrix["attacks"]:
        acc = out.setdefault(a, {"benign": [], "malicious": [], "probe": [], "benign_distance": [],
                                 "malicious_distance": []})
        for d in matrix["defenses"]:
            for run in settings.get(f"{a}-{d}", ()):
                metrics = grid_dir / run / "metrics.jsonl"
                if not metrics.exists() or "posthoc" in d:
                    continue
                for line in metrics.read_text().splitlines():
                    rec = json.loads(line)
                    if rec.get("type") != "round" or not rec.get("cosine"):
                        continue
                    mal = rec["malicious"]
                    benign_idx = [k for k, m in enumerate(mal) if not m]
                    for i, m in enumerate(mal):
                        others = [rec["cosine"][i][k] for k in benign_idx if k != i]
                        if others:
                            acc["malicious" if m else "benign"].append(sum(others) / len(others))
                    dist = rec.get("benign_mean_distance")
                    ref = [dist[k] for k in benign_idx] if dist else []
                    if ref and sum(ref) > 0:
                        for i, m in enumerate(mal):
                            acc["malicious_distance" if m else "benign_distance"].append(
                                dist[i] * len(ref) / sum(ref))
                    probe = ((rec.get("aggregator_info") or {}).get("probe") or {}).get("probability") or {}
                    acc["probe"] += [p for cid, p in probe.items() if cid in
                                     {c for c, m in zip(rec["clients"], mal) if m}]
    return out


def plot_stealth(stealth: dict, path: Path) -> Path | None:
    """Box plots per attack: cosine to the benign clients and relative distance to their mean update (benign vs
    malicious), and the probe's probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [a for a, v in stealth.items() if v["malicious"] or v["benign"]]
    if not attacks:
        return None
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(3 * max(3.0, 1 + 0.55 * len(attacks)), 3.6))
    pos = range(len(attacks))
    for ax, key, title in ((ax1, "", "mean cosine to the benign clients"),
                           (ax3, "_distance", "distance to the benign mean update\n(/ benign clients' mean)")):
        ax.boxplot([stealth[a].get("benign" + key) or [float("nan")] for a in attacks],
                   positions=[p - 0.18 for p in pos], widths=0.3, patch_artist=True, boxprops={"facecolor": "#9ecae1"})
        ax.boxplot([stealth[a].get("malicious" + key) or [float("nan")] for a in attacks],
                   positions=[p + 0.18 for p in pos], widths=0.3, patch_artist=True, boxprops={"facecolor": "#fc9272"})
        ax.set_xticks(list(pos), attacks, rotation=35, ha="right")
        ax.set_title(title + ("\n(blue: benign, red: malicious)" if not key else ""), fontsize=9)
    probe = [a for a in attacks if stealth[a]["probe"]]
    if probe:
        ax2.boxplot([stealth[a]["probe"] for a in probe], patch_artist=True, boxprops={"facecolor": "#fc9272"})
        ax2.set_xticks(range(1, len(probe) + 1), probe, rotation=35, ha="right")
        ax2.axhline(0.8, ls="--", c="grey", lw=1)
    else:  # say why the panel is empty rather than leave bare axes
        ax2.text(0.5, 0.5, "no probe in this grid", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_xticks([])
        ax2.set_yticks([])
    ax2.set_title("probe probability, malicious\nclients (dashed: threshold)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_attack_matrix(grid_dir: str | Path) -> list[Path]:
    """Write the matrix's CSV, Markdown, heatmaps and stealth plot into the grid directory; return the paths."""
    grid_dir = Path(grid_dir)
    matrix = read_matrix(grid_dir)
    written = []
    csv_path = grid_dir / "attack_matrix.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["attack", "defense", *[f"{m}_{k}" for m in METRICS for k in ("mean", "ci_low", "ci_high")],
                    "n_seeds", "worst_rule", "worst_helpfulness_proxy"])
        for (a, d), c in matrix["cells"].items():
            vals = [x for m in METRICS for x in (c.get(m) or (None, None, None, None))[:3]]
            n = max((v[3] for v in c.values()), default=0)
            w.writerow([a, d, *vals, n, is_worst(matrix, "rule", a, d), is_worst(matrix, "helpfulness_proxy", a, d)])
    written.append(csv_path)
    md = grid_dir / "attack_matrix.md"
    md.write_text(f"# Attack x defense matrix: {grid_dir.name}\n\n" + markdown(matrix))
    written.append(md)
    for m in METRICS:
        p = plot_heatmap(matrix, m, grid_dir / "plots" / f"attack_matrix_{m}.png")
        if p:
            written.append(p)
    p = plot_stealth(stealth_by_attack(grid_dir, matrix), grid_dir / "plots" / "stealth_by_attack.png")
    if p:
        written.append(p)
    return written


if __name__ == "__main__":
    for p in write_attack_matrix(sys.argv[1]):
        print(p)
