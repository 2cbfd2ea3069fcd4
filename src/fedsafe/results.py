"""Results I/O, low level: ``results.csv`` (one row per evaluated model, the metric table's columns) and
``outcomes.jsonl`` (per-prompt outcomes), read and written atomically, plus the one figure saver.

The run (:mod:`fedsafe.pipeline`), the grid and the evaluation commands write results here; the report
(:mod:`fedsafe.report`) only presents them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from fedsafe.io import atomic_write_text

# the metric table: the columns of results.csv, their kinds and headers
RESULT_COLUMNS = ["setting", "scenario", "method", "defense", "seed", "rule", "refusal", "over_refusal", "borderline_refusal",
                  "judge", "rm", "mt1", "helpfulness_proxy", "n_prompts", "n_normal_prompts", "n_borderline_prompts",
                  "defends"]
COUNT_COLUMNS = ("seed", "n_prompts", "n_normal_prompts", "n_borderline_prompts")
KEY_COLUMNS = ("setting", "scenario", "method", "defense")  # one summary row per key, over its seeds
# "defends": a defended model's row names the scenario of the trained model it defends (written by the pipeline
# for every after-training defense's Output, empty for an undefended row); read it with defended_scenario
TEXT_COLUMNS = (*KEY_COLUMNS, "defends")
# metrics outcomes.jsonl holds per prompt (paired prompt by prompt); over-refusal and borderline refusal are
# measured on their own prompt sets and stored with their own ``<metric>_prompt_ids``
PER_PROMPT_METRICS = ("rule", "refusal", "over_refusal", "borderline_refusal", "judge", "rm")
PERCENT_METRICS = ("rule", "refusal", "over_refusal", "borderline_refusal", "judge")
METRIC_HEADERS = {"rule": "Rule (%) ↑", "refusal": "Refused harmful (%) ↑", "over_refusal": "Over-refusal (%) ↓", "borderline_refusal":
                  "Borderline refusal (%) ↓", "judge": "Judge (%) ↑", "rm": "RM ↑", "mt1": "MT-1 ↑",
                  "helpfulness_proxy": "Helpfulness proxy (ppl) ↓"}


# ------------------------------------------------------------------------------------------------
# results.csv and outcomes.jsonl
# ------------------------------------------------------------------------------------------------

def format_cell(value) -> str:
    """A results.csv cell: empty for None and NaN, 6 significant digits for floats."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def defended_scenario(row: dict) -> str | None:
    """The scenario of the trained model a defended row (``defense`` other than none) defends, or None for an
    undefended row: its ``defends`` field. A row written before that field existed (an older results.csv or
    metrics.jsonl) named it only in its scenario, as the pipeline then wrote it: ``<scenario>_posthoc``."""
    if row.get("defense", "none") == "none":
        return None
    return row.get("defends") or str(row.get("scenario") or "").removesuffix("_posthoc")


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
                if col in TEXT_COLUMNS:
                    row[col] = v
                elif v == "":
                    row[col] = None
                else:
                    row[col] = int(float(v)) if col in COUNT_COLUMNS else float(v)
            rows.append(row)
    return rows


def write_results(run_dir: str | Path, rows: list[dict]) -> Path:
    """(Re)write ``results.csv`` with exactly :data:`RESULT_COLUMNS`, atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for r in rows:
        writer.writerow([format_cell(r.get(c)) for c in RESULT_COLUMNS])
    path = Path(run_dir) / "results.csv"
    atomic_write_text(path, buf.getvalue())
    return path


def append_results(run_dir: str | Path, rows: list[dict]) -> Path:
    """Append evaluation rows to ``results.csv`` (created with its header on first use)."""
    return write_results(run_dir, read_results(run_dir) + list(rows))


def read_outcomes(run_dir: str | Path) -> list[dict]:
    """The records of ``outcomes.jsonl``: key columns, seed, ``prompt_ids`` and per-prompt metric lists."""
    return _read_jsonl(Path(run_dir) / "outcomes.jsonl")


def _read_jsonl(path: Path) -> list[dict]:
    """The JSON records of a JSONL file ([] when it is missing); a torn last line from a crash is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def write_outcomes(run_dir: str | Path, records: list[dict]) -> Path:
    """(Re)write ``outcomes.jsonl``, atomically."""
    path = Path(run_dir) / "outcomes.jsonl"
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def append_outcomes(run_dir: str | Path, records: list[dict]) -> Path:
    """Append per-prompt outcome records to ``outcomes.jsonl``."""
    return write_outcomes(run_dir, read_outcomes(run_dir) + list(records))


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------

def pyplot():
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` to ``path`` atomically (a temp file, then rename) and close it: the one figure saver."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    pyplot().close(fig)
    return path
