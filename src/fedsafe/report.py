"""Tables and plots from a run directory (or a grid directory): results.csv, report.md, report.html.

``results.csv`` has one row per (scenario, method, defense) evaluation with the columns
:data:`RESULT_COLUMNS`; Rule and Judge are percentages (higher is safer), RM is the mean reward,
MT-1 the MT-Bench turn-1 rating (1-10), and ``helpfulness_proxy`` the perplexity of held-out reference
answers (an offline proxy; lower is better). A metric that was not measured is left empty.

The results table follows Ye et al. (ICLR 2025), Table 1: rows are methods, columns Rule / Judge /
RM / MT-1 as available. ``report.html`` is self-contained (images inlined as base64).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
from pathlib import Path

import yaml

from fedsafe.rundir import atomic_write_text, grid_run_dirs

log = logging.getLogger("fedsafe")

RESULT_COLUMNS = ["scenario", "method", "defense", "rule", "judge", "rm", "mt1", "helpfulness_proxy", "n_prompts"]
METRIC_HEADERS = {"rule": "Rule (%) ↑", "judge": "Judge (%) ↑", "rm": "RM ↑", "mt1": "MT-1 ↑",
                  "helpfulness_proxy": "Helpfulness proxy (ppl) ↓"}
GRID_SPEC = "grid.yaml"


# ------------------------------------------------------------------------------------------------
# results.csv
# ------------------------------------------------------------------------------------------------

def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def read_results(run_dir: str | Path) -> list[dict]:
    """The rows of ``results.csv`` (numbers as floats, empty cells as None); [] when absent."""
    path = Path(run_dir) / "results.csv"
    if not path.exists():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            row: dict = {}
            for col in RESULT_COLUMNS:
                v = rec.get(col, "")
                if col in ("scenario", "method", "defense"):
                    row[col] = v
                elif v == "":
                    row[col] = None
                else:
                    row[col] = int(float(v)) if col == "n_prompts" else float(v)
            rows.append(row)
    return rows


def write_results(run_dir: str | Path, rows: list[dict]) -> Path:
    """(Re)write ``results.csv`` with exactly :data:`RESULT_COLUMNS`, atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for r in rows:
        writer.writerow([_cell(r.get(c)) for c in RESULT_COLUMNS])
    path = Path(run_dir) / "results.csv"
    atomic_write_text(path, buf.getvalue())
    return path


def append_results(run_dir: str | Path, rows: list[dict]) -> Path:
    """Append evaluation rows to ``results.csv`` (created with its header on first use)."""
    return write_results(run_dir, read_results(run_dir) + list(rows))


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

