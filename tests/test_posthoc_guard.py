"""The post-hoc defense's utility guard (issue 19): validation rows held out of the defense data, the
perplexity curve, and the choice of the latest checkpoint within the budget. Neutral placeholders only."""

from __future__ import annotations

import math

import pytest
import torch

from fedsafe.config import FLConfig
from fedsafe.defenses.posthoc.finetune import defense_data, defense_rows, finetune, select_checkpoint, split_validation
from fedsafe.defenses.posthoc.config import PosthocConfig
from fedsafe.errors import ConfigError
from fedsafe.fl.params import FlatLoRA
from fedsafe.models import attach_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def rows(kind: str, n: int) -> list[dict]:
    return [{"instruction": f"{kind} question {i}", "response": f"{kind} answer {i} " * 3, "category": kind}
            for i in range(n)]


def test_select_latest_checkpoint_within_budget():
    curve = [(2, 10.2), (4, 10.9), (6, 10.4), (8, 11.5)]
    g = select_checkpoint(10.0, curve, 5.0)  # budget 10.5: steps 2 and 6 qualify, 6 is the latest
    assert g["selected_step"] == 6 and g["within_budget"] and g["budget_ppl"] == pytest.approx(10.5)
    assert g["rise_pct"] == pytest.approx(4.0)
    assert select_checkpoint(10.0, curve, 20.0)["selected_step"] == 8  # everything qualifies: the last step
    g = select_checkpoint(10.0, curve, 1.0)  # nothing within +1%: the lowest perplexity, flagged
    assert g["selected_step"] == 2 and not g["within_budget"]
    g = select_checkpoint(10.0, [(2, float("nan")), (4, 10.1)], 5.0)
    assert g["selected_step"] == 4  # NaN never qualifies
    with pytest.raises(ValueError):
        select_checkpoint(10.0, [], 5.0)


def test_validation_rows_are_never_trained_on(test_seed):
    aligned, normal = rows("aligned", 20), rows("normal", 30)
    normal += normal[:5]  # a pool may repeat instructions: the split is by instruction
    train_pool, val = split_validation(normal, 6, test_seed)
    assert len(val) == 6 and len({r["instruction"] for r in val}) == 6
    assert not {r["instruction"] for r in val} & {r["instruction"] for r in train_pool}
    assert split_validation(normal, 0, test_seed) == (normal, [])
    with pytest.raises(ConfigError, match="validation_rows=30"):
        split_validation(normal, 30, test_seed)


