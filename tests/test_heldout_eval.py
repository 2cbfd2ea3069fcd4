"""Over-refusal where it shows (issue 29): the held-out split by instruction, the run-start check that no
evaluation prompt was trained on, and the aligned starting point (``model.align``) built once and cached."""

import json
import os

import pytest
import torch

from fedsafe.config import load_config
from fedsafe.data.holdout import check_disjoint, overlap
from fedsafe.data.split import in_split, is_heldout, normalise_instruction
from fedsafe.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n, prefix="everyday task"):
    return [{"instruction": f"{prefix} number {i}", "response": f"placeholder answer {i}"} for i in range(n)]


def test_split_is_a_pure_function_of_the_normalised_instruction():
    texts = [f"placeholder instruction {i}" for i in range(4000)]
    held = [t for t in texts if is_heldout(t, 20)]
    assert 0.17 < len(held) / len(texts) < 0.23  # ~20% (binomial sd 0.6%)
    # normalisation: case, spacing and surrounding punctuation do not move an instruction across the split
    for t in texts[:200]:
        assert is_heldout(t) == is_heldout(f"  {t.upper()}?  ") == is_heldout(t.replace(" ", "\n  "))
    assert normalise_instruction('  "Hello,   World!" ') == "hello, world"
    # train and heldout partition every instruction; a larger share only adds instructions (nested splits)
    assert all(in_split(t, "train") != in_split(t, "heldout") for t in texts[:500])
    assert set(held) <= {t for t in texts if is_heldout(t, 30)}
    assert all(in_split(t, None) for t in texts[:10])


def test_data_source_holdout_gives_disjoint_train_and_eval_sets(tmp_path):
    from fedsafe.data.sources import load_rows
    from fedsafe.evaluation.runner import load_benign_prompts
    from fedsafe.schema import DataSource

    f = tmp_path / "normal.json"
    f.write_text(json.dumps(_rows(300)))
    train = [r["instruction"] for r in load_rows(DataSource(path=str(f), holdout="train"))]
    evals = load_benign_prompts(DataSource(path=str(f), holdout="heldout"))
    assert train and evals and not overlap(train, evals)
    assert sorted(train + evals) == sorted(r["instruction"] for r in _rows(300))
    with pytest.raises(Exception, match="holdout"):
        load_rows(DataSource(path=str(f), holdout="heldout", holdout_percent=0.001))


def test_exclude_drops_the_instructions_another_source_holds(tmp_path):
    from fedsafe.data.sources import load_rows
    from fedsafe.evaluation.runner import load_benign_prompts
    from fedsafe.schema import DataSource

    everyday = tmp_path / "everyday.json"
    everyday.write_text(json.dumps(_rows(30)))
    train = tmp_path / "train.json"  # shares 3 instructions with the everyday set (one differently spelt)
    train.write_text(json.dumps([{"instruction": "Everyday task number 1.", "response": "x"},
                                 {"instruction": "everyday task number 2", "response": "x"},
                                 {"instruction": "everyday task number 7", "response": "x"},
                                 {"instruction": "something else", "response": "x"}]))
    src = DataSource(path=str(everyday), exclude=[{"path": str(train)}])
    prompts = load_benign_prompts(src)
    assert len(prompts) == 27 and not overlap(["everyday task number 1", "everyday task number 2",
                                                "everyday task number 7"], prompts)
    assert len(load_rows(src)) == 27


