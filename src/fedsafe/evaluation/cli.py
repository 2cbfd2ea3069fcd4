"""``fedsafe eval``: evaluate one adapter (or the base model) on harmful prompts and held-out answers."""

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
        from fedsafe.report import append_results

        tag = adapter.name if adapter else "base"
        row = {"scenario": scenario or (run_cfg.scenario if run_cfg and run_cfg.scenario else tag),
               "method": run_cfg.aggregator.name if run_cfg else model_name,
               "defense": "posthoc" if tag == "posthoc" else "none",
               **{k: scores.get(k) for k in SCORE_KEYS}}
        append_results(results, [row])
    if json_out is not None:
        json_out.write_text(json.dumps(scores, indent=2))
    print(yaml.safe_dump({k: scores.get(k) for k in SCORE_KEYS}, sort_keys=False).strip())
