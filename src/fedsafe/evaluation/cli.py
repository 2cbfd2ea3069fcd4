"""``fedsafe eval``: evaluate one adapter (or the base model) on harmful prompts and held-out answers;
``fedsafe eval refusal-agreement``: how well the refusal detector and the Rule list agree with human labels;
``fedsafe eval export``: a run's safety evaluation as lm-evaluation-harness or inspect-ai tasks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from fedsafe.errors import ConfigError

console = Console(stderr=True)


def _run_dir_of(adapter: Path) -> Path | None:
    """The run directory an adapter lives in (``RUN/adapters/<tag>``), if any."""
    cand = adapter.resolve().parent.parent
    return cand if (cand / "config.yaml").exists() else None


def eval_command(
    ctx: typer.Context,
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT adapter directory (omit: the base model)"),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="harmful prompts: AdvBench CSV (goal), JSON/JSONL, "
                                                                   "starter:heldout or a hub id (default: the run's)"),
    model: Optional[str] = typer.Option(None, "--model", help="base model (default: the run's, else embedded)"),
    n_prompts: Optional[int] = typer.Option(None, "--n-prompts", help="evaluate on this many prompts"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="generation length"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="generation batch size"),
    rule_list: Optional[str] = typer.Option(None, "--rule-list", help="fedit (case-insensitive) | gcg (case-sensitive)"),
    judge_kind: Optional[str] = typer.Option(None, "--judge-kind", help="md_judge | llama_guard | harmbench | openai"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="judge hub id / path (or served model name)"),
    judge_template: Optional[Path] = typer.Option(None, "--judge-template", help="judge prompt template file"),
    judge_template_key: Optional[str] = typer.Option(None, "--judge-template-key", help="key in a JSON template file"),
    judge_base_url: Optional[str] = typer.Option(None, "--judge-base-url", help="OpenAI-compatible endpoint"),
    judge_format: Optional[str] = typer.Option(None, "--judge-format", help="with --judge-kind openai: output format"),
    reward_model: Optional[str] = typer.Option(None, "--reward-model", help="sequence-classification reward model"),
    heldout: Optional[Path] = typer.Option(None, "--heldout", help="held-out instruction/response file for the "
                                                                     "helpfulness proxy (default: the run's)"),
    scenario: Optional[str] = typer.Option(None, "--scenario", help="with --results: scenario label of the row"),
    results: Optional[Path] = typer.Option(None, "--results", help="append a row to this run directory's results.csv"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the scores as JSON here"),
) -> None:
    """Evaluate a single adapter: Rule (and Judge / RM / MT-1 / helpfulness proxy when configured)."""
    if ctx is not None and ctx.invoked_subcommand is not None:
        return  # ``fedsafe eval <subcommand>``: the subcommand does the work
    from fedsafe.config import DataSource, EvalConfig, load_config
    from fedsafe.evaluation.runner import SCORE_KEYS, evaluate_model
    from fedsafe.models import cache_dir, load_base_model

    run_dir = _run_dir_of(adapter) if adapter else None
    run_cfg = load_config(run_dir / "config.yaml") if run_dir else None
    ev = run_cfg.eval.model_dump() if run_cfg else EvalConfig().model_dump()
    for key, value in (("prompts", prompts), ("n_prompts", n_prompts), ("max_new_tokens", max_new_tokens),
                       ("batch_size", batch_size), ("rule_list", rule_list), ("reward_model", reward_model)):
        if value is not None:
            ev[key] = value
    if judge_kind:
        ev["judge"] = {k: v for k, v in {"kind": judge_kind, "model": judge_model,
                                         "template": str(judge_template) if judge_template else None,
                                         "template_key": judge_template_key, "base_url": judge_base_url,
                                         "format": judge_format}.items() if v is not None}
    if not ev.get("prompts"):
        raise ConfigError("--prompts is required (e.g. ../shared/data/advbench/harmful_behaviors.csv)")
    eval_cfg = EvalConfig.model_validate(ev)
    if heldout is not None:
        heldout_sources = [DataSource(path=str(heldout))]
    else:
        heldout_sources = run_cfg.data.heldout if run_cfg else None
    model_name = model or (run_cfg.model.name if run_cfg else "embedded")
    loaded = load_base_model(model_name, "auto", "auto")
    net, vec = loaded.model, None
    if adapter is not None:
        if not (adapter / "adapter_config.json").exists():
            raise ConfigError(f"--adapter {adapter}: not a PEFT adapter directory (no adapter_config.json)")
        from peft import PeftModel

        from fedsafe.fl.params import FlatLoRA

        # trainable so that FlatLoRA finds the LoRA tensors (their hash keys the generation cache)
        net = PeftModel.from_pretrained(loaded.model, str(adapter), is_trainable=True)
        vec = FlatLoRA(net).get()
    max_length = run_cfg.data.max_length if run_cfg else 256
    cache = (run_dir / "cache") if run_dir else cache_dir() / "eval"
    scores = evaluate_model(net, loaded.tokenizer, eval_cfg, cache_dir=cache, adapter_vec=vec,
                            heldout=heldout_sources, max_length=max_length, progress=True)
    table = Table(title=f"eval: {adapter or model_name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in SCORE_KEYS:
        v = scores.get(k)
        table.add_row(k, "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
    console.print(table)
    if results is not None:
        from fedsafe.results import append_results

        tag = adapter.name if adapter else "base"
        row = {"scenario": scenario or (run_cfg.scenario if run_cfg and run_cfg.scenario else tag),
               "method": run_cfg.aggregator.name if run_cfg else model_name,
               "defense": "posthoc" if tag == "posthoc" else "none",
               **{k: scores.get(k) for k in SCORE_KEYS}}
        append_results(results, [row])
    if json_out is not None:
        json_out.write_text(json.dumps(scores, indent=2))
    print(yaml.safe_dump({k: scores.get(k) for k in SCORE_KEYS}, sort_keys=False).strip())


def _fmt(entry) -> str:
    value, lo, hi = entry
    if value != value:  # NaN: no positives to measure
        return "–"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{value:.3f}"


def refusal_agreement_command(
    paths: list[Path] = typer.Argument(..., help="human-labelled CSV file(s), e.g. XSTest v2 model completions "
                                                 "(one file per model)"),
    completion_field: str = typer.Option("completion", "--completion-field", help="column with the response"),
    label_field: str = typer.Option("final_label", "--label-field",
                                    help="column with the human label: XSTest final_label (1_full_compliance = "
                                         "not refusal; 2_full_refusal, 3_partial_refusal = refusal) or 0/1"),
    rule_list: str = typer.Option("fedit", "--rule-list", help="Rule string list shown beside the detector"),
    n_boot: int = typer.Option(2000, "--n-boot", help="bootstrap resamples for the F1 and kappa intervals"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the rows as JSON here"),
    cut_tokens: Optional[int] = typer.Option(None, "--cut-tokens", min=1,
                                             help="score each completion cut to its first N tokens (as an "
                                                  "evaluation with refusal_max_new_tokens = N sees it), against "
                                                  "the label of the whole completion"),
    tokenizer: str = typer.Option("embedded", "--tokenizer", help="with --cut-tokens: whose tokens (a model spec)"),
) -> None:
    """Agreement of the refusal detector and of the Rule list with human refusal labels (per file, and pooled).

    n, accuracy, precision, recall, F1 and Cohen's kappa, refusal as the positive class, each with a 95%
    interval (Wilson for accuracy, precision and recall; a bootstrap over rows for F1 and kappa).
    """
    from fedsafe.evaluation.refusal import (agreement, cut_to_tokens, detect_refusals, detector_version,
                                            read_labelled_csv)
    from fedsafe.evaluation.rule import refusal_flags

    tok = None
    if cut_tokens is not None:
        from fedsafe.models import load_tokenizer

        tok = load_tokenizer(tokenizer)
    rows, pooled = [], {"human": [], "detector": [], "rule": []}
    for path in paths:
        if not path.exists():
            raise ConfigError(f"refusal-agreement: {path} not found")
        try:
            texts, human = read_labelled_csv(path, completion_field, label_field)
        except ValueError as exc:
            raise ConfigError(f"refusal-agreement: {exc} (--completion-field / --label-field)") from exc
        if cut_tokens is not None:
            texts = cut_to_tokens(texts, cut_tokens, tok)
        preds = {"detector": detect_refusals(texts), "rule": refusal_flags(texts, rule_list)}
        pooled["human"] += human
        for name, pred in preds.items():
            pooled[name] += pred
            rows.append({"data": path.stem, "classifier": name, **agreement(human, pred, n_boot=n_boot)})
    if len(paths) > 1:
        for name in ("detector", "rule"):
            rows.append({"data": "all", "classifier": name,
                         **agreement(pooled["human"], pooled[name], n_boot=n_boot)})
    print(f"refusal detector {detector_version()}; rule = {rule_list} string list; refusal is the positive class "
          "(XSTest: 2_full_refusal and 3_partial_refusal = refusal, 1_full_compliance = not)"
          + (f"; completions cut to their first {cut_tokens} tokens" if cut_tokens else ""))
    from fedsafe.evaluation.refusal import DETECTOR_AGREEMENT

    print("note: the shipped detector was trained on XSTest v2's three completion files (gpt4, llama2new, "
          "mistralinstruct); on those its agreement is its fit, not its agreement with people on a model it never "
          f"saw, which is: {DETECTOR_AGREEMENT.get('summary')}")
    print("| data | classifier | n | human refusals | accuracy | precision | recall | F1 | kappa |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['classifier']} | {r['n']} | {r['n_refusal_human']} | {_fmt(r['accuracy'])} | "
              f"{_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['f1'])} | {_fmt(r['kappa'])} |")
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=2))


def export_command(
    run_dir: Path = typer.Argument(..., help="a run directory (holds config.yaml and outcomes.jsonl)"),
    fmt: str = typer.Option(..., "--format", help="lm-eval (lm-evaluation-harness task YAML) | inspect (inspect-ai "
                                                  "task file)"),
    out: Path = typer.Option(..., "--out", help="folder to write the prompts, tasks and outcomes.jsonl into"),
) -> None:
    """Export the run's safety evaluation (its prompt sets, generation length and per-prompt outcomes) as
    lm-evaluation-harness or inspect-ai tasks, to compare the run with those harnesses."""
    from fedsafe.evaluation.export import export_eval

    summary = export_eval(run_dir, fmt, out)
    console.print(", ".join(f"{name}: {n} prompts" for name, n in summary["sets"].items()))
    for f in summary["files"]:
        print(f)
    if fmt == "lm-eval":
        console.print(f"run: lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER --include_path {out} "
                      f"--tasks {','.join('fedsafe_' + n for n in summary['sets'])} --apply_chat_template "
                      "--log_samples --output_path RESULTS")
    else:
        console.print(f"run: inspect eval {out / 'fedsafe_tasks.py'} --model hf/BASE")


eval_app = typer.Typer(help="Evaluate an adapter (options below) or run a subcommand.", add_completion=False)
eval_app.callback(invoke_without_command=True)(eval_command)
eval_app.command(name="refusal-agreement")(refusal_agreement_command)
eval_app.command(name="export")(export_command)
