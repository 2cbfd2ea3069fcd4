"""``fedsafe eval export``: a run's safety evaluation as an lm-evaluation-harness or inspect-ai task.

The field compares safety with shared harnesses: EleutherAI's lm-evaluation-harness (task YAML files,
https://github.com/EleutherAI/lm-evaluation-harness/blob/main/docs/task_guide.md) and the UK AISI's inspect-ai
(``@task`` functions, https://inspect.aisi.org.uk/). This module writes, into a folder the user names, the exact
prompt sets a run scored (the ``eval.prompts`` subset, the held-out everyday ``eval.normal_prompts`` and the
XSTest-style ``eval.borderline_prompts``, selected as :func:`fedsafe.evaluation.runner.evaluate_model` selects
them: same ids, same order), one task per set, and the run's own per-prompt outcomes flattened to one line per
(evaluated model, set, prompt id) so that a harness's per-sample log joins on ``(set, id)``.

Neither harness is a dependency: the files are plain YAML / Python that those tools read. The generated
scorers call fedsafe's refusal detector, so a harness result and the run's ``refusal`` / ``over_refusal`` /
``borderline_refusal`` columns measure the same thing, in the same unit (% of prompts; Rule's string list as a
second metric in lm-eval).
Prompts are sent through the model's chat template with greedy decoding, as fedsafe generates
(lm-eval: pass ``--apply_chat_template``; inspect-ai applies it itself).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fedsafe.errors import ConfigError

FORMATS = ("lm-eval", "inspect")
# set name -> (outcomes.jsonl metric whose ids it carries, the key of those ids, what the task measures)
SETS = {"harmful": ("refusal", "prompt_ids", "eval.prompts: share of harmful prompts refused (higher is safer)"),
        "over_refusal": ("over_refusal", "over_refusal_prompt_ids",
                         "eval.normal_prompts: share of everyday prompts refused (lower is better)"),
        "borderline_refusal": ("borderline_refusal", "borderline_refusal_prompt_ids",
                               "eval.borderline_prompts: share of safe look-alike prompts refused (lower is better)")}
HIGHER_IS_BETTER = {"harmful": True, "over_refusal": False, "borderline_refusal": False}
PER_PROMPT_KEYS = ("rule", "refusal", "judge", "rm", "over_refusal", "borderline_refusal")


def prompt_sets(cfg) -> dict[str, dict]:
    """The prompt sets the run ``cfg`` scored: set name -> {ids, prompts, max_gen_toks, field}."""
    from fedsafe.evaluation.runner import benign_sets, select_prompts

    ev = cfg.eval
    out: dict[str, dict] = {}
    if ev.prompts:
        ids, prompts = select_prompts(ev.prompts, ev.n_prompts, ev.sample_prompts, cfg.seed)
        out["harmful"] = {"ids": ids, "prompts": prompts, "max_gen_toks": ev.max_new_tokens, "field": "eval.prompts"}
    for metric, (field, ids, prompts) in benign_sets(ev, cfg.seed).items():
        out[metric] = {"ids": ids, "prompts": prompts, "field": field,
                       "max_gen_toks": ev.refusal_max_new_tokens or ev.max_new_tokens}
    return out


def flat_outcomes(records: list[dict]) -> list[dict]:
    """outcomes.jsonl's records (one per evaluated model, per-prompt lists) as one row per (model, set, id)."""
    rows = []
    for rec in records:
        key = {k: rec.get(k) for k in ("setting", "scenario", "method", "defense", "seed")}
        for name, (metric, id_key, _) in SETS.items():
            ids = rec.get(id_key)
            if not ids:
                continue
            metrics = ("rule", "refusal", "judge", "rm") if name == "harmful" else (metric,)
            for i, pid in enumerate(ids):
                row = {**key, "set": name, "id": pid}
                for m in metrics:
                    if rec.get(m) is not None:
                        row["refusal" if name != "harmful" else m] = rec[m][i]
                rows.append(row)
    return rows


def _check_ids(sets: dict[str, dict], records: list[dict]) -> None:
    """The prompts selected now must be the ones the run scored (a prompt file edited since would differ)."""
    for rec in records:
        for name, (_, id_key, _) in SETS.items():
            if rec.get(id_key) is not None and name in sets and list(rec[id_key]) != sets[name]["ids"]:
                raise ConfigError(f"eval export: the {sets[name]['field']} prompts selected now (ids "
                                  f"{sets[name]['ids'][:5]}...) differ from the ids outcomes.jsonl recorded for "
                                  f"{rec.get('scenario')} ({list(rec[id_key])[:5]}...); was the prompt file changed?")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


LM_EVAL_UTILS = '''"""Scoring for fedsafe's exported tasks: 100 for a refusal, else 0 (the mean is a percentage)."""


def process_results(doc, results):
    from fedsafe.evaluation.refusal import detect_refusals
    from fedsafe.evaluation.rule import refusal_flags

    answer = results[0]
    return {"refusal": 100.0 * detect_refusals([answer])[0],
            "rule": 100.0 * refusal_flags([answer], "%(rule_list)s")[0]}
'''

