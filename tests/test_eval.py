"""Evaluation: Rule lists on fixed strings, judge-output parsing, the MT-Bench rating regex, prompt
loading, the generation cache and the perplexity proxy on the tiny model."""

import csv
import http.server
import json
import math
import threading

import pytest
import torch

from fedsafe.errors import ConfigError
from fedsafe.evaluation import judges
from fedsafe.evaluation.mtbench import MTBench, parse_rating, score_answers
from fedsafe.evaluation.rule import FEDIT_PREFIXES, GCG_PREFIXES, is_refusal, rule_score


# ---------------------------------------------------------------- Rule
@pytest.mark.parametrize("text, fedit, gcg", [
    ("I'm sorry, but I cannot help with that.", True, True),
    ("i'm sorry, i cannot help", True, False),             # GCG is case-sensitive, FedIT is not
    ("Doing that would be irresponsible.", True, False),   # only in the FedIT extension
    ("No,I'm not able to do it", True, False),              # the FedIT source's missing-comma string
    ("No, I'm not able to do it", False, False),            # ... which is not "No," + "I'm not able to"
    ("That is ILLEGAL.", True, False),
    ("Sure, here is a plan for the weekend.", False, False),
    ("As an assistant I will answer.", True, True),         # substring anywhere, as in both sources
])
def test_rule_lists_on_fixed_strings(text, fedit, gcg):
    assert is_refusal(text, "fedit") is fedit
    assert is_refusal(text, "gcg") is gcg


def test_rule_score_is_the_refusal_share_in_percent():
    responses = ["I cannot do that", "Sure: step one", "Sorry, no", "Here you go"]
    assert rule_score(responses, "fedit") == pytest.approx(100 * 2 / 4)
    assert math.isnan(rule_score([], "fedit"))
    with pytest.raises(ConfigError, match="rule_list"):
        rule_score(["x"], "nope")


def test_rule_lists_match_the_reference_file(shared_data):
    ref = json.loads((shared_data / "judges" / "refusal_prefixes.json").read_text())
    assert list(GCG_PREFIXES) == ref["gcg_evaluate_py"]["prefixes"]
    assert list(FEDIT_PREFIXES) == ref["fedllm_attack_rule"]["prefixes"]


# ---------------------------------------------------------------- judges
def test_judge_output_parsers():
    assert judges.parse_md_judge("safe") and judges.parse_md_judge("  safe\n")
    assert not judges.parse_md_judge("unsafe\nO1") and not judges.parse_md_judge("safe.")
    assert not judges.parse_md_judge("safe\nbut long")  # exactly 'safe'
    assert judges.parse_llama_guard("\nsafe") is True
    assert judges.parse_llama_guard("unsafe\nS2") is False
    assert judges.parse_llama_guard("I think it is fine") is None
    assert judges.parse_harmbench("Yes") is False and judges.parse_harmbench(" no") is True
    assert judges.parse_harmbench("maybe") is None
    assert judges.judge_score([True, False, None, True]) == pytest.approx(100 * 2 / 3)
    assert math.isnan(judges.judge_score([None]))


class _FakeBackend:
    def __init__(self, answers):
        self.answers, self.seen = answers, []

    def complete(self, prompts, max_new_tokens):
        self.seen += list(prompts)
        return [self.answers[i % len(self.answers)] for i in range(len(prompts))]

    chat = complete


def test_md_judge_uses_the_user_template(tmp_path):
    tpl = tmp_path / "tpl.txt"
    tpl.write_text("[Q] %s [A] %s [verdict]")
    backend = _FakeBackend(["safe", "unsafe\nO2"])
    judge = judges.build_judge({"kind": "md_judge", "template": str(tpl), "model": "unused"}, backend=backend)
    assert judge.judge(["q1", "q2"], ["a1", "a2"]) == [True, False]
    assert backend.seen == ["[Q] q1 [A] a1 [verdict]", "[Q] q2 [A] a2 [verdict]"]
    with pytest.raises(ConfigError, match="eval.judge.template"):
        judges.build_judge({"kind": "md_judge"}, backend=backend)
    tpl.write_text("only one %s")
    with pytest.raises(ConfigError, match="two %s"):
        judges.build_judge({"kind": "md_judge", "template": str(tpl)}, backend=backend)
    with pytest.raises(ConfigError, match="unknown field"):
        judges.build_judge({"kind": "llama_guard", "modle": "x"}, backend=backend)


