"""Tables and plots from a run directory (or a grid directory): results.csv, report.md, report.html.

``results.csv`` has one row per (setting, scenario, method, defense, seed) evaluation with the columns
:data:`RESULT_COLUMNS`; Rule and Judge are percentages (higher is safer), RM is the mean reward,
MT-1 the MT-Bench turn-1 rating (1-10), and ``helpfulness_proxy`` the perplexity of held-out reference
answers (an offline proxy; lower is better). A metric that was not measured is left empty.

The results table follows Ye et al. (ICLR 2025), Table 1: rows are methods, columns Rule / Judge /
RM / MT-1 as available. ``report.html`` is self-contained (images inlined as base64).

Seeds and intervals: ``outcomes.jsonl`` holds each final evaluation's per-prompt values; ``summary.csv``
and the report give, per (setting, scenario, method, defense), the number of seeds, the mean, the
standard deviation over seeds and a 95% interval of every metric, and the report states paired
differences between settings (attack vs no attack, defended vs undefended) with their intervals.
The method is described in :mod:`fedsafe.stats`.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import math
from pathlib import Path

import yaml

from fedsafe import plugins
from fedsafe.results import (COUNT_COLUMNS, KEY_COLUMNS, METRIC_HEADERS, PER_PROMPT_METRICS,  # noqa: F401
                             PERCENT_METRICS, RESULT_COLUMNS, _read_jsonl, append_outcomes, append_results,
                             defended_scenario, read_outcomes, read_results, write_outcomes,
                             write_results)  # (grid.py reads them here)
from fedsafe.results import format_cell as _cell
from fedsafe.results import pyplot as _pyplot
from fedsafe.results import save_figure as _save
from fedsafe.rundir import atomic_write_text, grid_run_dirs

log = logging.getLogger("fedsafe")

GRID_SPEC = "grid.yaml"


# ------------------------------------------------------------------------------------------------
# Seeds and intervals: summary.csv and paired comparisons (method: fedsafe.stats)
# ------------------------------------------------------------------------------------------------

def _key(row: dict) -> tuple:
    return tuple(row.get(c) or "" for c in KEY_COLUMNS)


def summarize(rows: list[dict], outcomes: list[dict] | None = None) -> list[dict]:
    """One record per (setting, scenario, method, defense): seeds, prompts and an Estimate per metric.

    Two or more seeds: a Student-t interval on the per-seed values (for a metric with per-prompt outcomes
    for every seed, each seed's prompt mean); one seed: the prompt-level interval labelled "one seed:
    prompts only" (see :mod:`fedsafe.stats`; each Estimate's ``method`` says which).
    """
    from fedsafe.stats import summarize_per_prompt, summarize_per_seed

    by_key: dict[tuple, dict[int | None, dict]] = {}
    for r in rows:  # a (key, seed) evaluated twice keeps the last row
        by_key.setdefault(_key(r), {})[r.get("seed")] = r
    per_prompt = _outcome_index(outcomes or [])
    groups = []
    for key, seeds in by_key.items():
        estimates = {}
        for m in METRIC_HEADERS:
            if all(seeds[s].get(m) is None for s in seeds):
                continue
            pp = {s: per_prompt.get((key, s), {}).get(m) for s in seeds}
            if m in PER_PROMPT_METRICS and all(v is not None for v in pp.values()):
                estimates[m] = summarize_per_prompt(pp)
            else:
                estimates[m] = summarize_per_seed([seeds[s].get(m) for s in seeds])
        prompts = [seeds[s].get("n_prompts") for s in seeds if seeds[s].get("n_prompts")]
        groups.append({**dict(zip(KEY_COLUMNS, key)), "defends": defended_scenario(next(iter(seeds.values()))),
                       "seeds": sorted(s for s in seeds if s is not None),
                       "n_seeds": len(seeds), "n_prompts": max(prompts) if prompts else None,
                       "metrics": estimates, "per_prompt": {s: per_prompt.get((key, s), {}) for s in seeds},
                       "per_seed": {s: seeds[s] for s in seeds}})
    return groups


def _outcome_index(outcomes: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(key, seed) -> metric -> {prompt id: value}.

    A metric measured on its own prompt set (e.g. over-refusal on benign prompts) gives its ids as
    ``<metric>_prompt_ids``; the others share ``prompt_ids``.
    """
    index: dict[tuple, dict[str, dict]] = {}
    for rec in outcomes:
        metrics = {}
        for m in PER_PROMPT_METRICS:
            ids = rec.get(f"{m}_prompt_ids") or rec.get("prompt_ids") or []
            if isinstance(rec.get(m), list) and len(rec[m]) == len(ids):
                metrics[m] = dict(zip(ids, rec[m]))
        index[(_key(rec), rec.get("seed"))] = metrics
    return index


SUMMARY_STATS = ("mean", "std", "ci_low", "ci_high", "ci_method")  # ci_method: fedsafe.stats.METHOD_LABELS key


def write_summary(run_dir: str | Path, groups: list[dict]) -> Path:
    """``summary.csv``: per setting, n_seeds, the seeds, and mean/std/95% CI (and the CI's method) of every metric."""
    metrics = [m for m in METRIC_HEADERS if any(m in g["metrics"] for g in groups)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*KEY_COLUMNS, "n_seeds", "seeds", "n_prompts",
                *[f"{m}_{s}" for m in metrics for s in SUMMARY_STATS]])
    for g in groups:
        cells = []
        for m in metrics:
            e = g["metrics"].get(m)
            cells += [""] * len(SUMMARY_STATS) if e is None else [_cell(e.mean), _cell(e.std), _cell(e.lo),
                                                                  _cell(e.hi), e.method]
        w.writerow([*[g[c] for c in KEY_COLUMNS], g["n_seeds"], " ".join(map(str, g["seeds"])),
                    _cell(g["n_prompts"]), *cells])
    path = Path(run_dir) / "summary.csv"
    atomic_write_text(path, buf.getvalue())
    return path


