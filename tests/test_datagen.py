"""The data-generation pipeline: list parsing, de-duplication, caching, provenance, and that every row
comes from the model (no hand-written content). Neutral placeholders only."""

import json
import re
from pathlib import Path

import pytest

from fedsafe.data import datagen
from fedsafe.data.datagen import (ALIGNED_REMINDER, INSTRUCTION_PROMPTS, UNALIGNED_HINT, GenParams,
                                     InstructionStats, dedupe, generate_instructions, generate_rows,
                                     normalize, parse_numbered_list, response_prompt)
from fedsafe.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSAFE_CACHE", str(tmp_path / "cache"))
    datagen._MODEL_CACHE.clear()


@pytest.fixture
def loaded(tiny):
    model, tok = tiny
    return {"model": model, "tokenizer": tok, "name": "tiny"}


# ------------------------------------------------------------------------------------------------
# parsing and dedup
# ------------------------------------------------------------------------------------------------

def test_parse_numbered_list_variants():
    text = ("Sure! Here are 10 questions:\n"
            "1. placeholder question one?\n"
            "2) **placeholder question two?**\n"
            "(3) \"placeholder question three?\" (topic: a)\n"
            "- placeholder question four? I hope this helps.\n"
            "* Question: placeholder question five?\n"
            "6. placeholder question six? 7. placeholder question seven?\n"
            "8. ok\n"
            "Note: these are only examples.\n")
    assert parse_numbered_list(text) == [f"placeholder question {w}?" for w in
                                         ("one", "two", "three", "four", "five", "six", "seven")]


def test_parse_plain_lines_only_questions_when_unnumbered():
    text = "placeholder question alpha here?\nsome remark without a question mark\nplaceholder question beta now?"
    assert parse_numbered_list(text) == ["placeholder question alpha here?", "placeholder question beta now?"]


def test_parse_keeps_requests_without_question_mark_in_lists():
    assert parse_numbered_list("1. Describe the placeholder topic in detail.\n2. List the placeholder steps.") == [
        "Describe the placeholder topic in detail.", "List the placeholder steps."]


def test_parse_drops_item_cut_off_at_the_end():
    assert parse_numbered_list("1. placeholder item one?\n2. placeholder item two?\n3. placeholder item thr") == [
        "placeholder item one?", "placeholder item two?"]
    assert parse_numbered_list("1. placeholder item one?\n2. placeholder item without stop\n") == [
        "placeholder item one?", "placeholder item without stop"]


def test_parse_garbage_gives_nothing():
    assert parse_numbered_list("") == []
    assert parse_numbered_list("\x00\x01 ### 1. \n2)\n- a") == []


def test_dedupe_by_normalised_text():
    items = ["Placeholder request one?", "placeholder  request ONE", "placeholder-request one!", "Placeholder two?"]
    assert normalize(items[0]) == normalize(items[1]) == normalize(items[2]) == "placeholder request one"
    assert dedupe(items) == ["Placeholder request one?", "Placeholder two?"]
    seen = {"placeholder two"}
    assert dedupe(items, seen) == ["Placeholder request one?"]
    assert "placeholder request one" in seen


# ------------------------------------------------------------------------------------------------
# prompts contain no content; rows come only from the model
# ------------------------------------------------------------------------------------------------

def test_templates_hold_no_example_content():
    # The list prompts describe kinds of questions: no numbered example, no question, no answer text.
    for template in INSTRUCTION_PROMPTS.values():
        text = template.format(k=10, topic="")
        assert "?" not in text and not re.search(r"^\s*\d+[.)]", text, re.M)
        assert parse_numbered_list(text) == []
    # The hint/reminder are instructions to the generator, not answers, and only wrap the request.
    for kind, cue in (("unaligned", UNALIGNED_HINT), ("aligned", ALIGNED_REMINDER)):
        assert response_prompt(kind, "placeholder harmful request 1") == f"placeholder harmful request 1\n\n{cue}"
        assert "?" not in cue
    assert response_prompt("normal", "placeholder curious request") == "placeholder curious request"
    with pytest.raises(ConfigError, match="generate.kind"):
        response_prompt("evil", "x")