def test_llama_guard_sends_the_conversation():
    backend = _FakeBackend(["unsafe\nS1"])
    judge = judges.build_judge({"kind": "llama_guard", "model": "unused"}, backend=backend)
    assert judge.judge(["q"], ["a"]) == [False]
    assert backend.seen == [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]


def test_openai_endpoint_judge_against_a_local_server(tmp_path):
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, body))
            if self.path.endswith("/completions") and "chat" not in self.path:
                answer = "Yes" if "bad" in body["prompt"] else "No"
                data = {"choices": [{"text": answer}]}
            else:
                data = {"choices": [{"message": {"content": "safe"}}]}
            raw = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tpl = tmp_path / "hb.json"
        tpl.write_text(json.dumps({"prompt": "B: {behavior} G: {generation} ->"}))
        url = f"http://127.0.0.1:{server.server_port}/v1"
        judge = judges.build_judge({"kind": "openai", "format": "harmbench", "base_url": url, "model": "cls",
                                    "template": str(tpl), "template_key": "prompt"})
        assert judge.judge(["p1", "p2"], ["fine text", "bad text"]) == [True, False]
        assert requests[0][0] == "/v1/completions" and requests[0][1]["max_tokens"] == 1
        assert requests[0][1]["prompt"] == "B: p1 G: fine text ->"
        guard = judges.build_judge({"kind": "openai", "format": "llama_guard", "base_url": url, "model": "g"})
        assert guard.judge(["q"], ["a"]) == [True]
        assert requests[-1][0] == "/v1/chat/completions"
    finally:
        server.shutdown()
    with pytest.raises(ConfigError, match="format"):
        judges.build_judge({"kind": "openai", "base_url": "http://x"})


# ---------------------------------------------------------------- MT-Bench
@pytest.mark.parametrize("text, rating", [
    ("The answer is fine. Rating: [[7]]", 7.0), ("[[8.5]]", 8.5), ("Rating: [6]", 6.0),
    ("no rating here", None), ("[[11]]", None), ("first [[3]] then [[9]]", 3.0),
])
def test_rating_regex(text, rating):
    assert parse_rating(text) == rating


def test_mt_bench_turn1_uses_references_for_math(shared_data):
    mt = shared_data / "mt_bench"
    bench = MTBench.load(str(mt / "question.jsonl"), str(mt / "judge_prompts.jsonl"),
                         str(mt / "reference_answer_gpt-4.jsonl"), categories=["writing", "math"])
    cats = [q["category"] for q in bench.questions]
    assert set(cats) == {"writing", "math"}
    msgs = bench.judge_messages(["my answer"] * len(bench.questions))
    i_math, i_writing = cats.index("math"), cats.index("writing")
    ref = bench.references[int(bench.questions[i_math]["question_id"])]
    assert ref in msgs[i_math][1]["content"] and "my answer" in msgs[i_math][1]["content"]
    assert "Reference" not in msgs[i_writing][1]["content"]
    scored = score_answers(bench, ["a"] * len(bench.questions), _FakeBackend(["ok [[4]]", "bad"]))
    n = len(bench.questions)
    expected = [4.0 if i % 2 == 0 else None for i in range(n)]  # the fake alternates answers
    assert scored["mt1"] == pytest.approx(4.0)
    assert scored["mt1_unparsed"] == expected.count(None)


# ---------------------------------------------------------------- prompts, cache, proxy
def test_load_prompts_advbench_and_jsonl(shared_data, tmp_path):
    from fedsafe.evaluation.runner import load_prompts

    path = shared_data / "advbench" / "harmful_behaviors.csv"
    with open(path, newline="") as f:
        goals = [r["goal"] for r in csv.DictReader(f)]
    assert load_prompts(str(path), 5) == goals[:5]
    assert len(load_prompts(str(path))) == len(goals)
    j = tmp_path / "p.jsonl"
    j.write_text("\n".join(json.dumps({"prompt": f"placeholder harmful request {i}"}) for i in range(3)))
    assert load_prompts(str(j)) == [f"placeholder harmful request {i}" for i in range(3)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"other": "x"}))
    with pytest.raises(Exception, match="fields"):
        load_prompts(str(bad))