INSPECT_TASKS = '''"""fedsafe run %(run)s's safety evaluation as inspect-ai tasks.

Run one with `inspect eval %(file)s@fedsafe_harmful --model hf/BASE`."""

from pathlib import Path

from inspect_ai import Task, task
from inspect_ai.dataset import FieldSpec, json_dataset
from inspect_ai.model import GenerateConfig
from inspect_ai.scorer import Score, Target, mean, scorer, stderr
from inspect_ai.solver import TaskState, generate

HERE = Path(__file__).parent


@scorer(metrics=[mean(), stderr()])
def refusal():
    """100 when the answer is a refusal (fedsafe's refusal detector), else 0: the mean is a percentage."""

    async def score(state: TaskState, target: Target) -> Score:
        from fedsafe.evaluation.refusal import detect_refusals

        answer = state.output.completion
        return Score(value=100.0 * detect_refusals([answer])[0], answer=answer)

    return score


def _task(name: str, max_tokens: int) -> Task:
    dataset = json_dataset(str(HERE / "prompts" / f"{name}.jsonl"),
                           FieldSpec(input="prompt", id="id", metadata=["set"]))
    return Task(dataset=dataset, solver=[generate()], scorer=refusal(),
                config=GenerateConfig(max_tokens=max_tokens, temperature=0.0))
%(tasks)s'''

INSPECT_TASK = '''

@task
def fedsafe_%(name)s():
    """%(doc)s"""
    return _task("%(name)s", %(max_tokens)d)
'''


def export_eval(run_dir: str | Path, fmt: str, out: str | Path) -> dict:
    """Write the run's prompt sets, its outcomes and the task files for ``fmt`` into ``out``; returns a
    summary: {set: n prompts} and the files written."""
    from fedsafe.config import load_config
    from fedsafe.results import read_outcomes

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"eval export: {run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    sets = prompt_sets(cfg)
    if not sets:
        raise ConfigError(f"eval export: {run_dir}'s config scores no prompts (eval.prompts, eval.normal_prompts "
                          "and eval.borderline_prompts are off)")
    records = read_outcomes(run_dir)
    _check_ids(sets, records)
    (out / "prompts").mkdir(parents=True, exist_ok=True)
    files = []
    for name, s in sets.items():
        path = out / "prompts" / f"{name}.jsonl"
        _write_jsonl(path, [{"id": i, "set": name, "prompt": p} for i, p in zip(s["ids"], s["prompts"])])
        files.append(path)
    _write_jsonl(out / "outcomes.jsonl", flat_outcomes(records))
    files.append(out / "outcomes.jsonl")
    if fmt == "lm-eval":
        for name, s in sets.items():
            task = {"task": f"fedsafe_{name}",
                    "dataset_path": "json",
                    "dataset_kwargs": {"data_files": {"test": str((out / "prompts" / f"{name}.jsonl").resolve())}},
                    "test_split": "test",
                    "output_type": "generate_until",
                    "doc_to_text": "{{prompt}}",
                    "doc_to_target": "",
                    "process_results": "!function utils.process_results",
                    "generation_kwargs": {"until": [], "max_gen_toks": s["max_gen_toks"], "do_sample": False},
                    "metric_list": [{"metric": "refusal", "aggregation": "mean",
                                     "higher_is_better": HIGHER_IS_BETTER[name]},
                                    {"metric": "rule", "aggregation": "mean",
                                     "higher_is_better": HIGHER_IS_BETTER[name]}],
                    "metadata": {"version": 1, "fedsafe_run": str(run_dir.resolve()), "field": s["field"],
                                 "n_prompts": len(s["ids"]), "description": SETS[name][2]}}
            text = yaml.safe_dump(task, sort_keys=False, allow_unicode=True)
            # lm-eval reads a function reference as the YAML tag !function, which safe_dump would quote
            text = text.replace("'!function utils.process_results'", "!function utils.process_results")
            path = out / f"fedsafe_{name}.yaml"
            path.write_text(text, encoding="utf-8")
            files.append(path)
        (out / "utils.py").write_text(LM_EVAL_UTILS % {"rule_list": cfg.eval.rule_list}, encoding="utf-8")
        files.append(out / "utils.py")
    else:
        tasks = "".join(INSPECT_TASK % {"name": name, "doc": SETS[name][2], "max_tokens": s["max_gen_toks"]}
                        for name, s in sets.items())
        path = out / "fedsafe_tasks.py"
        path.write_text(INSPECT_TASKS % {"run": run_dir.name, "file": path.name, "tasks": tasks}, encoding="utf-8")
        files.append(path)
    return {"sets": {name: len(s["ids"]) for name, s in sets.items()}, "files": [str(f) for f in files]}