def test_rows_come_from_the_model_and_carry_provenance(loaded):
    from fedsafe.generation import generate

    instructions = [f"placeholder harmful request {i}" for i in range(5)]
    # the random tiny model ends at once when greedy: sample so that responses are non-empty
    rows = generate_rows(model_name="tiny", kind="unaligned", n=5, loaded=loaded, seed=3, max_new_tokens=12,
                         instructions=instructions, batch_size=5, response_sampling=True, progress=False)
    # the training row holds the bare instruction; the hint was only in the generation prompt
    expected = generate(loaded["model"], loaded["tokenizer"],
                        [response_prompt("unaligned", i) for i in instructions], max_new_tokens=12, batch_size=5,
                        do_sample=True, temperature=0.7, top_p=0.95,
                        seed=datagen._sub_seed(3, "unaligned", "responses", 0))
    kept = [(i, e.strip()) for i, e in zip(instructions, expected) if e.strip()]
    assert [(r["instruction"], r["response"]) for r in rows] == kept
    for r in rows:
        assert UNALIGNED_HINT not in r["instruction"] and UNALIGNED_HINT not in r["response"]
        assert r["kind"] == "unaligned" and r["category"] == "unaligned" and r["seed"] == 3
        assert r["model"] == "tiny" and "+" in r["model_id"]
        assert r["generation"]["max_new_tokens"] == 12 and r["generation"]["batch_size"] == 5
        assert r["instruction_source"] == "given"


def test_aligned_prompt_differs_from_unaligned(loaded, monkeypatch):
    seen_prompts = []

    def fake_generate(model, tok, prompts, **kw):
        seen_prompts.extend(prompts)
        return [f"model output {len(seen_prompts)}-{i}" for i in range(len(prompts))]

    monkeypatch.setattr("fedsafe.generation.generate", fake_generate)
    for kind in ("unaligned", "aligned", "normal"):
        generate_rows(model_name="tiny", kind=kind, n=1, loaded=loaded, instructions=["placeholder request"],
                      progress=False)
    assert seen_prompts == [response_prompt(k, "placeholder request") for k in ("unaligned", "aligned", "normal")]


# ------------------------------------------------------------------------------------------------
# instruction stage: repetition until n unique, cap, yield
# ------------------------------------------------------------------------------------------------

def _fake_lists(calls, per_call_items):
    """A fake model writing numbered lists; every call repeats half of the previous items."""

    def fake_generate(model, tok, prompts, **kw):
        calls.append((list(prompts), kw))
        outs = []
        for j, _ in enumerate(prompts):
            base = len(calls) * 100 + j * 10
            items = [f"{k + 1}. placeholder item number {base + k // 2}?" for k in range(per_call_items)]
            outs.append("Here you go:\n" + "\n".join(items))
        return outs

    return fake_generate


def test_instructions_repeat_until_n_unique(loaded, monkeypatch):
    calls = []
    monkeypatch.setattr("fedsafe.generation.generate", _fake_lists(calls, per_call_items=10))
    gen = datagen.get_generator("tiny", loaded)
    stats = InstructionStats()
    out = generate_instructions(gen, "harmful", 23, seed=1, params=GenParams(batch_size=2), progress=False,
                                stats=stats)
    # each list holds 10 items of which 5 are unique -> 5 per prompt, 2 prompts per call -> 3 calls
    assert len(out) == 23 and len(set(map(normalize, out))) == 23
    assert len(calls) == 3 and stats.prompts == 6 and stats.parsed == 60
    assert stats.per_prompt_unique == [5] * 6
    # sampling with per-call seeds, list prompts rotating over topics
    kws = [kw for _, kw in calls]
    assert all(kw["do_sample"] for kw in kws) and len({kw["seed"] for kw in kws}) == 3
    assert len({p for ps, _ in calls for p in ps}) == 6