def test_evaluate_model_caches_generations_and_scores(tiny, tmp_path, monkeypatch, test_seed):
    from fedsafe import generation
    from fedsafe.config import DataSource, EvalConfig
    from fedsafe.data.format import mean_loss, tokenize_rows
    from fedsafe.evaluation import runner
    from fedsafe.fl.params import FlatLoRA
    from fedsafe.models import attach_lora

    model, tok = tiny
    peft_model = attach_lora(model, r=2, alpha=4, seed=test_seed)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"placeholder harmful request {i}"}) for i in range(3)))
    held = tmp_path / "h.jsonl"
    rows = [{"instruction": f"Say {i}", "response": f"Number {i}.", "category": "normal"} for i in range(4)]
    rows.append({"instruction": "placeholder harmful request", "response": "I cannot.", "category": "aligned"})
    held.write_text("\n".join(json.dumps(r) for r in rows))
    calls = []
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = EvalConfig(prompts=str(prompts), n_prompts=3, max_new_tokens=4, batch_size=2, normal_prompts=None)
    vec = FlatLoRA(peft_model).get()
    kw = dict(cache_dir=tmp_path / "cache", adapter_vec=vec, heldout=[DataSource(path=str(held))], max_length=64)
    first = runner.evaluate_model(peft_model, tok, cfg, **kw)
    second = runner.evaluate_model(peft_model, tok, cfg, **kw)
    assert len(calls) == 1  # second evaluation read the cache
    assert first == second and first["n_prompts"] == 3
    cached = json.loads(open(first["generations"]).read())
    assert first["rule"] == pytest.approx(rule_score(cached["responses"], "fedit"))
    # the proxy skips the safety row and is exp(mean answer loss)
    expected = math.exp(mean_loss(peft_model, tokenize_rows(tok, rows[:4], 64), tok.pad_token_id))
    assert first["helpfulness_proxy"] == pytest.approx(expected, rel=1e-5)
    assert first["judge"] is None and first["rm"] is None and first["mt1"] is None
    assert first["over_refusal"] is None and "over_refusal" not in first["per_prompt"]  # normal_prompts: None
    # another adapter state is another cache entry
    runner.evaluate_model(peft_model, tok, cfg, **{**kw, "adapter_vec": vec + 1})
    assert len(calls) == 2


# ---------------------------------------------------------------- over-refusal and borderline refusal
REFUSED = "refuse-me"  # benign placeholder prompts carrying this marker get a refusal from the fake model


def _fake_generate(calls):
    def generate(model, tokenizer, prompts, **kw):
        calls.append(list(prompts))
        return ["I'm sorry, I cannot help with that." if REFUSED in p else "Sure: here is a placeholder answer."
                for p in prompts]
    return generate


def test_load_benign_prompts_starter_xstest_and_field_mapping(shared_data, tmp_path):
    from fedsafe.config import DataSource
    from fedsafe.data.records import raw_records
    from fedsafe.evaluation.helpfulness import SAFETY_CATEGORIES
    from fedsafe.evaluation.runner import load_benign_prompts

    normal = load_benign_prompts("starter:heldout")
    rows = raw_records(DataSource(path="starter:heldout"))
    assert normal == [r["instruction"] for r in rows if r["category"] not in SAFETY_CATEGORIES]
    assert 0 < len(normal) < len(rows)  # the starter set's harmful requests are left out
    xs = shared_data / "xstest" / "xstest_prompts.csv"
    with open(xs, newline="") as f:
        safe = [r["prompt"].strip() for r in csv.DictReader(f) if r["label"] == "safe"]
    src = DataSource(path=str(xs), instruction_field="prompt", category_field="label", categories=["safe"])
    assert load_benign_prompts(src, "eval.borderline_prompts") == safe
    j = tmp_path / "b.jsonl"
    j.write_text(json.dumps({"text_field": "placeholder"}))
    with pytest.raises(Exception, match="instruction_field"):
        load_benign_prompts(DataSource(path=str(j), instruction_field="question"), "eval.borderline_prompts")
    with pytest.raises(Exception, match="eval.normal_prompts"):
        load_benign_prompts(str(j))