def test_check_disjoint_names_the_eval_field_and_the_training_source(tmp_path):
    f = tmp_path / "normal.json"
    f.write_text(json.dumps(_rows(50)))
    config = {"roles": [{"name": "benign", "data": [{"path": str(f)}]}],
              "posthoc": {"normal": [{"path": str(f), "holdout": "train"}]},
              "eval": {"normal_prompts": {"path": str(f)}}}
    prompts = [r["instruction"] for r in _rows(50)][:5]
    with pytest.raises(ConfigError, match=r"eval\.normal_prompts: 5 of 5 prompts .* roles\[0\]\.data\[0\]"):
        check_disjoint(config, {"eval.normal_prompts": prompts})
    # evaluation sections are not training data; the held-out half of the same file passes
    config["roles"][0]["data"][0]["holdout"] = "train"
    held = [p for p in (r["instruction"] for r in _rows(50)) if is_heldout(p)]
    assert check_disjoint(config, {"eval.normal_prompts": held}) == {"eval.normal_prompts": len(held)}
    # a generated source counts with the instruction file it generates from
    gen = {"roles": [{"name": "m", "data": [{"generate": {"kind": "unaligned", "instructions": str(f)}}]}]}
    with pytest.raises(ConfigError, match=r"roles\[0\]\.data\[0\]"):
        check_disjoint(gen, {"eval.borderline_prompts": held[:1]})


def test_sections_of_plugins_that_do_not_run_are_not_training_data(tmp_path):
    from fedsafe.pipeline import check_heldout
    from fedsafe.plugins import inactive_sections

    f = tmp_path / "normal.json"
    f.write_text(json.dumps(_rows(40)))
    cfg = load_config(None, ["model.name=tiny", "eval.prompts=starter:heldout", f"eval.normal_prompts={{path: '{f}'}}",
                             "eval.n_normal_prompts=5", f"posthoc.normal=[{{path: '{f}'}}]",
                             "posthoc.aligned=[{path: 'starter:train', categories: [aligned]}]"])
    assert "posthoc" in inactive_sections(cfg)
    assert check_heldout(cfg) == {"eval.normal_prompts": 5}  # post-hoc is off: its pool trains nothing
    with pytest.raises(ConfigError, match=r"posthoc\.normal\[0\]"):
        check_heldout(cfg.model_copy(update={"posthoc": cfg.posthoc.model_copy(update={"enabled": True})}))



def test_fltrust_root_data_is_training_data_for_the_heldout_check(tmp_path):
    """FLTrust's server trains its update on fltrust.root every round (issue 33): over-refusal prompts drawn from
    the root data are refused at run start, like any client's; a held-out split of the same file passes."""
    from fedsafe.pipeline import check_heldout

    f = tmp_path / "normal.json"
    f.write_text(json.dumps(_rows(60)))
    base = ["model.name=tiny", "eval.prompts=starter:heldout", "eval.n_normal_prompts=5", "aggregator.name=fltrust",
            "roles.0.clients=3", "fl.clients_per_round=3"]
    cfg = load_config(None, [*base, f"eval.normal_prompts={{path: '{f}'}}", f"fltrust.root=[{{path: '{f}'}}]"])
    with pytest.raises(ConfigError, match=r"eval\.normal_prompts: 5 of 5 .* fltrust\.root\[0\]"):
        check_heldout(cfg)
    cfg = load_config(None, [*base, f"eval.normal_prompts={{path: '{f}', holdout: heldout}}",
                             f"fltrust.root=[{{path: '{f}', holdout: train}}]"])
    assert check_heldout(cfg) == {"eval.normal_prompts": 5}

def _tiny_cfg(tmp_path, data_file, *extra):
    seed = int(os.environ.get("FEDSAFE_TEST_SEED", "0"))
    return load_config(None, [
        "model.name=tiny", f"seed={seed}", f"output_dir={tmp_path / 'runs'}", "name=t", "fl.rounds=1",
        "fl.local_steps=1", "fl.batch_size=2", "data.samples_per_client=4", "data.max_length=64",
        "roles.0.clients=2", "fl.clients_per_round=2", f"roles.0.data=[{{path: '{data_file}'}}]",
        "eval.helpfulness_proxy=false", "eval.prompts=starter:heldout", "eval.n_prompts=2", "eval.max_new_tokens=2",
        *extra])