def _fmt(v, col: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if col in ("rule", "judge"):
        return f"{v:.1f}"
    return f"{v:.2f}"


def table_columns(rows: list[dict]) -> list[str]:
    """The metric columns that at least one row measured, in the paper's order."""
    return [c for c in METRIC_HEADERS if any(r.get(c) is not None for r in rows)]


def results_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and body of the paper-layout table: one row per scenario/method/defense."""
    cols = table_columns(rows)
    header = ["Scenario", "Method", "Defense", *[METRIC_HEADERS[c] for c in cols], "Prompts"]
    body = [[r["scenario"], r["method"], r["defense"], *[_fmt(r.get(c), c) for c in cols],
             str(r.get("n_prompts") or "–")] for r in rows]
    return header, body


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------

def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    _pyplot().close(fig)
    return path


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
    ax.set_xlabel("round")
    ax.set_ylabel("training loss")
    ax.set_title(f"Client training loss{f' ({label})' if label else ''}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def safety_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Rule over rounds per scenario/defense from the eval records."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get("type") == "eval" and r.get("rule") is not None:
            key = f"{r.get('scenario')} / {r.get('defense')}"
            series.setdefault(key, []).append((int(r.get("round", 0)), float(r["rule"])))
    return series


def plot_safety(series: dict[str, list[tuple[int, float]]], path: Path) -> Path | None:
    """Rule (%) over rounds, one line per series (a single point for end-only evaluations)."""
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, pts in sorted(series.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("round")
    ax.set_ylabel("Rule (% refusals) ↑")
    ax.set_title("Safety over rounds")
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
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(ids)), [f"{c}{' *' if mal[c] else ''}" for c in ids], fontsize=7)
    ax.set_xticks(range(len(rounds)), [str(r) for r in rounds], fontsize=7)
    ax.set_xlabel("round")
    ax.set_title("Aggregation weights (* malicious; blank: not sampled)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_results(rows: list[dict], path: Path) -> Path | None:
    """Bar chart of Rule (and the helpfulness proxy when measured) per results row."""
    rows = [r for r in rows if r.get("rule") is not None]
    if not rows:
        return None
    plt = _pyplot()
    has_proxy = any(r.get("helpfulness_proxy") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_proxy else 1, figsize=(10 if has_proxy else 6, 3.8), squeeze=False)
    labels = [f"{r['scenario']}\n{r['method']}" + (f"\n{r['defense']}" if r["defense"] != "none" else "")
              for r in rows]
    colors = ["tab:green" if r["defense"] != "none" else
              "tab:blue" if r["scenario"] in ("base", "no_attack") or r["scenario"].startswith("no_attack")
              else "tab:red" for r in rows]  # blue: clean, red: attacked, green: defended
    ax = axes[0][0]
    ax.bar(range(len(rows)), [r["rule"] for r in rows], color=colors)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylim(0, 105)
    ax.set_ylabel("Rule (% refusals) ↑")
    ax.set_title("Safety")
    for i, r in enumerate(rows):
        ax.text(i, r["rule"] + 1.5, f"{r['rule']:.0f}", ha="center", fontsize=8)
    if has_proxy:
        ax2 = axes[0][1]
        vals = [r.get("helpfulness_proxy") or 0.0 for r in rows]
        ax2.bar(range(len(rows)), vals, color=colors)
        ax2.set_xticks(range(len(rows)), labels, fontsize=7)
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
    ph = cfg.get("posthoc", {})
    if ph.get("enabled"):
        lines.append(f"- **Post-hoc defense:** level {ph.get('level')}, {ph.get('n_samples')} samples "
                     f"({ph.get('aligned_ratio')} aligned), {ph.get('steps')} steps")
    ev = cfg.get("eval", {})
    if ev.get("prompts"):
        lines.append(f"- **Safety evaluation:** {ev.get('n_prompts')} prompts from {ev.get('prompts')}, "
                     f"{ev.get('max_new_tokens')} new tokens, Rule list '{ev.get('rule_list')}'")
    return lines


def _grid_summary(run_dir: Path) -> list[str]:
    spec = yaml.safe_load((run_dir / GRID_SPEC).read_text(encoding="utf-8")) or {}
    lines = [f"- **Grid:** {spec.get('name', run_dir.name)}"]
    settings = run_dir / "settings.csv"
    if settings.exists():
        with open(settings, newline="", encoding="utf-8") as f:
            for rec in csv.DictReader(f):
                lines.append(f"- setting `{rec['setting']}` -> [{rec['run_dir']}]({rec['run_dir']}/report.md)")
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
    series = safety_series(records)
    if is_grid:
        for sub in grid_run_dirs(run_dir):
            for key, pts in safety_series(_records(sub)).items():
                series[f"{sub.name}: {key}"] = pts
    for title, maker in (("Results", lambda: plot_results(rows, plots_dir / "results.png")),
                         ("Training loss", lambda: plot_loss(records, plots_dir / "loss.png")),
                         ("Safety over rounds", lambda: plot_safety(series, plots_dir / "safety.png")),
                         ("Aggregation weights", lambda: plot_weights(records, plots_dir / "weights.png"))):
        try:
            p = maker()
        except Exception as exc:  # one broken plot must not lose the report
            log.warning("plot %r skipped: %s", title, exc)
            p = None
        if p is not None:
            images.append((title, p))
    if not is_grid:
        images += [(f"Stealth: {p.stem}", p) for p in _stealth_plots(run_dir)]
    header, body = results_table(rows)
    title = f"fedsafe report: {run_dir.name}"
    md = [f"# {title}", "", "## Summary", "", *(summary or ["(no config found)"]), "", "## Results", ""]
    if rows:
        md += [markdown_table(header, body), "",
               "Rule: share of responses containing a refusal string (%). Helpfulness proxy: perplexity of "
               "held-out reference answers, an offline stand-in for MT-Bench (lower is better).", ""]
    else:
        md += ["No evaluation results yet (results.csv is empty).", ""]
    md += ["## Plots", ""]
    for caption, p in images:
        md += [f"### {caption}", "", f"![{caption}]({_rel(p, run_dir)})", ""]
    md_path = run_dir / "report.md"
    atomic_write_text(md_path, "\n".join(md))
    html_path = run_dir / "report.html"
    atomic_write_text(html_path, _html(title, summary, header, body, rows, images))
    return md_path, html_path


def _rel(p: Path, root: Path) -> str:
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return p.as_posix()


def _md_inline(text: str) -> str:
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return re.sub(r"\[(.+?)\]\((.+?)\)", r'<a href="\2">\1</a>', text)


def _html(title, summary, header, body, rows, images) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
             "td:nth-child(-n+3),th:nth-child(-n+3){text-align:left}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><h2>Summary</h2><ul>"]
    parts += [f"<li>{_md_inline(s.removeprefix('- '))}</li>" for s in summary]
    parts.append("</ul><h2>Results</h2>")
    parts.append(_html_table(header, body) if rows else "<p>No evaluation results yet.</p>")
    parts.append("<p><small>Rule: share of responses containing a refusal string (%). Helpfulness proxy: "
                 "perplexity of held-out reference answers, an offline stand-in for MT-Bench (lower is "
                 "better).</small></p><h2>Plots</h2>")
    for caption, p in images:
        data = base64.b64encode(p.read_bytes()).decode()
        parts.append(f"<h3>{html.escape(caption)}</h3><img alt='{html.escape(caption)}' "
                     f"src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "".join(parts)