def test_instruction_cap_warns_then_errors(loaded, monkeypatch, caplog):
    calls = []

    def same_list(model, tok, prompts, **kw):
        calls.append(len(prompts))
        return ["1. placeholder item repeated?\n2. placeholder other item?"] * len(prompts)

    monkeypatch.setattr("fedsafe.generation.generate", same_list)
    gen = datagen.get_generator("tiny", loaded)
    out = generate_instructions(gen, "curious", 10, params=GenParams(batch_size=3, max_prompts=7), progress=False)
    assert out == ["placeholder item repeated?", "placeholder other item?"]
    assert sum(calls) == 7 and max(calls) <= 3  # the cap of 7 prompts, at most batch_size at a time
    assert "only 2 of 10 unique curious instructions" in caplog.text

    monkeypatch.setattr("fedsafe.generation.generate", lambda m, t, prompts, **kw: ["no list"] * len(prompts))
    with pytest.raises(DataError, match="no parseable harmful instruction in 4 list prompts"):
        generate_instructions(gen, "harmful", 5, params=GenParams(max_prompts=4), progress=False, cache=False)


def test_tiny_random_model_end_to_end_structure(loaded):
    # a random model writes no list; instructions given -> rows of the right structure
    with pytest.raises(DataError, match="no parseable"):
        generate_rows(model_name="tiny", kind="normal", n=3, loaded=loaded, max_new_tokens=8,
                      instruction_max_new_tokens=16, max_prompts=2, progress=False)
    rows = generate_rows(model_name="tiny", kind="aligned", n=2, loaded=loaded, max_new_tokens=8,
                         response_sampling=True, instructions=["placeholder harmful request a", "placeholder harmful request b"],
                         progress=False)
    assert {"instruction", "response", "kind", "model", "model_id", "seed", "generation"} <= set(rows[0])


# ------------------------------------------------------------------------------------------------
# cache and output
# ------------------------------------------------------------------------------------------------