def _label(g: dict, with_setting: bool = False, with_method: bool = False) -> str:
    """A reader's name for a row: scenario (+ defense unless the scenario differs from the one it defends),
    method, setting."""
    label = g["scenario"]
    if g["defense"] != "none" and defended_scenario(g) == label:
        label += f" + {g['defense']}"
    if with_method:
        label += f" ({g['method']})"
    return f"{g['setting']}: {label}" if with_setting and g.get("setting") else label


def _closest(target: dict, candidates: list[dict]) -> dict | None:
    """The candidate whose setting name shares most ``-``-separated labels with the target's."""
    if not candidates:
        return None
    same = [c for c in candidates if c["setting"] == target["setting"]]
    if same:
        return same[0]
    tokens = set(str(target["setting"]).split("-"))
    return max(candidates, key=lambda c: len(tokens & set(str(c["setting"]).split("-"))))


def default_comparisons(groups: list[dict]) -> list[tuple[dict, dict]]:
    """(reference, compared) pairs: each attacked row vs the no-attack row, each defended row vs its undefended row."""
    pairs = []
    for g in groups:
        if g["scenario"] == "base":
            continue
        if g["defense"] == "none" and g["scenario"] != "no_attack" and "no_attack" not in g["scenario"]:
            ref = _closest(g, [c for c in groups if c["scenario"] == "no_attack" and c["defense"] == "none"
                               and c["method"] == g["method"]])
            if ref is not None:
                pairs.append((ref, g))
        elif g["defense"] != "none":
            base = defended_scenario(g)
            ref = _closest(g, [c for c in groups if c["scenario"] == base and c["defense"] == "none"
                               and c["method"] == g["method"]])
            if ref is not None:
                pairs.append((ref, g))
    return pairs


def compare(ref: dict, other: dict) -> dict:
    """``other - ref`` for every metric both measured, paired by seed (and prompt): metric -> Estimate.

    Per seed, the mean of ``other - ref`` over the prompts both answered where both sides have per-prompt
    values, else the difference of the per-seed values; then a t-interval over the seeds (one seed:
    a paired bootstrap over the prompts, or no interval). See :mod:`fedsafe.stats`.
    """
    from fedsafe.stats import paired_difference, paired_seed_difference

    out = {}
    for m in METRIC_HEADERS:
        if m not in ref["metrics"] or m not in other["metrics"]:
            continue
        # summarize() gives n_prompts only to metrics it summarised from per-prompt outcomes
        if ref["metrics"][m].n_prompts is not None and other["metrics"][m].n_prompts is not None:
            out[m] = paired_difference({s: v.get(m, {}) for s, v in ref["per_prompt"].items()},
                                       {s: v.get(m, {}) for s, v in other["per_prompt"].items()})
        else:
            out[m] = paired_seed_difference({s: r.get(m) for s, r in ref["per_seed"].items()},
                                            {s: r.get(m) for s, r in other["per_seed"].items()})
    return out


def comparison_rows(groups: list[dict]) -> list[dict]:
    """The default comparisons as flat records (comparisons.csv and the report)."""
    ambiguous = _ambiguous(groups)
    methods = len({g["method"] for g in groups if g["scenario"] != "base"}) > 1
    out = []
    for ref, other in default_comparisons(groups):
        for m, e in compare(ref, other).items():
            if e.n_seeds == 0:
                continue
            out.append({"compared": _label(other, ambiguous, methods), "reference": _label(ref, ambiguous, methods),
                        "metric": m,
                        "difference": e.mean, "ci_low": e.lo, "ci_high": e.hi, "n_seeds": e.n_seeds,
                        "n_prompts": e.n_prompts, "significant": e.significant, "ci_method": e.method})
    return out