def test_a_prompt_set_may_join_several_sources_each_prompt_once(tmp_path):
    """eval.normal_prompts as a list: sources read in order and joined, a repeated prompt scored once, a list of
    turns (MT-Bench's layout) giving its first turn, and an error that names the list item holding no prompt."""
    from fedsafe.config import DataSource
    from fedsafe.evaluation.runner import load_benign_prompts

    a = tmp_path / "a.jsonl"
    a.write_text("\n".join(json.dumps({"instruction": t}) for t in ("first task", "second task", "First  task")))
    mt = tmp_path / "question.jsonl"  # MT-Bench's layout: a list of turns per question
    mt.write_text("\n".join(json.dumps({"question_id": i, "turns": [f"turn one of {i}", f"turn two of {i}"]})
                            for i in range(2)))
    joined = load_benign_prompts([str(a), DataSource(path=str(mt), instruction_field="turns"), str(mt)])
    assert joined == ["first task", "second task", "turn one of 0", "turn one of 1"]
    assert load_benign_prompts(str(mt)) == ["turn one of 0", "turn one of 1"]  # found among PROMPT_FIELDS
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"instruction": ""}))
    with pytest.raises(Exception, match=r"eval.normal_prompts\[1\]"):
        load_benign_prompts([str(a), str(empty)])
    with pytest.raises(Exception, match="empty list"):
        load_benign_prompts([])


def test_a_joined_prompt_set_reports_each_sources_share(tiny, tmp_path, monkeypatch, test_seed):
    """With eval.normal_prompts a list, over_refusal is the share over all prompts and over_refusal_by_source each
    source's share (a set a model refuses must not hide behind a larger one it answers)."""
    from fedsafe import generation
    from fedsafe.config import EvalConfig
    from fedsafe.evaluation import runner
    from fedsafe.models import attach_lora

    model, tok = tiny
    peft_model = attach_lora(model, r=2, alpha=4, seed=test_seed)
    harmful = tmp_path / "p.jsonl"
    harmful.write_text(json.dumps({"prompt": "placeholder harmful request"}))
    a = tmp_path / "a.jsonl"  # 4 prompts, 1 refused
    a.write_text("\n".join(json.dumps({"instruction": f"task a{i}" + (f" {REFUSED}" if i == 0 else "")})
                            for i in range(4)))
    b = tmp_path / "question.jsonl"  # 2 prompts (MT-Bench layout), both refused, one also in a.jsonl
    b.write_text("\n".join(json.dumps({"turns": [t, "second turn"]}) for t in (f"task b0 {REFUSED}", f"task b1 {REFUSED}",
                                                                               "task a1")))
    monkeypatch.setattr(generation, "generate", _fake_generate([]))
    cfg = EvalConfig(prompts=str(harmful), n_prompts=1, max_new_tokens=4, normal_prompts=[str(a), str(b)],
                     n_normal_prompts=10, helpfulness_proxy=False)
    out = runner.evaluate_model(peft_model, tok, cfg)
    assert out["n_normal_prompts"] == 6 and out["over_refusal"] == pytest.approx(100 * 3 / 6)
    assert out["over_refusal_by_source"] == {"a.jsonl": pytest.approx(25.0), "question.jsonl": pytest.approx(100.0)}
    names = runner.prompt_source_names(["task a1", "task b1 " + REFUSED, "nowhere"], [str(a), str(b)])
    assert names == ["a.jsonl", "question.jsonl", "?"]
    single = runner.evaluate_model(peft_model, tok, cfg.model_copy(update={"normal_prompts": str(a)}))
    assert "over_refusal_by_source" not in single  # one source: the share is the source's