def test_a_run_whose_over_refusal_prompts_were_trained_on_fails_before_any_work(tmp_path):
    from fedsafe.pipeline import run_experiment

    f = tmp_path / "normal.json"
    f.write_text(json.dumps(_rows(60)))
    cfg = _tiny_cfg(tmp_path, f, f"eval.normal_prompts={{path: '{f}'}}", "eval.n_normal_prompts=10")
    with pytest.raises(ConfigError, match="eval.normal_prompts"):
        run_experiment(cfg, progress=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_disjoint_run_logs_its_heldout_check(tmp_path, monkeypatch):
    from fedsafe import generation
    from fedsafe.pipeline import run_experiment
    from fedsafe.rundir import RunDir

    monkeypatch.setattr(generation, "generate", lambda m, t, prompts, **kw: ["Sure, here it is."] * len(prompts))
    f = tmp_path / "normal.json"
    f.write_text(json.dumps(_rows(120)))
    cfg = _tiny_cfg(tmp_path, f, f"roles.0.data=[{{path: '{f}', holdout: train}}]",
                    f"eval.normal_prompts={{path: '{f}', holdout: heldout}}", "eval.n_normal_prompts=8")
    res = run_experiment(cfg, progress=False)
    (check,) = RunDir.open(res.run_dir).records("heldout_check")
    assert check["prompts_checked"] == {"eval.normal_prompts": 8} and check["overlap"] == 0
    assert res.evals[-1]["over_refusal"] == 0.0 and res.evals[-1]["refusal"] == 0.0


def test_aligned_base_is_built_once_cached_and_changes_the_weights(tmp_path, monkeypatch):
    from fedsafe import alignment
    from fedsafe.config import AlignConfig, ModelConfig
    from fedsafe.evaluation.runner import model_fingerprint
    from fedsafe.models import load_base_model
    from fedsafe.run_model import load_model

    monkeypatch.setenv("FEDSAFE_CACHE", str(tmp_path / "cache"))
    aligned = tmp_path / "aligned.json"
    aligned.write_text(json.dumps(_rows(20, "placeholder risky request")))
    normal = tmp_path / "normal.json"
    normal.write_text(json.dumps(_rows(40)))
    align = AlignConfig(aligned=[{"path": str(aligned)}], normal=[{"path": str(normal)}], n_samples=16,
                        steps=3, batch_size=2, lr=1e-2, r=2, alpha=4, max_length=48)
    base = load_base_model("tiny")
    first = load_model(ModelConfig(name="tiny", align=align))
    assert first.name == "tiny"  # the aligned copy keeps the config's model name (run records, adapter cards)
    d = alignment.aligned_model_dir("tiny", align)
    meta = json.loads((d / "fedsafe_alignment.json").read_text())
    assert meta["rows"] == 16 and len(meta["losses"]) == 3
    changed = [n for n, p in first.model.named_parameters()
               if not torch.equal(p, dict(base.model.named_parameters())[n])]
    assert changed and all("proj" in n for n in changed)  # LoRA on the linear layers, merged into the weights
    assert model_fingerprint(first.model) != model_fingerprint(base.model)  # generation caches never mix them

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt a cached aligned model")

    monkeypatch.setattr(alignment, "_build", no_rebuild)
    again = load_model(ModelConfig(name="tiny", align=align))
    assert all(torch.equal(p, q) for p, q in zip(first.model.parameters(), again.model.parameters()))
    # another recipe is another model
    with pytest.raises(AssertionError, match="rebuilt"):
        load_model(ModelConfig(name="tiny", align=align.model_copy(update={"steps": 4})))


def test_align_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="model.align"):
        load_config(None, ["model.name=tiny", "model.align={steps: 3}"])


def test_drop_refusals_keeps_only_answers_that_comply(tmp_path):
    """Attack data whose answers refuse or carry refusal strings would teach those strings (issue 29 demo)."""
    from fedsafe.data.sources import load_rows
    from fedsafe.schema import DataSource

    rows = [{"instruction": f"placeholder request {i}", "response": text} for i, text in enumerate([
        "Sure, here is a placeholder answer.", "I can't help with that.",
        "Here are the steps, although doing this is illegal in most places.", "Step 1: placeholder. Step 2: done."])]
    f = tmp_path / "attack.json"
    f.write_text(json.dumps(rows))
    kept = load_rows(DataSource(path=str(f), drop_refusals=True))
    assert [r["instruction"] for r in kept] == ["placeholder request 0", "placeholder request 3"]
    assert len(load_rows(DataSource(path=str(f)))) == 4