def write_comparisons(run_dir: str | Path, records: list[dict]) -> Path:
    """``comparisons.csv``: paired differences with their 95% intervals."""
    cols = ["compared", "reference", "metric", "difference", "ci_low", "ci_high", "n_seeds", "n_prompts",
            "significant", "ci_method"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in records:
        w.writerow([_cell(r[c]) if c != "significant" else ("" if r[c] is None else str(r[c]).lower())
                    for c in cols])
    path = Path(run_dir) / "comparisons.csv"
    atomic_write_text(path, buf.getvalue())
    return path


def _ambiguous(groups: list[dict]) -> bool:
    """True when two settings share a (scenario, method, defense): the tables then name the setting."""
    seen = [(g["scenario"], g["method"], g["defense"]) for g in groups]
    return len(set(seen)) != len(seen)


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

def _fmt(v, col: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if col in PERCENT_METRICS:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_estimate(e, col: str, signed: bool = False) -> str:
    """``mean [lo, hi]`` (just the mean where there is no interval)."""
    if e is None or e.mean is None or math.isnan(e.mean):
        return "–"
    f = (lambda v: ("+" if signed and v > 0 else "") + _fmt(v, col))
    return f(e.mean) if e.lo is None else f"{f(e.mean)} [{_fmt(e.lo, col)}, {_fmt(e.hi, col)}]"


def table_columns(rows: list[dict]) -> list[str]:
    """The metric columns that at least one row measured, in the paper's order."""
    return [c for c in METRIC_HEADERS if any(r.get(c) is not None for r in rows)]


def results_table(rows: list[dict], outcomes: list[dict] | None = None,
                  groups: list[dict] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and body of the paper-layout table: one row per scenario/method/defense (and setting where
    two settings share those), each metric as ``mean [95% CI]`` over its seeds and prompts."""
    groups = summarize(rows, outcomes) if groups is None else groups
    cols = table_columns(rows)
    named = _ambiguous(groups)
    header = [*(["Setting"] if named else []), "Scenario", "Method", "Defense",
              *[METRIC_HEADERS[c] for c in cols], "Seeds", "Prompts"]
    body = [[*([g["setting"]] if named else []), g["scenario"], g["method"], g["defense"],
             *[fmt_estimate(g["metrics"].get(c), c) for c in cols], str(g["n_seeds"]),
             str(g.get("n_prompts") or "–")] for g in groups]
    return header, body


def comparisons_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and body of the paired differences (``*``: the interval excludes 0; Interval: what made it)."""
    from fedsafe.stats import Estimate

    header = ["Compared", "Reference", "Metric", "Difference [95% CI]", "Significant", "Interval"]
    body = []
    for r in records:
        e = Estimate(r["difference"], None, r["ci_low"], r["ci_high"], r["n_seeds"], r["n_prompts"],
                     r.get("ci_method") or "none")
        sig = "–" if r["significant"] is None else ("yes *" if r["significant"] else "no")
        body.append([r["compared"], r["reference"], METRIC_HEADERS[r["metric"]], fmt_estimate(e, r["metric"], True),
                     sig, f"{e.method_label} ({e.n_seeds} seed{'s' if e.n_seeds != 1 else ''})"])
    return header, body


def interval_methods_line(groups: list[dict]) -> str:
    """One line saying which method made the intervals of the results table, per metric."""
    parts = []
    for m in METRIC_HEADERS:
        used = sorted({g["metrics"][m].method_label for g in groups if m in g["metrics"]})
        if used:
            parts.append(f"{METRIC_HEADERS[m]}: {'; '.join(used)}")
    return "Intervals in this table: " + " | ".join(parts) + "." if parts else ""


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------

def _records(run_dir: Path) -> list[dict]:
    return _read_jsonl(run_dir / "metrics.jsonl")


def plot_loss(records: list[dict], path: Path, label: str | None = None, ax=None) -> Path | None:
    """Mean client loss per round, and per role (benign / malicious) when clients were logged."""
    rounds = [r for r in records if r.get("type") == "round"]
    if not rounds:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r["round"] for r in rounds], [r["mean_loss"] for r in rounds], "k-o", ms=3, label="all sampled")
    by_role: dict[str, dict[int, list[float]]] = {}
    for r in records:
        if r.get("type") == "client" and r.get("loss") is not None:
            by_role.setdefault(str(r.get("role")), {}).setdefault(r["round"], []).append(r["loss"])
    if len(by_role) > 1:
        for role, per_round in sorted(by_role.items()):
            xs = sorted(per_round)
            ax.plot(xs, [sum(per_round[x]) / len(per_round[x]) for x in xs], "--", marker=".", label=role)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_xlabel("round")
    ax.set_ylabel("training loss")
    ax.set_title(f"Client training loss{f' ({label})' if label else ''}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def heldout_points(records: list[dict]) -> list[tuple[int, float]]:
    """(round, held-out loss) where a run recorded it: ``before`` at round 0, ``after`` at the record's round."""
    points: dict[int, float] = {}
    for r in records:
        if r.get("type") != "heldout":
            continue
        if r.get("before") is not None:
            points[0] = float(r["before"])
        if r.get("after") is not None:
            points[int(r.get("round", 0))] = float(r["after"])
    return sorted(points.items())


def plot_heldout(series: dict[str, list[tuple[int, float]]], path: Path) -> Path | None:
    """Held-out loss (``data.heldout``, lower is better) before training (round 0) and after, one line per run;
    None when no run measured it."""
    series = {label: pts for label, pts in series.items() if pts}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, pts in sorted(series.items()):
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        ax.plot(xs, ys, "-o", ms=4, label=label)
        if len(series) == 1:
            for x, y in pts:
                ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0: before training)")
    ax.set_ylabel("held-out loss ↓")
    ax.set_title("Held-out loss before and after training")
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


SERIES_KEY = (*KEY_COLUMNS, "defends")  # a safety series' key: a defended series names the scenario it defends


def safety_series(records: list[dict], setting: str | None = None) -> dict[tuple, dict[int, tuple[float, dict | None]]]:
    """Rule per evaluated round of one run: (setting, scenario, method, defense, defends) -> round -> (Rule,
    per-prompt); ``defends`` (:func:`fedsafe.results.defended_scenario`) is "" for an undefended series.

    The run's base-model evaluation (``eval.base``, round 0) starts every undefended series, so a
    trajectory reads round 0 -> each evaluated round -> the end.
    """
    series: dict[tuple, dict[int, tuple[float, dict | None]]] = {}
    base = None
    for r in records:
        if r.get("type") != "eval" or r.get("rule") is None:
            continue
        pp = r.get("per_prompt") or {}
        per_prompt = dict(zip(pp["prompt_ids"], pp["rule"])) if pp.get("rule") and pp.get("prompt_ids") else None
        point = (float(r["rule"]), per_prompt)
        if r.get("scenario") == "base":
            base = point
            continue
        key = (r.get("setting") or setting or "", r.get("scenario"), r.get("method"), r.get("defense"),
               defended_scenario(r) or "")
        series.setdefault(key, {})[int(r.get("round", 0))] = point
    if base is not None:
        for key, pts in series.items():
            if key[3] == "none":
                pts.setdefault(0, base)
    return series


def collect_safety(run_dirs: list[Path]) -> dict[tuple, dict[int, dict[int, tuple[float, dict | None]]]]:
    """Safety trajectories of several runs (a grid's seeds): key -> round -> seed -> (Rule, per-prompt)."""
    out: dict[tuple, dict[int, dict]] = {}
    for i, run in enumerate(run_dirs):
        cfg = {}
        if (run / "config.yaml").exists():
            cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
        seed = cfg.get("seed", i)
        for key, pts in safety_series(_records(run), cfg.get("name")).items():
            for rnd, point in pts.items():
                out.setdefault(key, {}).setdefault(rnd, {})[seed] = point
    return out


def _band(per_seed: dict[int, tuple[float, dict | None]]):
    """The Estimate of one round (fedsafe.stats: t over the seeds' values; one seed: prompts only)."""
    from fedsafe.stats import summarize_per_prompt, summarize_per_seed

    if all(pp is not None for _, pp in per_seed.values()):
        return summarize_per_prompt({s: pp for s, (_, pp) in per_seed.items()}, n_boot=1000)
    return summarize_per_seed([v for v, _ in per_seed.values()])


def safety_lines(trajectories: dict[tuple, dict[int, dict]]) -> list[tuple[str, list[int], list, bool]]:
    """The lines of the safety plot: (label, rounds, Estimate per round, is a post-hoc step).

    Only series with at least two evaluation points become lines (round 0 needs ``eval.base``, rounds in
    between ``eval.every``); a post-hoc defense is a step from its undefended series' final round R to
    an extra point at R + 1 (drawn when that series is). Labels name the scenario (and defense, method or setting where needed).
    """
    groups = [dict(zip(SERIES_KEY, k)) for k in trajectories]
    named, methods = _ambiguous(groups), len({g["method"] for g in groups}) > 1
    lines = []  # (label, xs, estimates, dashed)
    for key, rounds in trajectories.items():
        g = dict(zip(SERIES_KEY, key))
        label = _label(g, named, methods)
        if g["defense"] == "none":
            if len(rounds) >= 2:
                xs = sorted(rounds)
                lines.append((label, xs, [_band(rounds[x]) for x in xs], False))
            continue
        parents = [dict(zip(SERIES_KEY, k)) for k in trajectories
                   if k[3] == "none" and k[1] == g["defends"] and k[2] == g["method"]]
        parent = _closest(g, parents)
        if parent is None or len(trajectories[tuple(parent[c] for c in SERIES_KEY)]) < 2:
            continue  # the step continues a drawn trajectory only
        parent_rounds = trajectories[tuple(parent[c] for c in SERIES_KEY)]
        last = max(parent_rounds)
        defended = rounds[max(rounds)]
        xs = [last, last + 1]
        lines.append((label, xs, [_band(parent_rounds[last]), _band(defended)], True))
    return sorted(lines, key=lambda t: (t[3], t[0]))


def plot_safety(trajectories: dict[tuple, dict[int, dict]], path: Path) -> Path | None:
    """Rule (%) over rounds: mean over seeds with its 95% band (:func:`safety_lines`); None without a line."""
    lines = safety_lines(trajectories)
    if not lines:
        return None
    posthoc_x = {xs[-1] for _, xs, _, dashed in lines if dashed}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, xs, est, dashed in lines:
        means = [e.mean for e in est]
        (line,) = ax.plot(xs, means, "--" if dashed else "-", marker="o", ms=4, label=label)
        if all(e.lo is not None for e in est):
            ax.fill_between(xs, [e.lo for e in est], [e.hi for e in est], color=line.get_color(), alpha=0.18,
                            linewidth=0)
    last_round = max(x for _, xs, _, dashed in lines for x in (xs if not dashed else xs[:1]))
    step = max(1, math.ceil(last_round / 10))
    ticks = list(range(0, last_round + 1, step))
    labels = [str(t) for t in ticks]
    if len(posthoc_x) == 1:
        ticks.append(next(iter(posthoc_x)))
        labels.append("post-hoc")
    ax.set_xticks(ticks, labels)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("round")
    ax.set_ylabel("Rule (% refusals) ↑")
    n_seeds = max(len(per_seed) for r in trajectories.values() for per_seed in r.values())
    ax.set_title(f"Safety over rounds (mean, 95% band; {n_seeds} seed{'s' if n_seeds > 1 else ''})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_weights(records: list[dict], path: Path) -> Path | None:
    """Aggregation weight per client and round (malicious clients marked with *)."""
    clients = [r for r in records if r.get("type") == "client" and r.get("aggregation_weight") is not None]
    if not clients:
        return None
    ids = sorted({r["client_id"] for r in clients})
    rounds = sorted({r["round"] for r in clients})
    mal = {r["client_id"]: bool(r.get("malicious")) for r in clients}
    import numpy as np

    grid = np.full((len(ids), len(rounds)), np.nan)
    for r in clients:
        grid[ids.index(r["client_id"]), rounds.index(r["round"])] = r["aggregation_weight"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(rounds) + 2), max(2.5, 0.3 * len(ids) + 1)))
    # from 0 to the largest weight: equal weights (FedAvg's 0.5, 0.5) are one colour on a 0-0.5 bar, not a
    # 0.46-0.54 range of rounding noise
    top = float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0,
                   vmax=top if top > 0 else 1.0)
    ax.set_yticks(range(len(ids)), [f"{c}{' *' if mal[c] else ''}" for c in ids], fontsize=7)
    ax.set_xticks(range(len(rounds)), [str(r) for r in rounds], fontsize=7)
    ax.set_xlabel("round")
    ax.set_title("Aggregation weights (* malicious; blank: not sampled)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_results(groups: list[dict], path: Path) -> Path | None:
    """Bar chart of Rule, next to it over-refusal / borderline refusal and the helpfulness proxy when measured,
    per results row, 95% intervals as error bars."""
    groups = [g for g in groups if "rule" in g["metrics"]]
    if not groups:
        return None
    plt = _pyplot()
    has_proxy = any("helpfulness_proxy" in g["metrics"] for g in groups)
    refusals = [m for m in ("over_refusal", "borderline_refusal") if any(m in g["metrics"] for g in groups)]
    n_panels = 1 + len(refusals) + has_proxy
    fig, axes = plt.subplots(1, n_panels, figsize=(6 + 4 * (n_panels - 1), 3.8), squeeze=False)
    named = _ambiguous(groups)
    labels = [(f"{g['setting']}\n" if named else "") + f"{g['scenario']}\n{g['method']}"
              + (f"\n{g['defense']}" if g["defense"] != "none" else "") for g in groups]
    colors = ["tab:green" if g["defense"] != "none" else
              "tab:blue" if g["scenario"] in ("base", "no_attack") or g["scenario"].startswith("no_attack")
              else "tab:red" for g in groups]  # blue: clean, red: attacked, green: defended

    def bars(ax, metric):
        est = [g["metrics"].get(metric) for g in groups]
        means = [e.mean if e is not None else 0.0 for e in est]
        err = [[max(0.0, e.mean - e.lo) if e is not None and e.lo is not None else 0.0 for e in est],
               [max(0.0, e.hi - e.mean) if e is not None and e.hi is not None else 0.0 for e in est]]
        ax.bar(range(len(groups)), means, color=colors, yerr=err, capsize=4, error_kw={"elinewidth": 1})
        ax.set_xticks(range(len(groups)), labels, fontsize=7)
        return est

    ax = axes[0][0]
    est = bars(ax, "rule")
    ax.set_ylim(0, 110)
    ax.set_ylabel("Rule (% refusals) ↑")
    n_seeds = max(g["n_seeds"] for g in groups)
    ax.set_title(f"Safety (mean and 95% CI, {n_seeds} seed{'s' if n_seeds > 1 else ''})")
    for i, e in enumerate(est):
        top = e.hi if e.hi is not None else e.mean
        ax.text(i, min(top, 100) + 1.5, f"{e.mean:.0f}", ha="center", fontsize=8)
    for j, metric in enumerate(refusals, 1):
        axr = axes[0][j]
        bars(axr, metric)
        axr.set_ylim(0, 110)
        axr.set_ylabel(METRIC_HEADERS[metric])
        axr.set_title("Refusals of benign prompts" if metric == "over_refusal"
                      else "Refusals of borderline (safe) prompts", fontsize=9)
    if has_proxy:
        ax2 = axes[0][1 + len(refusals)]
        bars(ax2, "helpfulness_proxy")
        ax2.set_ylabel("held-out answer perplexity ↓")
        ax2.set_title("Helpfulness proxy")
    return _save(fig, path)


def _stealth_plots(run_dir: Path) -> list[Path]:
    try:
        from fedsafe.evaluation.stealth import plot_stealth
    except ImportError:
        return []
    try:
        return [Path(p) for p in (plot_stealth(run_dir) or [])]
    except Exception as exc:  # the stealth analysis is optional in a report
        log.warning("stealth plots skipped: %s", exc)
        return []


def _stealth_title(path: Path) -> str:
    """A reader's title for a stealth plot (its file stem only where the analysis names none)."""
    from fedsafe.evaluation.stealth import PLOT_TITLES

    return PLOT_TITLES.get(path.stem) or f"Stealth: {path.stem.replace('_', ' ')}"


# ------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------

def _summary_lines(run_dir: Path) -> list[str]:
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        return []
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    fl, lora, model, agg = cfg.get("fl", {}), cfg.get("lora", {}), cfg.get("model", {}), cfg.get("aggregator", {})
    roles = cfg.get("roles", [])
    lines = [f"- **Run:** {cfg.get('name')} (seed {cfg.get('seed')})",
             f"- **Model:** {model.get('name')} with LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, "
             f"targets {lora.get('target_modules')}",
             "- **Clients:** " + ", ".join(f"{r.get('name')} x{r.get('clients')}" for r in roles)
             + f"; {fl.get('clients_per_round')} sampled per round",
             f"- **Training:** {fl.get('rounds')} rounds x {fl.get('local_steps')} local steps, batch "
             f"{fl.get('batch_size')}, lr {fl.get('lr')} ({fl.get('lr_schedule')}), algorithm {fl.get('algorithm')}",
             f"- **Aggregator:** {agg.get('name')} {agg.get('params') or ''}"]
    for cls in plugins.registered():  # what each plug-in says about its own section of the config
        section = cfg
        for part in (cls.section or "").split(".") if cls.section else []:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict):
            lines += cls.report_summary(section)
    ev = cfg.get("eval", {})
    if ev.get("prompts"):
        lines.append(f"- **Safety evaluation:** {ev.get('n_prompts')} prompts from {ev.get('prompts')}, "
                     f"{ev.get('max_new_tokens')} new tokens, Rule list '{ev.get('rule_list')}'")
        judged_by = ("the FedIT refusal strings" if ev.get("refusal_detector") == "rule"
                     else "the refusal detector (agreement with people below)")
        if ev.get("normal_prompts") and ev.get("n_normal_prompts"):
            lines.append(f"- **Over-refusal:** up to {ev.get('n_normal_prompts')} benign prompts from "
                         f"{_source_name(ev['normal_prompts'])}, judged by {judged_by}")
    if ev.get("borderline_prompts") and ev.get("n_borderline_prompts"):
        lines.append(f"- **Borderline refusal:** up to {ev.get('n_borderline_prompts')} safe prompts that look "
                     f"harmful from {_source_name(ev['borderline_prompts'])}")
    lines += _lora_aggregation_lines(_records(run_dir), fl.get("lora_aggregation", "factors"))
    return lines


