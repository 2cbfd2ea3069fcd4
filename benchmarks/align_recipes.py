"""Build ``model.align`` recipes once each and score their base models: how the aligned start refuses.

    .venv/bin/python benchmarks/align_recipes.py [CONFIG] [--variant 'NAME:{yaml mapping}' ...] [--out recipes.csv]

    .venv/bin/python benchmarks/align_recipes.py configs/demo.yaml \\
        --variant 'config:{}' --variant 'ratio25:{aligned_ratio: 0.25}' --variant 'steps96:{steps: 96}' \\
        --variant 'code:{normal: [{path: ../../shared/data/fedllm_attack/Mistral/helpfulQA.json, holdout: train},
                                  {path: ../../shared/data/codealpaca/code_alpaca_2k.json, response_field: output}]}'

The no-attack reference of a federation that starts aligned inherits the aligned start's refusals, so this
script answers "which start?" before a multi-seed run does. CONFIG is a run or grid file with a ``model.align``
section (a grid file's first setting is used); each variant replaces fields of that section (a YAML mapping:
numbers, or data-source lists whose relative paths are relative to CONFIG, as in the file). Every variant is
built through :func:`fedsafe.alignment.aligned_model_dir` (cached under ``$FEDSAFE_CACHE/models``, so a rerun
only evaluates) and scored with CONFIG's ``eval`` section by
:func:`fedsafe.evaluation.runner.evaluate_model`: Rule and the detector's share on the harmful prompts,
over-refusal on ``eval.normal_prompts`` **split by source** when it is a list (held-out rows of the clients' own
file can hide a refusal habit that another public set shows), borderline refusal, the helpfulness proxy; each
share with its 95% Wilson interval over prompts.

One build is one training run: neighbouring recipes can differ by more than any trend between them, so read the
table as a spread, and never pick the recipe that scored best on the prompts you then report (that fits the
evaluation set; docs/demo.md).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def parse_variant(text: str, root: Path) -> tuple[str, dict]:
    """``NAME:{yaml mapping}`` -> (NAME, fields), data-source paths resolved relative to ``root``."""
    from fedsafe.config import _resolve_paths

    name, sep, body = text.partition(":")
    if not sep or not name.strip():
        raise SystemExit(f"--variant {text!r}: expected NAME:{{yaml mapping}}, e.g. 'ratio25:{{aligned_ratio: 0.25}}'")
    try:
        fields = yaml.safe_load(body) if body.strip() else {}
    except yaml.YAMLError as exc:
        raise SystemExit(f"--variant {name}: not a YAML mapping: {exc}") from None
    if not isinstance(fields, dict):
        raise SystemExit(f"--variant {name}: not a YAML mapping: {body!r}")
    _resolve_paths(fields, root)
    return name.strip(), fields


def share(flags: list[float]) -> tuple[float, float, float, int]:
    """Mean of 100/0 flags (%) with its 95% Wilson interval and n."""
    from fedsafe.stats import wilson_interval

    n = len(flags)
    if not n:
        return float("nan"), float("nan"), float("nan"), 0
    k = sum(1 for f in flags if f)
    lo, hi = wilson_interval(k, n)
    return 100 * k / n, 100 * lo, 100 * hi, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--variant", action="append", default=[], help="NAME:{yaml mapping} of model.align fields")
    ap.add_argument("--cache-dir", default=None, help="generation cache (default: none, every answer generated)")
    ap.add_argument("--out", default=None, help="write every row to this CSV")
    args = ap.parse_args(argv)

    from fedsafe.evaluation.runner import benign_sets, evaluate_model, prompt_source_names
    from fedsafe.grid import load_grid
    from fedsafe.run_model import load_model

    cfg_path = Path(args.config).resolve()
    try:
        _, settings = load_grid(str(cfg_path))
        cfg = settings[0][1]
    except Exception:  # a run file
        from fedsafe.config import load_config

        cfg = load_config(str(cfg_path))
    if cfg.model.align is None:
        raise SystemExit(f"{cfg_path}: model.align is not set: nothing to vary")
    variants = [parse_variant(v, cfg_path.parent) for v in (args.variant or ["config:{}"])]
    ev = cfg.eval
    selected = benign_sets(ev, cfg.seed).get("over_refusal")
    origin = prompt_source_names(selected[2], ev.normal_prompts) if selected else []
    names = list(dict.fromkeys(origin))

    rows = []
    for name, fields in variants:
        align = cfg.model.align.model_validate({**cfg.model.align.model_dump(), **fields})
        t0 = time.time()
        loaded = load_model(cfg.model.model_copy(update={"align": align}), seed=cfg.seed)
        built = time.time() - t0
        cache = Path(args.cache_dir) / name if args.cache_dir else None
        out = evaluate_model(loaded.model, loaded.tokenizer, ev, cache_dir=cache, heldout=cfg.data.heldout,
                             max_length=cfg.data.max_length, progress=True, seed=cfg.seed)
        pp = out.get("per_prompt", {})
        row = {"recipe": name, "fields": yaml.safe_dump(fields, default_flow_style=True).strip(),
               "load_or_build_s": round(built, 1), "rule": out["rule"], "refusal": out["refusal"]}
        flags = pp.get("over_refusal", [])
        for src in names:
            row[f"over_refusal[{src}]"] = share([f for f, o in zip(flags, origin) if o == src])
        row["over_refusal"] = share(flags)
        row["borderline_refusal"] = share(pp.get("borderline_refusal", []))
        row["helpfulness_proxy"] = out.get("helpfulness_proxy")
        rows.append(row)
        print(f"{name}: built/loaded in {built:.0f} s", file=sys.stderr, flush=True)

    def fmt(v):
        if isinstance(v, tuple):
            return "-" if v[3] == 0 else f"{v[0]:.1f} [{v[1]:.1f}, {v[2]:.1f}] n={v[3]}"
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    cols = [c for c in rows[0] if c != "fields"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r[c]) for c in cols) + " |")
    for r in rows:
        print(f"{r['recipe']}: {r['fields']}")
    if args.out:
        with open(args.out, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(list(rows[0]))
            for r in rows:
                w.writerow([v[0] if isinstance(v, tuple) else v for v in r.values()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