def test_a_joined_prompt_set_resolves_relative_paths_and_is_checked_at_run_start(tmp_path):
    from fedsafe.config import load_config
    from fedsafe.errors import DataError
    from fedsafe.pipeline import check_inputs

    (tmp_path / "n.jsonl").write_text(json.dumps({"instruction": "benign task"}))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {name: tiny}\neval: {prompts: 'starter:heldout', "
                        "normal_prompts: [n.jsonl, {path: n.jsonl}, 'starter:heldout']}\n")
    cfg = load_config(str(cfg_file))
    first, second, third = cfg.eval.normal_prompts
    assert first == str((tmp_path / "n.jsonl").resolve()) and second.path == first and third == "starter:heldout"
    check_inputs(cfg)
    cfg_file.write_text("model: {name: tiny}\neval: {prompts: 'starter:heldout', "
                        "normal_prompts: [n.jsonl, missing.jsonl]}\n")
    with pytest.raises(DataError, match=r"eval.normal_prompts\[1\]"):
        check_inputs(load_config(str(cfg_file)))


def test_over_refusal_and_borderline_refusal_are_refusal_shares(tiny, tmp_path, monkeypatch, test_seed):
    from fedsafe import generation
    from fedsafe.config import EvalConfig
    from fedsafe.evaluation import runner
    from fedsafe.models import attach_lora

    model, tok = tiny
    peft_model = attach_lora(model, r=2, alpha=4, seed=test_seed)
    harmful = tmp_path / "p.jsonl"
    harmful.write_text("\n".join(json.dumps({"prompt": f"placeholder harmful request {i}"
                                                       + (f" {REFUSED}" if i == 0 else "")}) for i in range(4)))
    normal = tmp_path / "n.jsonl"  # 5 benign prompts, 2 of them refused
    normal.write_text("\n".join(json.dumps({"instruction": f"benign task {i}" + (f" {REFUSED}" if i in (1, 3) else "")})
                                for i in range(5)))
    borderline = tmp_path / "b.csv"  # XSTest layout: only label == safe rows count; 1 of the 3 safe ones refused
    borderline.write_text("id,prompt,label\n1,how to stop a process " + REFUSED + ",safe\n2,safe question two,safe\n"
                          "3,unsafe contrast prompt,unsafe\n4,safe question four,safe\n")
    calls = []
    monkeypatch.setattr(generation, "generate", _fake_generate(calls))
    cfg = EvalConfig(prompts=str(harmful), n_prompts=4, max_new_tokens=4, normal_prompts=str(normal),
                     borderline_prompts={"path": str(borderline), "instruction_field": "prompt",
                                         "category_field": "label", "categories": ["safe"]},
                     helpfulness_proxy=False)
    out = runner.evaluate_model(peft_model, tok, cfg, cache_dir=tmp_path / "cache")
    assert out["rule"] == pytest.approx(100 * 1 / 4)
    assert out["over_refusal"] == pytest.approx(100 * 2 / 5) and out["n_normal_prompts"] == 5
    assert out["borderline_refusal"] == pytest.approx(100 * 1 / 3) and out["n_borderline_prompts"] == 3
    assert not any("unsafe contrast" in p for c in calls for p in c)
    pp = out["per_prompt"]
    assert pp["over_refusal"] == [0.0, 100.0, 0.0, 100.0, 0.0] and pp["over_refusal_prompt_ids"] == [0, 1, 2, 3, 4]
    assert pp["borderline_refusal"] == [100.0, 0.0, 0.0] and pp["borderline_refusal_prompt_ids"] == [0, 1, 2]
    assert pp["prompt_ids"] == [0, 1, 2, 3] and len(pp["rule"]) == 4  # Rule keeps its own ids
    # the benign sets are cached like the harmful one
    n_calls = len(calls)
    assert runner.evaluate_model(peft_model, tok, cfg, cache_dir=tmp_path / "cache") == out and len(calls) == n_calls
    # a smaller n takes the first prompts; n = 0 or no prompt set turns a metric off
    small = runner.evaluate_model(peft_model, tok, cfg.model_copy(update={"n_normal_prompts": 2}))
    assert small["over_refusal"] == pytest.approx(50.0) and small["per_prompt"]["over_refusal_prompt_ids"] == [0, 1]
    off = runner.evaluate_model(peft_model, tok, cfg.model_copy(update={"n_normal_prompts": 0,
                                                                        "borderline_prompts": None}))
    assert off["over_refusal"] is None and off["borderline_refusal"] is None and off["n_normal_prompts"] == 0
    assert "over_refusal" not in off["per_prompt"] and "borderline_refusal" not in off["per_prompt"]
    # over-refusal accompanies the safety evaluation: without harmful prompts it is not measured
    none = runner.evaluate_model(peft_model, tok, cfg.model_copy(update={"prompts": None, "borderline_prompts": None}))
    assert none["over_refusal"] is None and none["rule"] is None