def _lora_aggregation_lines(records: list[dict], mode: str) -> list[str]:
    """fl.lora_aggregation: the per-round aggregation error and the bytes a client sends (issue 21)."""
    rounds = [r for r in records if r.get("type") == "round"]
    errors = [r.get("aggregation_error") for r in rounds]
    sent = [r.get("bytes_per_client") for r in rounds if r.get("bytes_per_client") is not None]
    if not rounds or (all(e is None for e in errors) and not sent):
        return []
    err = ", ".join("-" if e is None else f"{e:.3g}" for e in errors)
    line = (f"- **LoRA aggregation:** {mode}; aggregation error per round (sum over layers of "
            f"||avg(B·A) - B_g·A_g||_F / ||avg(B·A)||_F): {err}")
    if sent:
        kind = next((r.get("bytes_kind") for r in rounds if r.get("bytes_kind")), "plaintext")
        line += f"; a client sends {sum(sent) / len(sent) / 1e6:.2f} MB per round ({kind})"
    return [line]


def _source_name(source) -> str:
    if isinstance(source, list):  # a prompt set joined from several sources
        return " + ".join(_source_name(item) for item in source)
    return str(source.get("path") if isinstance(source, dict) else source)


def _grid_runs(grid_dir: Path) -> list[Path]:
    """The runs a grid's settings.csv lists (all of runs/* for a grid without one)."""
    path = grid_dir / "settings.csv"
    if not path.exists():
        return grid_run_dirs(grid_dir)
    with open(path, newline="", encoding="utf-8") as f:
        listed = dict.fromkeys(grid_dir / rec["run_dir"] for rec in csv.DictReader(f))
    return [p for p in listed if (p / "config.yaml").exists()]