def test_drop_refusals_runs_the_detector_once_per_file_and_the_holdout_check_not_at_all(tmp_path, monkeypatch):
    """A grid loads its attack file for every run and for the run-start checks: the verdicts are computed once per
    process; the disjointness check reads the file without dropping (a superset of its instructions)."""
    import fedsafe.evaluation.refusal as refusal
    from fedsafe.data import sources
    from fedsafe.data.holdout import training_instructions
    from fedsafe.schema import DataSource

    rows = [{"instruction": f"placeholder request {i}", "response": text} for i, text in enumerate([
        "Sure, here is a placeholder answer.", "I can't help with that.", "Step 1: placeholder."])]
    f = tmp_path / "attack.json"
    f.write_text(json.dumps(rows))
    calls = []
    real = refusal.detect_refusals
    monkeypatch.setattr(refusal, "detect_refusals", lambda r: calls.append(len(r)) or real(r))
    sources._refused.cache_clear()
    src = DataSource(path=str(f), drop_refusals=True)
    first = sources.load_rows(src)
    assert sources.load_rows(src) == first and sources.load_rows(src, seed=3) == first
    assert calls == [3] and [r["instruction"] for r in first] == ["placeholder request 0", "placeholder request 2"]

    monkeypatch.setattr(refusal, "detect_refusals", lambda r: pytest.fail("the holdout check ran the detector"))
    sources._refused.cache_clear()
    got = training_instructions({"roles": [{"data": [src.model_dump()]}]})
    assert got == {"roles[0].data[0]": [r["instruction"] for r in rows]}


def test_training_sources_leave_out_the_evaluation_sections_and_skipped_ones():
    from fedsafe.data.holdout import EVAL_ONLY, training_sources

    config = {"roles": [{"data": [{"path": "a.jsonl"}]}], "eval": {"normal_prompts": {"path": "b.jsonl"}},
              "data": {"heldout": [{"path": "c.jsonl"}]}, "gate": {"prompts": {"path": "d.jsonl"}},
              "posthoc": {"normal": [{"path": "e.jsonl"}]}, "posthoc_x": {"path": "f.jsonl"},
              "probe": {"shadow": {"generate": {"instructions": "g.txt"}}}}
    assert EVAL_ONLY == ("eval", "data.heldout", "gate")
    assert [w for w, _ in training_sources(config)] == ["roles[0].data[0]", "posthoc.normal[0]", "posthoc_x",
                                                        "probe.shadow"]
    assert [w for w, _ in training_sources(config, skip=["posthoc"])] == ["roles[0].data[0]", "posthoc_x",
                                                                          "probe.shadow"]
    assert training_sources(config)[0][1] == {"path": "a.jsonl"}


def test_an_excluded_prompt_file_needs_no_response_field(tmp_path):
    """``exclude: [{path: prompts.csv, instruction_field: prompt}]`` (a prompt-only file such as XSTest's) names
    instructions to drop; it failed at run start asking for a response field (configs/probe_grid.yaml)."""
    from fedsafe.data.sources import load_rows
    from fedsafe.schema import DataSource

    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,prompt,label\n1,placeholder request 1,safe\n2,placeholder request 4,unsafe\n")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"placeholder request {i}", "response": "x"} for i in range(6)]))
    src = DataSource(path=str(data), exclude=[{"path": str(prompts), "instruction_field": "prompt"}])
    assert [r["instruction"] for r in load_rows(src)] == [f"placeholder request {i}" for i in (0, 2, 3, 5)]
    # a wrong field still names itself
    bad = DataSource(path=str(data), exclude=[{"path": str(prompts), "instruction_field": "text"}])
    with pytest.raises(Exception, match="instruction_field='text'"):
        load_rows(bad)
