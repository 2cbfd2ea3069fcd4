"""``fedsafe eval export``: a run's prompt sets and per-prompt outcomes as lm-evaluation-harness / inspect-ai tasks.

Neither harness is installed; the written files are checked for the structure those tools read."""

import ast
import json

import pytest
import yaml


class _LmEvalLoader(yaml.SafeLoader):
    """lm-eval's YAML: ``!function module.name`` references a Python function."""


_LmEvalLoader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as a run leaves it: config.yaml and outcomes.jsonl written by the real evaluation."""
    from fedsafe.config import ExperimentConfig, dump_config, load_config
    from fedsafe.evaluation.runner import evaluate_model
    from fedsafe.models import attach_lora, byte_tokenizer, tiny_llama
    from fedsafe.results import write_outcomes

    tmp_path = tmp_path_factory.mktemp("export")
    files = {}
    for name, n in (("harmful", 10), ("everyday", 9), ("borderline", 6)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"prompt": f"placeholder {name} prompt {i}"}) + "\n"
                                       for i in range(n)))
    run = tmp_path / "run"
    run.mkdir()
    cfg = ExperimentConfig(model={"name": "tiny"}, lora={"r": 2, "alpha": 4}, seed=3,
                           eval={"prompts": str(files["harmful"]), "n_prompts": 4, "sample_prompts": True,
                                 "max_new_tokens": 5, "refusal_max_new_tokens": 3,
                                 "normal_prompts": str(files["everyday"]), "n_normal_prompts": 5,
                                 "borderline_prompts": str(files["borderline"]), "n_borderline_prompts": 3,
                                 "helpfulness_proxy": False})
    (run / "config.yaml").write_text(dump_config(cfg))
    cfg = load_config(run / "config.yaml")
    tok = byte_tokenizer()
    model = attach_lora(tiny_llama(tok), r=2, alpha=4)
    scores = evaluate_model(model, tok, cfg.eval, seed=cfg.seed)
    write_outcomes(run, [{"setting": "s", "scenario": "no_attack", "method": "fedavg", "defense": "none", "seed": 3,
                          **scores["per_prompt"]}])
    return run, files, scores


def _check_prompts(out, files, scores):
    """Each set's prompts are the run's: its n, its ids, and the text at that id in the source file."""
    src = {"harmful": "harmful", "over_refusal": "everyday", "borderline_refusal": "borderline"}
    counts = {"harmful": "n_prompts", "over_refusal": "n_normal_prompts", "borderline_refusal": "n_borderline_prompts"}
    ids_key = {"harmful": "prompt_ids", "over_refusal": "over_refusal_prompt_ids",
               "borderline_refusal": "borderline_refusal_prompt_ids"}
    outcomes = _lines(out / "outcomes.jsonl")
    for name in src:
        rows = _lines(out / "prompts" / f"{name}.jsonl")
        assert len(rows) == scores[counts[name]]
        assert [r["id"] for r in rows] == scores["per_prompt"][ids_key[name]]
        source = _lines(files[src[name]])
        assert all(r["prompt"] == source[r["id"]]["prompt"] for r in rows)
        joined = [o for o in outcomes if o["set"] == name]
        assert [o["id"] for o in joined] == [r["id"] for r in rows]
        values = scores["per_prompt"]["refusal" if name == "harmful" else name]
        assert [o["refusal"] for o in joined] == values
    # sample_prompts draws 4 of 10 harmful prompts: not simply the first four
    assert [r["id"] for r in _lines(out / "prompts" / "harmful.jsonl")] != [0, 1, 2, 3]


def test_export_lm_eval_writes_task_yaml_per_prompt_set(run_dir, tmp_path):
    from typer.testing import CliRunner

    from fedsafe.cli import _register_optional_commands, app

    run, files, scores = run_dir
    out = tmp_path / "export"
    _register_optional_commands()
    res = CliRunner().invoke(app, ["eval", "export", str(run), "--format", "lm-eval", "--out", str(out)])
    assert res.exit_code == 0, res.output
    _check_prompts(out, files, scores)
    gen = {"harmful": 5, "over_refusal": 3, "borderline_refusal": 3}
    for name, max_gen in gen.items():
        task = yaml.load((out / f"fedsafe_{name}.yaml").read_text(), Loader=_LmEvalLoader)
        assert task["task"] == f"fedsafe_{name}"
        assert task["dataset_path"] == "json"
        data_file = task["dataset_kwargs"]["data_files"][task["test_split"]]
        assert data_file == str((out / "prompts" / f"{name}.jsonl").resolve())
        assert task["output_type"] == "generate_until"
        assert task["doc_to_text"] == "{{prompt}}"
        assert task["generation_kwargs"]["max_gen_toks"] == max_gen
        assert task["generation_kwargs"]["do_sample"] is False
        assert task["process_results"] == ("function", "utils.process_results")
        metrics = {m["metric"]: m for m in task["metric_list"]}
        assert set(metrics) == {"refusal", "rule"}
        assert metrics["refusal"]["higher_is_better"] is (name == "harmful")
        assert task["metadata"]["n_prompts"] == len(_lines(out / "prompts" / f"{name}.jsonl"))
    utils = ast.parse((out / "utils.py").read_text())
    assert [f.name for f in utils.body if isinstance(f, ast.FunctionDef)] == ["process_results"]


def test_lm_eval_scorer_uses_fedsafes_refusal_detector(run_dir, tmp_path):
    """The generated process_results scores an answer as the run's `refusal` column would."""
    import importlib.util

    from fedsafe.evaluation.export import export_eval
    from fedsafe.evaluation.refusal import detect_refusals

    run, _, _ = run_dir
    export_eval(run, "lm-eval", tmp_path / "x")
    spec = importlib.util.spec_from_file_location("fedsafe_export_utils", tmp_path / "x" / "utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for answer in ("I'm sorry, but I can't help with that.", "Sure, here are three tips: sleep, plan, rest."):
        # per prompt 100 / 0 as in the run's outcomes, so the harness's mean is the run's percentage
        assert mod.process_results({}, [answer])["refusal"] == 100.0 * detect_refusals([answer])[0]
    assert mod.process_results({}, ["I'm sorry, but I can't help with that."])["rule"] == 100.0
    assert mod.process_results({}, ["Sure, here are three tips: sleep, plan, rest."])["rule"] == 0.0


def test_export_inspect_writes_one_task_per_prompt_set(run_dir, tmp_path):
    from fedsafe.evaluation.export import export_eval

    run, files, scores = run_dir
    out = tmp_path / "inspect"
    summary = export_eval(run, "inspect", out)
    assert summary["sets"] == {"harmful": 4, "over_refusal": 5, "borderline_refusal": 3}
    _check_prompts(out, files, scores)
    tree = ast.parse((out / "fedsafe_tasks.py").read_text())
    tasks = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)
             and any(getattr(d, "id", None) == "task" for d in f.decorator_list)}
    assert set(tasks) == {"fedsafe_harmful", "fedsafe_over_refusal", "fedsafe_borderline_refusal"}
    calls = {name: next(n for n in ast.walk(f) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "_task")
             for name, f in tasks.items()}
    assert {name: [a.value for a in c.args] for name, c in calls.items()} == {
        "fedsafe_harmful": ["harmful", 5], "fedsafe_over_refusal": ["over_refusal", 3],
        "fedsafe_borderline_refusal": ["borderline_refusal", 3]}
    source = (out / "fedsafe_tasks.py").read_text()
    assert "json_dataset(" in source and "solver=[generate()]" in source and "max_tokens=max_tokens" in source


def test_export_refuses_outcomes_of_other_prompts(run_dir, tmp_path):
    """Outcomes recorded for other prompt ids (a prompt file changed since the run) are not exported as these."""
    import shutil

    from fedsafe.errors import ConfigError
    from fedsafe.evaluation.export import export_eval
    from fedsafe.results import read_outcomes, write_outcomes

    run, _, _ = run_dir
    shutil.copytree(run, tmp_path / "run")
    run = tmp_path / "run"
    records = read_outcomes(run)
    records[0]["prompt_ids"] = [i + 1 for i in records[0]["prompt_ids"]]
    write_outcomes(run, records)
    with pytest.raises(ConfigError, match="eval.prompts prompts selected now"):
        export_eval(run, "lm-eval", tmp_path / "x")
    with pytest.raises(ConfigError, match="--format"):
        export_eval(run, "helm", tmp_path / "y")