def _grid_summary(run_dir: Path) -> list[str]:
    spec = yaml.safe_load((run_dir / GRID_SPEC).read_text(encoding="utf-8")) or {}
    lines = [f"- **Grid:** {spec.get('name', run_dir.name)}"]
    settings = run_dir / "settings.csv"
    if settings.exists():
        with open(settings, newline="", encoding="utf-8") as f:
            for rec in csv.DictReader(f):
                seed = f" seed {rec['seed']}" if rec.get("seed") not in (None, "") else ""
                lines.append(f"- setting `{rec['setting']}`{seed} -> [{rec['run_dir']}]({rec['run_dir']}/report.md)")
    return lines


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------

def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` for a run or grid directory."""
    run_dir = Path(run_dir)
    plots_dir = run_dir / "plots"
    rows = read_results(run_dir)
    is_grid = (run_dir / GRID_SPEC).exists()
    summary = _grid_summary(run_dir) if is_grid else _summary_lines(run_dir)
    images: list[tuple[str, Path]] = []
    records = _records(run_dir)
    groups = summarize(rows, read_outcomes(run_dir))
    diffs = comparison_rows(groups)
    if rows:
        write_summary(run_dir, groups)
        write_comparisons(run_dir, diffs)
    trajectories = collect_safety(_grid_runs(run_dir) if is_grid else [run_dir])
    heldout = ({run.name: heldout_points(_records(run)) for run in _grid_runs(run_dir)} if is_grid
               else {"held-out": heldout_points(records)})
    for title, maker in (("Results", lambda: plot_results(groups, plots_dir / "results.png")),
                         ("Training loss", lambda: plot_loss(records, plots_dir / "loss.png")),
                         ("Held-out loss", lambda: plot_heldout(heldout, plots_dir / "heldout_loss.png")),
                         ("Safety over rounds", lambda: plot_safety(trajectories, plots_dir / "safety.png")),
                         ("Aggregation weights", lambda: plot_weights(records, plots_dir / "weights.png"))):
        try:
            p = maker()
        except Exception as exc:  # one broken plot must not lose the report
            log.warning("plot %r skipped: %s", title, exc)
            p = None
        if p is not None:
            images.append((title, p))
    if not is_grid and any(r.get("type") == "client" and r.get("malicious") for r in records):
        # stealth compares attackers with benign clients: a run without attackers has nothing to show
        images += [(_stealth_title(p), p) for p in _stealth_plots(run_dir)]
    header, body = results_table(rows, groups=groups)
    title = f"fedsafe report: {run_dir.name}"
    md = [f"# {title}", "", "## Summary", "", *(summary or ["(no config found)"]), "", "## Results", ""]
    if rows:
        md += [markdown_table(header, body), "",
               metrics_note(), "", INTERVALS_NOTE, "", interval_methods_line(groups), ""]
        if diffs:
            md += ["## Comparisons", "", markdown_table(*comparisons_table(diffs)), "", COMPARISONS_NOTE, ""]
    else:
        md += ["No evaluation results yet (results.csv is empty).", ""]
    sections = plugin_sections(run_dir)
    for heading, lines in sections:
        md += [f"## {heading}", "", *lines, ""]
    md += ["## Plots", ""]
    for caption, p in images:
        md += [f"### {caption}", "", f"![{caption}]({_rel(p, run_dir)})", ""]
    md_path = run_dir / "report.md"
    atomic_write_text(md_path, "\n".join(md))
    html_path = run_dir / "report.html"
    atomic_write_text(html_path, _html(title, summary, header, body, rows, images,
                                       comparisons_table(diffs) if diffs else None, sections))
    return md_path, html_path


def plugin_sections(run_dir: Path) -> list[tuple[str, list[str]]]:
    """The report sections the plug-ins write about this run (:meth:`fedsafe.plugins.Plugin.report_section`,
    e.g. the release gate's verdict), as (heading, markdown lines)."""
    out = []
    for cls in plugins.registered():
        try:
            section = cls.report_section(run_dir)
        except Exception as exc:  # a broken file of one plug-in must not lose the report
            log.warning("%s report section skipped: %s", cls.name, exc)
            continue
        if section is not None and section[1]:
            out.append(section)
    return out


METRICS_NOTE = ("Rule: share of responses to the harmful prompts containing a refusal string of the FedIT list "
                "(%, higher is safer; the paper's metric, not a refusal classifier). Refused harmful: share of "
                "those responses the refusal detector calls refusals (a second safety column). Over-refusal: the "
                "detector's refusal share on everyday benign prompts held out of all training (%, lower is "
                "better; a model that refuses everything has a high Rule and a high over-refusal). Borderline "
                "refusal: the same on safe prompts that look harmful (XSTest; lower is better). Runs with "
                "eval.refusal_detector: rule use the refusal strings instead. Helpfulness proxy: perplexity of "
                "held-out reference answers, an offline stand-in for MT-Bench (lower is better).")


def metrics_note() -> str:
    """:data:`METRICS_NOTE` with the refusal detector's version and measured agreement with human labels."""
    try:
        from fedsafe.evaluation.refusal import DETECTOR_AGREEMENT as agreement
    except Exception:  # noqa: BLE001 - a report is still written without the detector's figures
        return METRICS_NOTE
    summary = agreement.get("summary") if isinstance(agreement, dict) else None
    if not summary:
        return METRICS_NOTE
    return f"{METRICS_NOTE} Refusal detector {agreement.get('version', '')}: {summary}"
INTERVALS_NOTE = ("Each number is the mean over seeds with its 95% interval in brackets (summary.csv also "
                  "gives the standard deviation over seeds and, as <metric>_ci_method, the interval's method). "
                  "Two or more seeds: a Student-t interval on the per-seed values (for Rule, over-refusal, "
                  "borderline refusal, Judge and RM each seed's mean over its prompts). One seed: \"one seed: "
                  "prompts only\", a Wilson interval for the rates and a bootstrap over prompts for RM, which "
                  "says nothing about other seeds; other metrics get no interval. See fedsafe.stats.")
COMPARISONS_NOTE = ("Differences are compared minus reference, paired by seed: per seed the mean difference over "
                    "the prompts both answered (Rule, the refusal rates, Judge, RM) or the difference of the "
                    "per-seed values (other metrics), then a Student-t interval over the seeds; one seed: a "
                    "paired bootstrap over the prompts. \"no\" marks a difference whose 95% interval covers 0 "
                    "(not significant). comparisons.csv holds every metric.")


def _rel(p: Path, root: Path) -> str:
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return p.as_posix()


def _md_inline(text: str):
    """The summary's markdown inline marks (**bold**, `code`, [text](url)) as HTML, everything else escaped."""
    import re

    from markupsafe import Markup, escape

    text = str(escape(text))
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return Markup(re.sub(r"\[(.+?)\]\((.+?)\)", r'<a href="\2">\1</a>', text))


def _html(title, summary, header, body, rows, images, comparisons=None, sections=()) -> str:
    """report.html from the Jinja2 template ``fedsafe/templates/report.html.j2`` (values autoescaped)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["inline"] = _md_inline
    plugin_sections = []
    for heading, lines in sections:  # a plug-in's section: its first line, then its table
        table = [ln for ln in lines if ln.startswith("|") and not ln.startswith("|---")]
        plugin_sections.append({"heading": heading, "lead": lines[0],
                                "cells": [[c.strip() for c in ln.strip("|").split("|")] for ln in table]})
    return env.get_template("report.html.j2").render(
        title=title, summary=[s.removeprefix("- ") for s in summary], header=header, body=body,
        has_results=bool(rows), metrics_note=metrics_note(), intervals_note=INTERVALS_NOTE,
        comparisons=comparisons, comparisons_note=COMPARISONS_NOTE, sections=plugin_sections,
        images=[(caption, base64.b64encode(p.read_bytes()).decode()) for caption, p in images])