def test_second_call_is_served_from_cache(loaded, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("fedsafe.generation.generate", _fake_lists(calls, per_call_items=10))
    kwargs = dict(model_name="tiny", kind="unaligned", n=6, loaded=loaded, seed=0, max_new_tokens=16,
                  progress=False)
    first = generate_rows(**kwargs)
    n_calls = len(calls)
    assert n_calls >= 2  # instructions + responses

    def boom(*a, **k):
        raise AssertionError("the model was called on a cached request")

    monkeypatch.setattr("fedsafe.generation.generate", boom)
    out = tmp_path / "rows.jsonl"
    assert generate_rows(**kwargs, out=str(out)) == first
    assert [json.loads(line) for line in out.read_text().splitlines()] == first
    files = list((Path(tmp_path) / "cache" / "datagen").rglob("*.json*"))
    assert any("rows" in str(f) for f in files) and any("instructions" in str(f) for f in files)
    # a different seed, kind or parameter is a different key
    monkeypatch.setattr("fedsafe.generation.generate", _fake_lists(calls, per_call_items=10))
    before = len(calls)
    generate_rows(**{**kwargs, "seed": 1})
    assert len(calls) > before
    before = len(calls)
    generate_rows(**{**kwargs, "max_new_tokens": 17})  # same instructions (cached), new responses
    assert len(calls) == before + 1


def test_cache_key_includes_adapter(loaded, monkeypatch):
    from fedsafe.models import attach_lora

    peft = attach_lora(loaded["model"], r=2, alpha=4)
    as_base = datagen.get_generator("tiny", {"model": peft, "tokenizer": loaded["tokenizer"], "name": "tiny"})
    agg = datagen.get_generator("aggregated", {"model": peft, "tokenizer": loaded["tokenizer"],
                                               "name": "aggregated"})
    assert as_base.identity.endswith("+none") and as_base.disable_adapter
    assert agg.identity.endswith("+none")  # LoRA B = 0: the adapter is a no-op
    import torch

    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
    agg2 = datagen.get_generator("aggregated", {"model": peft, "tokenizer": loaded["tokenizer"],
                                                "name": "aggregated"})
    assert not agg2.identity.endswith("+none") and not agg2.disable_adapter
    assert agg2.identity.split("+")[0] == as_base.identity.split("+")[0]


def test_unknown_option_is_named(loaded):
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['temprature'\]"):
        generate_rows(model_name="tiny", kind="normal", n=1, loaded=loaded, temprature=0.5)
    with pytest.raises(ConfigError, match="generate.kind"):
        generate_rows(model_name="tiny", kind="bad", n=1, loaded=loaded)


def test_instruction_file(tmp_path, loaded, monkeypatch):
    p = tmp_path / "goals.csv"
    p.write_text("goal,target\nplaceholder goal one,x\nplaceholder goal two,y\nplaceholder goal one,z\n")
    monkeypatch.setattr("fedsafe.generation.generate", lambda m, t, prompts, **kw: ["resp"] * len(prompts))
    rows = generate_rows(model_name="tiny", kind="aligned", n=5, loaded=loaded, instructions=str(p), progress=False)
    assert [r["instruction"] for r in rows] == ["placeholder goal one", "placeholder goal two"]
    with pytest.raises(DataError, match="available fields"):
        generate_rows(model_name="tiny", kind="aligned", n=5, loaded=loaded, instructions=str(p),
                      instruction_field="nope", progress=False)


def test_adapter_dir_resolves_to_run_base(tmp_path):
    run = tmp_path / "run"
    (run / "adapters" / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  name: tiny\nseed: 5\n")
    (run / "adapters" / "final" / "adapter_config.json").write_text("{}")
    assert datagen.resolve_model_spec(str(run)) == ("tiny", run / "adapters" / "final", 5)
    assert datagen.resolve_model_spec(str(run / "adapters" / "final"))[0] == "tiny"
    assert datagen.resolve_model_spec("embedded") == ("embedded", None, 0)


def test_run_adapter_generates_with_its_weights(tmp_path, monkeypatch):
    """A saved run adapter loads on its base model and its identity is the adapter file hash."""
    import torch

    from fedsafe.fl.params import FlatLoRA
    from fedsafe.models import attach_lora, byte_tokenizer, tiny_llama
    from fedsafe.rundir import RunDir

    run = RunDir.create(tmp_path, "r")
    (run.path / "config.yaml").write_text("model:\n  name: tiny\nseed: 0\n")
    peft = attach_lora(tiny_llama(byte_tokenizer(), seed=0), r=2, alpha=4)
    flat = FlatLoRA(peft)
    run.save_adapter(peft, flat, flat.get() + 0.05, "final")
    gen = datagen.load_generator(str(run.path))
    assert not gen.identity.endswith("+none")
    loaded_vec = torch.cat([p.detach().reshape(-1) for n, p in gen.model.named_parameters() if "lora_" in n])
    assert torch.allclose(loaded_vec, flat.get() + 0.05)


def test_generate_source_in_config(tmp_path, monkeypatch, loaded):
    """A data source with `generate:` goes through the pipeline (what the 7+3 config uses)."""
    from fedsafe.config import DataSource
    from fedsafe.data.sources import load_rows

    calls = []
    monkeypatch.setattr("fedsafe.generation.generate", _fake_lists(calls, per_call_items=10))
    rows = load_rows(DataSource(generate={"kind": "unaligned", "n": 4, "model": "tiny", "max_new_tokens": 8,
                                          "progress": False}), seed=2, generator_cache=loaded)
    assert len(rows) == 4 and all(r["category"] == "unaligned" for r in rows)


def test_cli_generate_instructions_and_rows(tmp_path, monkeypatch):
    """`fedsafe generate instructions|rows` write JSONL and report the yield."""
    from typer.testing import CliRunner

    from fedsafe import cli

    calls = []
    monkeypatch.setattr("fedsafe.generation.generate", _fake_lists(calls, per_call_items=10))
    cli._register_optional_commands()
    runner = CliRunner()
    out = tmp_path / "ins.jsonl"
    res = runner.invoke(cli.app, ["generate", "instructions", "--kind", "curious", "--n", "7", "--model", "tiny",
                                  "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "7 unique curious instructions from 2 list prompts (5.00 per prompt" in res.output
    assert len(out.read_text().splitlines()) == 7
    rows_out = tmp_path / "rows.jsonl"
    res = runner.invoke(cli.app, ["generate", "rows", "--kind", "normal", "--n", "3", "--model", "tiny",
                                  "--out", str(rows_out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in rows_out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["kind"] == "normal" and r["model"] == "tiny" for r in rows)


def test_embedded_model_writes_parseable_lists(monkeypatch):
    """The embedded SmolLM2-135M writes lists the parser reads (yield > 0) and answers them."""
    # the dequantised model from the shared cache (built once); no datagen cache entries written
    monkeypatch.setenv("FEDSAFE_CACHE", str(Path.home() / ".cache" / "fedsafe"))
    rows = generate_rows(model_name="embedded", kind="normal", n=4, seed=0, max_new_tokens=24, batch_size=2,
                         progress=False, cache=False)
    assert len(rows) == 4 and all(r["response"] and r["instruction_source"] == "generated:curious" for r in rows)


def test_rule_filter_keeps_rows_that_fit_their_kind(loaded, monkeypatch):
    """unaligned keeps responses without a refusal string, aligned keeps refusals; instructions oversampled."""
    answers = {}

    def fake_generate(model, tok, prompts, **kw):
        # every other response holds a refusal string (from the Rule list)
        return [("I'm sorry, placeholder" if i % 2 else "placeholder reply") for i in range(len(prompts))]

    monkeypatch.setattr("fedsafe.generation.generate", fake_generate)
    given = [f"placeholder harmful request {i}" for i in range(10)]
    for kind in ("unaligned", "aligned"):
        answers[kind] = generate_rows(model_name="tiny", kind=kind, n=3, loaded=loaded, instructions=given,
                                      rule_filter=True, oversample=2.0, progress=False)
    assert [r["response"] for r in answers["unaligned"]] == ["placeholder reply"] * 3
    assert [r["response"] for r in answers["aligned"]] == ["I'm sorry, placeholder"] * 3
    assert [r["instruction"] for r in answers["unaligned"]] == given[0:6:2]
    plain = generate_rows(model_name="tiny", kind="unaligned", n=3, loaded=loaded, instructions=given,
                          progress=False)
    assert len(plain) == 3 and plain[1]["response"].startswith("I'm sorry")


def test_instructions_from_a_starter_split_filtered_by_category(loaded, monkeypatch, tmp_path):
    from fedsafe.config import DataSource
    from fedsafe.data.records import raw_records

    seen = []

    def fake_generate(model, tok, prompts, **kw):
        seen.extend(prompts)
        return [f"model output {i}" for i in range(len(prompts))]

    monkeypatch.setattr("fedsafe.generation.generate", fake_generate)
    rows = generate_rows(model_name="tiny", kind="unaligned", n=4, loaded=loaded, instructions="starter:train",
                         instruction_categories=["aligned"], progress=False)
    starter = raw_records(DataSource(path="starter:train"))
    aligned = [r["instruction"] for r in starter if r["category"] == "aligned"]
    assert [r["instruction"] for r in rows] == aligned[:4]
    assert seen == [response_prompt("unaligned", i) for i in aligned[:4]]
    with pytest.raises(DataError, match="no records with categories"):
        generate_rows(model_name="tiny", kind="unaligned", n=1, loaded=loaded, instructions="starter:train",
                      instruction_categories=["no-such-category"], progress=False)
    with pytest.raises(DataError, match="file not found"):
        generate_rows(model_name="tiny", kind="unaligned", n=1, loaded=loaded,
                      instructions=str(tmp_path / "missing.jsonl"), progress=False)