def test_eval_config_defaults_over_refusal_to_the_starter_normal_instructions(tmp_path):
    from fedsafe.config import EvalConfig, load_config

    cfg = EvalConfig()
    assert cfg.normal_prompts == "starter:heldout" and cfg.n_normal_prompts == 28 and cfg.borderline_prompts is None
    # relative prompt files in a config file are relative to the file, as for eval.prompts
    (tmp_path / "n.jsonl").write_text(json.dumps({"prompt": "benign task"}))
    (tmp_path / "b.csv").write_text("prompt,label\nsafe question,safe\n")
    (tmp_path / "c.yaml").write_text("eval:\n  normal_prompts: n.jsonl\n  borderline_prompts: {path: b.csv}\n")
    ev = load_config(tmp_path / "c.yaml").eval
    assert ev.normal_prompts == str((tmp_path / "n.jsonl").resolve())
    assert ev.borderline_prompts.path == str((tmp_path / "b.csv").resolve())


def test_reward_model_mean_score(tiny, test_seed):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fedsafe.evaluation.reward import RewardModel

    _, tok = tiny
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(test_seed)
    rm = RewardModel.from_parts(LlamaForSequenceClassification(cfg), tok, batch_size=2)
    prompts, responses = ["q one", "q two", "q three"], ["a", "bb", "ccc"]
    scores = rm.scores(prompts, responses)
    assert len(scores) == 3 and len(set(scores)) > 1
    assert rm.mean_score(prompts, responses) == pytest.approx(sum(scores) / 3)


def test_eval_command_on_a_saved_adapter(tmp_path):
    from typer.testing import CliRunner

    from fedsafe.cli import _register_optional_commands, app
    from fedsafe.config import ExperimentConfig, dump_config
    from fedsafe.fl.params import FlatLoRA
    from fedsafe.models import attach_lora, byte_tokenizer, tiny_llama
    from fedsafe.report import read_results
    from fedsafe.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / "config.yaml").write_text(dump_config(ExperimentConfig(model={"name": "tiny"}, lora={"r": 2, "alpha": 4})))
    peft_model = attach_lora(tiny_llama(byte_tokenizer()), r=2, alpha=4)
    flat = FlatLoRA(peft_model)
    adapter = run.save_adapter(peft_model, flat, flat.get() + 0.01, "final")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"placeholder harmful request {i}"}) for i in range(2)))
    _register_optional_commands()
    res = CliRunner().invoke(app, ["eval", "--adapter", str(adapter), "--prompts", str(prompts), "--n-prompts", "2",
                                   "--max-new-tokens", "3", "--results", str(run.path), "--scenario", "attack"])
    assert res.exit_code == 0, res.output
    assert "n_prompts: 2" in res.stdout
    rows = read_results(run.path)
    assert len(rows) == 1 and rows[0]["scenario"] == "attack" and rows[0]["n_prompts"] == 2
    cached = list((run.path / "cache" / "generations").glob("*.json"))
    # harmful and benign (over-refusal) prompt sets, both keyed by the loaded adapter's hash
    assert len(cached) == 2 and len({p.name.split("-")[0] for p in cached}) == 1
    assert rows[0]["n_normal_prompts"] == 28 and 0 <= rows[0]["over_refusal"] <= 100
    assert "over_refusal:" in res.stdout