def test_defense_data_without_guard_is_unchanged(tmp_path, test_seed):
    import json

    for name, data in (("aligned", rows("aligned", 20)), ("normal", rows("normal", 30))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    src = {"aligned": [{"path": str(tmp_path / "aligned.jsonl")}], "normal": [{"path": str(tmp_path / "normal.jsonl")}]}
    plain = PosthocConfig(enabled=True, n_samples=16, **src)
    guarded = PosthocConfig(enabled=True, n_samples=16, validation_rows=5, **src)
    r0, v0 = defense_data(plain, test_seed)
    assert v0 == [] and r0 == defense_rows(plain, test_seed)  # the guard off: the rows of earlier versions
    r1, v1 = defense_data(guarded, test_seed)
    assert len(v1) == 5 and len(r1) == 16
    assert not {r["instruction"] for r in v1} & {r["instruction"] for r in r1}
    assert sum(r["category"] == "aligned" for r in r1) == 8


def test_guard_rows_from_their_own_source_are_never_trained_on(tmp_path, test_seed):
    """posthoc.validation: the guard checks rows of another source (another kind of request than the defense's
    normal rows); those rows leave both defense pools even when the pools share instructions with them."""
    import json

    other = rows("other", 10) + rows("normal", 4)  # four instructions also in the normal pool
    for name, data in (("aligned", rows("aligned", 20)), ("normal", rows("normal", 30)), ("other", other)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    src = {"aligned": [{"path": str(tmp_path / "aligned.jsonl")}], "normal": [{"path": str(tmp_path / "normal.jsonl")}]}
    pc = PosthocConfig(enabled=True, n_samples=40, validation_rows=14, aligned_ratio=0.25,
                       validation=[{"path": str(tmp_path / "other.jsonl")}], **src)
    data, val = defense_data(pc, test_seed)
    assert sorted(r["instruction"] for r in val) == sorted(r["instruction"] for r in other)  # all 14, from `other`
    assert not {r["instruction"] for r in val} & {r["instruction"] for r in data}
    assert {r["instruction"] for r in data if r["category"] == "normal"} <= {f"normal question {i}" for i in range(4, 30)}
    with pytest.raises(ConfigError, match="posthoc.validation has only 14"):
        defense_data(pc.model_copy(update={"validation_rows": 15}), test_seed)
    with pytest.raises(ValueError, match="validation needs posthoc.validation_rows"):
        PosthocConfig(enabled=True, validation=[{"path": "x.jsonl"}])
    # an all-aligned defense may still run the guard on its own source
    assert PosthocConfig(enabled=True, aligned_ratio=1.0, validation_rows=4, validation=[{"path": "x.jsonl"}])


def test_guard_config_is_checked_at_load():
    with pytest.raises(ValueError, match="validation_rows needs normal"):
        PosthocConfig(enabled=True, validation_rows=4, aligned_ratio=1.0)
    with pytest.raises(ValueError, match="check_every"):
        PosthocConfig(enabled=True, check_every=0)
    with pytest.raises(ValueError, match="max_ppl_rise"):
        PosthocConfig(enabled=True, max_ppl_rise=-1)


def _model(tiny, seed):
    model, tok = tiny
    peft = attach_lora(model, r=4, alpha=8, target_modules="all-linear", seed=seed)
    return peft, tok, FlatLoRA(peft)


def test_guard_returns_the_checkpoint_it_names(tiny, test_seed):
    """Whichever step the guard keeps, the defended adapter is exactly what training for that many steps gives;
    measuring the validation perplexity in between does not change the training trajectory."""
    peft, tok, flat = _model(tiny, test_seed)
    start = flat.get().clone()
    train = rows("aligned", 6) + rows("normal", 6)
    val = [{"instruction": f"held question {i}", "response": f"held answer {i}", "category": "normal"} for i in range(4)]
    fl = FLConfig(lr=5e-3, batch_size=4, local_steps=1)
    common = dict(max_length=48, system_prompt=None, seed=test_seed)
    pc = PosthocConfig(enabled=True, steps=6, lr=5e-3, validation_rows=4, check_every=2, max_ppl_rise=1e6)
    guarded, m = finetune(peft, tok, start, train, pc, fl, validation=val, **common)
    g = m["guard"]
    assert [s for s, _ in g["curve"]] == [2, 4, 6] and g["validation_rows"] == 4
    assert g["selected_step"] == 6 and g["within_budget"]  # an unlimited budget keeps the last step
    plain, _ = finetune(peft, tok, start, train, pc.model_copy(update={"validation_rows": 0}), fl, **common)
    assert torch.equal(guarded, plain)  # the perplexity checks did not perturb training
    assert not torch.equal(guarded, start)

    # a budget no step meets (the defense data differs from the validation rows, so their perplexity moves):
    # the guard keeps the lowest-perplexity step, and that adapter equals training for exactly that many steps
    pc0 = pc.model_copy(update={"max_ppl_rise": 0.0})
    chosen, m0 = finetune(peft, tok, start, train, pc0, fl, validation=val, **common)
    g0 = m0["guard"]
    assert [p for _, p in g0["curve"]] == pytest.approx([p for _, p in g["curve"]], rel=1e-6)
    step = g0["selected_step"]
    within = [s for s, p in g0["curve"] if p <= g0["start_ppl"]]
    assert step == (max(within) if within else min(g0["curve"], key=lambda c: c[1])[0])
    short, _ = finetune(peft, tok, start, train, pc.model_copy(update={"validation_rows": 0, "steps": step}), fl,
                        **common)
    assert torch.equal(chosen, short)
    assert math.isclose(m0["update_norm"], float((chosen - start).norm()), rel_tol=1e-6)


def _tiny_run_config(tmp_path, seed: int, pool_rows: int, **posthoc):
    """Two benign clients on a placeholder pool of ``pool_rows`` normal rows; post-hoc level 1 from the same pool."""
    import json

    from fedsafe.config import ExperimentConfig

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows("normal", pool_rows)))
    return ExperimentConfig.model_validate({
        "model": {"name": "tiny"}, "seed": seed, "output_dir": str(tmp_path / "runs"),
        "data": {"samples_per_client": 2, "max_length": 48},
        "roles": [{"name": "benign", "clients": 2, "data": [{"path": str(pool)}]}],
        "fl": {"rounds": 1, "clients_per_round": 2, "local_steps": 1, "batch_size": 2},
        "posthoc": {"enabled": True, "aligned": [{"path": str(pool)}], "normal": [{"path": str(pool)}], **posthoc}})


def test_tiny_run_logs_the_guard(tmp_path, test_seed):
    """A tiny run with ``posthoc.validation_rows``: the validation rows are written beside the defense data,
    never among it, and the run's post-hoc record carries the perplexity curve and the kept step."""
    import json

    from fedsafe.pipeline import run_experiment
    from fedsafe.rundir import RunDir

    cfg = _tiny_run_config(tmp_path, test_seed, 40, n_samples=8, steps=3, check_every=2, validation_rows=5)
    run = RunDir(run_experiment(cfg, progress=False).run_dir)
    trained = {json.loads(x)["instruction"] for x in (run.path / "posthoc_data.jsonl").read_text().splitlines()}
    held = [json.loads(x) for x in (run.path / "posthoc_validation.jsonl").read_text().splitlines()]
    assert len(held) == 5 and not {r["instruction"] for r in held} & trained
    (rec,) = run.records("posthoc")
    guard = rec["guard"]
    assert [s for s, _ in guard["curve"]] == [2, 3] and guard["selected_step"] in (2, 3)
    assert guard["validation_rows"] == 5 and math.isfinite(guard["start_ppl"])
    assert (run.adapter_dir("posthoc") / "adapter_model.safetensors").exists()


def test_too_few_normal_rows_fail_before_training(tmp_path, test_seed):
    """``validation_rows`` larger than the level-1 normal pool: the error names the field at the first round,
    before any training (nothing is lost)."""
    from fedsafe.pipeline import run_experiment

    cfg = _tiny_run_config(tmp_path, test_seed, 6, n_samples=4, steps=2, validation_rows=6)
    with pytest.raises(ConfigError, match="posthoc.validation_rows=6"):
        run_experiment(cfg, progress=False)
    assert not list((tmp_path / "runs").glob("*/metrics.jsonl")) or not any(
        '"type": "client"' in f.read_text() for f in (tmp_path / "runs").glob("*/metrics.jsonl"))


def test_select_checkpoint_with_a_refusal_budget():
    """Issue 29: the guard also watches refusals of held-out normal instructions (in %, start 10)."""
    curve = [(2, 10.1), (4, 10.2), (6, 10.3), (8, 10.4)]
    refusals = [(2, 10.0), (4, 15.0), (6, 40.0), (8, 60.0)]
    g = select_checkpoint(10.0, curve, 5.0, 10.0, refusals, 5.0)  # ppl allows all; refusals allow steps 2, 4
    assert g["selected_step"] == 4 and g["within_budget"] and g["selected_refusal"] == 15.0
    assert g["refusal_budget"] == 15.0 and g["refusal_curve"] == [[s, r] for s, r in refusals]
    assert select_checkpoint(10.0, curve, 5.0)["selected_step"] == 8  # without the refusal budget: the last
    g = select_checkpoint(10.0, curve, 1.5, 10.0, refusals, 5.0)  # ppl budget 10.15: only step 2 in both
    assert g["selected_step"] == 2 and g["within_budget"]
    g = select_checkpoint(10.0, curve, 0.0, 10.0, refusals, 5.0)  # no step within the ppl budget: the lowest ppl
    assert g["selected_step"] == 2 and not g["within_budget"]   # among those within the refusal budget
    g = select_checkpoint(10.0, curve, 5.0, 0.0, refusals, 1.0)  # no step within the refusal budget: fewest refusals
    assert g["selected_step"] == 2 and not g["within_budget"]


def test_guard_measures_refusals_on_the_validation_instructions(tiny, test_seed, monkeypatch):
    """The refusal check asks the validation instructions (never the training rows) at the start and at every
    checkpoint, and a checkpoint that refuses more than the budget allows is not kept."""
    from fedsafe import generation

    peft, tok, flat = _model(tiny, test_seed)
    start = flat.get().clone()
    train = rows("aligned", 6) + rows("normal", 6)
    val = [{"instruction": f"held question {i}", "response": f"held answer {i}", "category": "normal"} for i in range(4)]
    asked: list[list[str]] = []

    def fake_generate(model, tokenizer, prompts, **kw):  # refuses more at every call: 0, 0, 1, 2, 4 of 4
        asked.append(list(prompts))
        k = [0, 0, 1, 2, 4][min(len(asked) - 1, 4)]
        return ["I can't help with that."] * k + ["Sure, here is a placeholder answer."] * (len(prompts) - k)

    monkeypatch.setattr(generation, "generate", fake_generate)
    fl = FLConfig(lr=5e-3, batch_size=4, local_steps=1)
    pc = PosthocConfig(enabled=True, steps=8, lr=5e-3, validation_rows=4, check_every=2, max_ppl_rise=1e6,
                       max_refusal_rise=25.0)
    chosen, m = finetune(peft, tok, start, train, pc, fl, max_length=48, system_prompt=None, seed=test_seed,
                         validation=val)
    g = m["guard"]
    assert asked and all(p == [v["instruction"] for v in val] for p in asked) and len(asked) == 5
    assert g["refusal_start"] == 0.0 and [r for _, r in g["refusal_curve"]] == [0.0, 25.0, 50.0, 100.0]
    assert g["selected_step"] == 4 and g["within_budget"]  # steps 6 and 8 refuse more than +25 points
    short, _ = finetune(peft, tok, start, train, pc.model_copy(update={"validation_rows": 0, "steps": 4,
                                                                     "max_refusal_rise": None}), fl,
                        max_length=48, system_prompt=None, seed=test_seed)
    assert torch.equal(chosen, short)
    with pytest.raises(Exception, match="validation_rows"):
        PosthocConfig(enabled=True, max_refusal_rise=5.0)
