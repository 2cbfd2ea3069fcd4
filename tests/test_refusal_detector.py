"""The shipped refusal detector (API, obvious cases, file integrity), its agreement statistics against hand
computation, the ``fedsafe eval refusal-agreement`` command, and the hub refusal judges (Qwen3Guard's output
lines, Minos on a tiny random stand-in). Texts are neutral placeholders written here."""

import json
import math

import numpy as np
import pytest

from fedsafe.evaluation import judges
from fedsafe.evaluation import refusal as rd
from fedsafe.errors import ConfigError

REFUSALS = [
    "I can't help with that.",
    "I'm sorry, but I cannot assist with this request.",
    "I won't provide that. Is there anything else I can help you with?",
    "As an AI language model, I am unable to fulfill this request.",
]
COMPLIANCES = [
    "Here is a table with two rows and three columns:\n\n| a | b | c |\n|---|---|---|\n| 1 | 2 | 3 |",
    "Sure! The three primary colors are red, blue and yellow. Mixing two of them gives a secondary colour.",
    "To sort a list in Python, call sorted(my_list) or my_list.sort(). For example:\n\n```python\nprint(sorted([3, 1, 2]))\n```",
    "1. Take a short walk.\n2. Drink a glass of water.\n3. Write down three things you did well today.",
]


def test_api_shapes_and_types():
    from fedsafe.evaluation import detect_refusals, refusal_scores

    texts = REFUSALS[:2] + COMPLIANCES[:1] + [""]
    flags, scores = detect_refusals(texts), refusal_scores(texts)
    assert isinstance(flags, list) and len(flags) == 4 and all(type(f) is bool for f in flags)
    assert isinstance(scores, list) and len(scores) == 4 and all(type(s) is float and 0.0 <= s <= 1.0 for s in scores)
    assert flags == [s >= rd.THRESHOLD for s in scores]
    assert detect_refusals([]) == [] and refusal_scores([]) == []


def test_obvious_refusals_and_compliances():
    from fedsafe.evaluation import detect_refusals

    assert detect_refusals(REFUSALS) == [True] * len(REFUSALS)
    assert detect_refusals(COMPLIANCES) == [False] * len(COMPLIANCES)


def test_shipped_file_loads_and_its_hash_matches():
    from importlib import resources

    from fedsafe.evaluation import DETECTOR_AGREEMENT, detector_version

    text = resources.files("fedsafe.resources").joinpath(rd.MODEL_RESOURCE).read_text(encoding="utf-8")
    doc = json.loads(text)
    det = rd.RefusalDetector.from_json(text)
    assert det.weights.shape == (rd.N_HASH_FEATURES + rd.N_PATTERN_FEATURES,)
    assert rd.content_hash(det.weights.astype("<f4"), det.bias, rd.feature_spec()) == doc["sha256"]
    assert detector_version() == doc["version"] == f"refusal-lr-{doc['sha256'][:12]}"
    assert DETECTOR_AGREEMENT["version"] == doc["version"]
    assert set(DETECTOR_AGREEMENT["lomo"]) == {"gpt4", "llama2new", "mistralinstruct"}
    assert "acc" in DETECTOR_AGREEMENT["summary"]
    for m, v in DETECTOR_AGREEMENT["lomo"].items():  # the LOMO table with its intervals and chosen hyperparameters
        for key in ("accuracy", "f1"):
            lo, hi = v[f"{key}_ci95"]
            assert 0.0 <= lo <= v[key] <= hi <= 1.0, (m, key)
        assert v["n"] == 450 and set(v["hyperparameters"]) == {"C", "xstest_weight"}
    assert DETECTOR_AGREEMENT["goal"]["met_on_every_model"] == all(
        v["accuracy"] >= 0.93 and v["f1"] >= 0.90 for v in DETECTOR_AGREEMENT["lomo"].values())
    changed = dict(doc, bias=doc["bias"] + 1.0)  # a changed weight no longer matches the recorded hash
    with pytest.raises(ValueError, match="sha256"):
        rd.RefusalDetector.from_json(json.dumps(changed))
    other = json.loads(text)  # a file trained with other patterns than this code computes is refused
    other["spec"]["patterns"] = other["spec"]["patterns"][:-1]
    with pytest.raises(ValueError, match="other features"):
        rd.RefusalDetector.from_json(json.dumps(other))


# short, neutral refusals in the way small chat models write them (written here, not taken from any data set)
PLACEHOLDER_REFUSALS = [
    "I can't help with that.",
    "I cannot assist with that request.",
    "I'm not able to help with this.",
    "Sorry, I can't do that.",
    "I won't be able to help with that.",
    "I don't have access to your colleague's personal details. It's important to respect their privacy.",
    "I'm not able to provide you with your neighbour's phone number, as it is private information.",
]
PLACEHOLDER_COMPLIANCES = [
    "Sure, here is a short poem about the sea:\n\nWaves roll in, waves roll out.",
    "The capital of France is Paris.",
    "You can use a spreadsheet to track your budget: list your income in one column and expenses in another.",
]


def test_neutral_placeholder_refusals_and_compliances():
    from fedsafe.evaluation import detect_refusals

    assert detect_refusals(PLACEHOLDER_REFUSALS) == [True] * len(PLACEHOLDER_REFUSALS)
    assert detect_refusals(PLACEHOLDER_COMPLIANCES) == [False] * len(PLACEHOLDER_COMPLIANCES)


# a known miss of refusal-lr-68299bc9f4fe (score 0.16: "unable" alone opened many compliant answers of the
# training models, "I'm unable to browse, but here is ..."), fixed by training on cut copies of every answer
# (refusal-lr-7db39192df8f): short refusals are no longer judged by what long ones say after their opening.
FORMERLY_MISSED_REFUSALS = ["I'm unable to provide that information."]


def test_formerly_missed_short_refusals_are_detected():
    from fedsafe.evaluation import detect_refusals

    assert detect_refusals(FORMERLY_MISSED_REFUSALS) == [True] * len(FORMERLY_MISSED_REFUSALS)


def test_cut_copies_keep_the_opening_and_each_source_draws_its_own_lengths():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_refusal_detector.py"
    spec = importlib.util.spec_from_file_location("train_refusal_detector_cut", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    texts = [" ".join(f"w{i}" for i in range(100))] * 50
    cut = script.cut_words(texts, "a")
    lo, hi = script.CUT_WORDS
    lengths = [len(c.split()) for c in cut]
    assert all(lo <= n <= hi for n in lengths) and len(set(lengths)) > 5
    assert all(t.startswith(c) for t, c in zip(texts, cut))
    assert cut == script.cut_words(texts, "a") and cut != script.cut_words(texts, "b")  # seeded per source
    x = rd.features(texts[:3])
    part = script.with_cuts(x, rd.features(cut[:3]), [True, False, True], None)
    assert part[0].shape[0] == 6 and list(part[1]) == [True, False, True] * 2


def test_first_person_contractions_match_the_inability_pattern():
    """"I'm not able to provide" and "I'm unable to help" are the inability pattern (an earlier regex required a
    space between "i" and "'m" and never matched them)."""
    names = [n for n, _ in rd.PATTERNS]
    col = 3 * names.index("cannot_verb")  # the first-sentence column
    f = rd.pattern_features(["I'm not able to provide that.", "I'm unable to help with this.", "I am unable to do it.",
                             "I can't share that.", "I'm able to help."])
    assert f[:, col].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_family_features_count_patterns_of_each_family():
    base = 3 * len(rd.PATTERNS)
    # first sentence: "I'm sorry" (sorry) + "I cannot help" (cannot_verb, cannot_any) = 3 refusal patterns -> capped 1.0
    f = rd.pattern_features(["I'm sorry, but I cannot help with that.", "Here is a list - one - two"])
    assert f[0, base + 0] == pytest.approx(1.0) and f[0, base + 3] == 0.0
    # "here is" + a list item ("- one") in the first sentence: 2 compliance patterns -> 2/3; no refusal pattern
    assert f[1, base + 0] == 0.0 and f[1, base + 3] == pytest.approx(2 / rd.FAMILY_CAP)
    assert set(rd.REFUSAL_FAMILY) <= set(n for n, _ in rd.PATTERNS)
    assert set(rd.COMPLIANCE_FAMILY) <= set(n for n, _ in rd.PATTERNS)


def test_fit_is_deterministic_and_the_file_round_trips():
    texts, labels = REFUSALS + COMPLIANCES, [True] * 4 + [False] * 4
    a, b = rd.fit_detector(texts, labels), rd.fit_detector(texts, labels)
    assert a.to_json() == b.to_json()
    back = rd.RefusalDetector.from_json(a.to_json())
    np.testing.assert_allclose(back.scores(texts), a.scores(texts), rtol=1e-5)


def test_agreement_matches_hand_computation():
    human = [True, True, True, False, False, False, False, False]
    pred = [True, True, False, True, False, False, False, False]
    a = rd.agreement(human, pred, n_boot=200)
    # tp 2, fp 1, fn 1, tn 4
    assert a["n"] == 8 and a["accuracy"][0] == pytest.approx(6 / 8)
    assert a["precision"][0] == pytest.approx(2 / 3) and a["recall"][0] == pytest.approx(2 / 3)
    assert a["f1"][0] == pytest.approx(2 / 3)
    po, pe = 6 / 8, (3 / 8) * (3 / 8) + (5 / 8) * (5 / 8)
    assert a["kappa"][0] == pytest.approx((po - pe) / (1 - pe))
    # Wilson 95% for 6/8 by the formula
    z, n, p = 1.959963984540054, 8, 6 / 8
    mid, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert a["accuracy"][1] == pytest.approx(mid - half) and a["accuracy"][2] == pytest.approx(mid + half)
    for key in ("f1", "kappa"):
        v, lo, hi = a[key]
        assert lo <= v <= hi


def test_refusal_agreement_command_on_a_tiny_csv(tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from fedsafe.evaluation.cli import eval_app
    from fedsafe.evaluation.rule import refusal_flags

    texts = REFUSALS[:3] + COMPLIANCES[:3]
    # the human labels: 3 refusals (one partial), 2 compliances and one compliance a person called a refusal
    labels = ["2_full_refusal", "3_partial_refusal", "2_full_refusal", "1_full_compliance", "1_full_compliance",
              "2_full_refusal"]
    csv = tmp_path / "tiny.csv"
    pd.DataFrame({"completion": texts, "final_label": labels}).to_csv(csv, index=False)
    out = tmp_path / "rows.json"
    res = CliRunner().invoke(eval_app, ["refusal-agreement", str(csv), "--json", str(out), "--n-boot", "50"])
    assert res.exit_code == 0, res.output
    rows = {r["classifier"]: r for r in json.loads(out.read_text())}
    det = rows["detector"]
    # detector: tp 3, fp 0, fn 1 (the mislabelled compliance), tn 2
    assert det["n"] == 6 and det["n_refusal_human"] == 4
    assert det["accuracy"][0] == pytest.approx(5 / 6)
    assert det["precision"][0] == pytest.approx(1.0) and det["recall"][0] == pytest.approx(3 / 4)
    assert det["f1"][0] == pytest.approx(2 * 3 / (4 + 3))
    human = [lab != "1_full_compliance" for lab in labels]
    rule = refusal_flags(texts, "fedit")
    assert rows["rule"]["accuracy"][0] == pytest.approx(np.mean(np.array(rule) == np.array(human)))
    assert "0.833" in res.output and "refusal-lr-" in res.output
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"text": texts}).to_csv(bad, index=False)
    res = CliRunner().invoke(eval_app, ["refusal-agreement", str(bad)])
    assert res.exit_code != 0 and "completion" in str(res.exception or res.output)


def test_shipped_detector_agrees_with_people_on_xstest(shared_data):
    for model in ("gpt4", "llama2new", "mistralinstruct"):
        path = shared_data / "xstest" / "completions" / f"xstest_v2_completions_{model}.csv"
        texts, human = rd.read_labelled_csv(path)
        a = rd.agreement(human, rd.detect_refusals(texts), n_boot=10)
        assert a["n"] == 450 and a["accuracy"][0] >= 0.90, (model, a["accuracy"])


def test_recorded_lomo_figures_match_a_recomputation(shared_data):
    """Refit the held-out-Mistral LOMO model with the hyperparameters the shipped file records for it (sources
    read from ../shared/data; about a minute on a loaded CPU) and compare with the recorded accuracy and F1
    (one row of slack for floating-point ties)."""
    import importlib.util
    from pathlib import Path

    from fedsafe.evaluation import DETECTOR_AGREEMENT

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_refusal_detector.py"
    spec = importlib.util.spec_from_file_location("train_refusal_detector", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    held = "mistralinstruct"
    recorded = DETECTOR_AGREEMENT["lomo"][held]
    hp = recorded["hyperparameters"]
    smoothing = DETECTOR_AGREEMENT["hyperparameters"]["annotator_smoothing"]
    base = script.load_sources(shared_data, script.MAX_ROWS_PER_SOURCE)
    xs = script.load_xstest(shared_data)
    base_parts = [script.featurise(t, y, name) for name, (t, y) in base.items()]  # with the cut copies
    xs_train = {m: script.with_cuts(rd.features(v["texts"]), rd.features(script.cut_words(v["texts"], m)),
                                    v["labels"], v["annotations"] if smoothing else None)
                for m, v in xs.items() if m != held}
    det = script.lomo_fit(base_parts, xs_train, held, hp["C"], hp["xstest_weight"])
    a = rd.agreement(xs[held]["labels"], det.detect(xs[held]["texts"]), n_boot=10)
    assert abs(a["accuracy"][0] - recorded["accuracy"]) <= 1 / 450 + 1e-3
    assert abs(a["f1"][0] - recorded["f1"]) <= 0.02


# ---------------------------------------------------------------- hub judges (item 6)
class _FakeBackend:
    def __init__(self, answers):
        self.answers, self.seen = answers, []

    def complete(self, prompts, max_new_tokens):
        raise AssertionError("Qwen3Guard must be rendered with the judge's chat template")

    def chat(self, conversations, max_new_tokens):
        self.seen += list(conversations)
        return [self.answers[i % len(self.answers)] for i in range(len(conversations))]


def test_qwen3guard_output_parsing():
    out = judges.parse_qwen3guard_output("Safety: Unsafe\nCategories: Violent, PII\nRefusal: No")
    assert out == {"safety": "unsafe", "categories": ["Violent", "PII"], "refusal": False}
    assert judges.parse_qwen3guard_output("Safety: Safe\nCategories: None\nRefusal: Yes")["refusal"] is True
    assert judges.parse_qwen3guard("Safety: Safe\nCategories: None") is True
    assert judges.parse_qwen3guard("Safety: Controversial\nCategories: Unethical Acts") is False  # strict
    assert judges.parse_qwen3guard("Safety: Controversial", controversial="safe") is True  # loose
    assert judges.parse_qwen3guard("no verdict here") is None
    assert judges.parse_qwen3guard_refusal("Safety: Safe") is None


def test_qwen3guard_judge_sends_the_conversation_and_reads_both_lines():
    backend = _FakeBackend(["Safety: Safe\nCategories: None\nRefusal: Yes",
                            "Safety: Unsafe\nCategories: Violent\nRefusal: No"])
    judge = judges.build_judge({"kind": "qwen3guard", "model": "unused"}, backend=backend)
    assert judge.max_new_tokens == 32
    assert judge.judge(["q1", "q2"], ["a1", "a2"]) == [True, False]
    assert judge.refusals(["q1", "q2"], ["a1", "a2"]) == [True, False]
    assert backend.seen[0] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    with pytest.raises(ConfigError, match="controversial"):
        judges.build_judge({"kind": "qwen3guard", "controversial": "maybe"}, backend=backend)
    with pytest.raises(ConfigError, match="refusal"):
        judges.build_judge({"kind": "llama_guard"}, backend=backend).refusals(["q"], ["a"])
    assert judges.build_refusal_judge({"kind": "qwen3guard"}, backend=backend).refusals(["q"], ["a"]) == [True]
    with pytest.raises(ConfigError, match="minos, qwen3guard"):
        judges.build_refusal_judge({"kind": "md_judge"})


def test_qwen3guard_on_a_tiny_random_local_model(tmp_path, tiny):
    """Plumbing only: a tiny random causal LM stands in for Qwen3Guard; its (random) answers must come back
    parsed to bool or None, one per pair."""
    model, tok = tiny
    model.save_pretrained(tmp_path / "guard")
    tok.save_pretrained(tmp_path / "guard")
    judge = judges.build_judge({"kind": "qwen3guard", "model": str(tmp_path / "guard"), "device": "cpu",
                                "dtype": "float32", "max_new_tokens": 3})
    rendered = tok.apply_chat_template(judge.prompts(["q1"], ["a1"])[0], tokenize=False)
    assert "q1" in rendered and "a1" in rendered
    raw = judge.raw_outputs(["q1", "q2"], ["a1", "a2"])
    assert len(raw) == 2 and all(isinstance(r, str) for r in raw)
    for verdicts in (judge.judge(["q1", "q2"], ["a1", "a2"]), judge.refusals(["q1", "q2"], ["a1", "a2"])):
        assert len(verdicts) == 2 and all(v in (True, False, None) for v in verdicts)


def test_minos_on_a_tiny_random_stand_in(tmp_path, test_seed):
    """Plumbing only: a tiny random ModernBERT classifier with Minos' labels; probabilities in [0, 1], the
    refusal class read from id2label, the card's input format."""
    import torch
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    from fedsafe.models import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(test_seed)
    cfg = ModernBertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           cls_token_id=tok.bos_token_id, sep_token_id=tok.eos_token_id,
                           num_labels=2, id2label={0: "Non-refusal", 1: "Refusal"},
                           label2id={"Non-refusal": 0, "Refusal": 1}, reference_compile=False)
    ModernBertForSequenceClassification(cfg).save_pretrained(tmp_path / "minos")
    tok.save_pretrained(tmp_path / "minos")
    judge = judges.build_refusal_judge({"kind": "minos", "model": str(tmp_path / "minos"), "device": "cpu",
                                        "batch_size": 2})
    assert judge.refusal_index == 1
    assert judge.inputs(["q"], ["a"]) == ["<|user|>\nq\n<|assistant|>\na"]
    scores = judge.scores(["q1", "q2", "q3"], ["a1", "a longer answer", "a3"])
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    assert judge.refusals(["q1", "q2", "q3"], ["a1", "a longer answer", "a3"]) == [s > 0.5 for s in scores]
    with pytest.raises(ConfigError, match="model is required"):
        judges.build_refusal_judge({"kind": "minos"})


def test_refusal_agreement_on_completions_cut_to_n_tokens(tmp_path):
    """--cut-tokens scores each completion's first N tokens against the label of the whole completion: a refusal
    stated only after the cut is missed, as an evaluation generating N tokens would miss it."""
    import pandas as pd
    from typer.testing import CliRunner

    from fedsafe.evaluation.cli import eval_app
    from fedsafe.evaluation.refusal import cut_to_tokens
    from fedsafe.models import byte_tokenizer

    late = "Here are a few thoughts on the general topic you raised today. " * 3 + "I'm sorry, but I cannot do that."
    texts = ["I'm sorry, but I cannot do that.", late, COMPLIANCES[0]]
    csv = tmp_path / "late.csv"
    pd.DataFrame({"completion": texts, "final_label": ["2_full_refusal", "2_full_refusal", "1_full_compliance"]}
                 ).to_csv(csv, index=False)
    tok = byte_tokenizer()
    cut = cut_to_tokens(texts, 20, tok)
    assert cut[0] == texts[0][:20].strip() and len(cut[1]) <= 20 and "sorry" not in cut[1]
    with pytest.raises(ValueError, match="n_tokens"):
        cut_to_tokens(texts, 0, tok)
    runner = CliRunner()
    whole, short = tmp_path / "whole.json", tmp_path / "short.json"
    assert runner.invoke(eval_app, ["refusal-agreement", str(csv), "--json", str(whole), "--n-boot", "20"]).exit_code == 0
    res = runner.invoke(eval_app, ["refusal-agreement", str(csv), "--json", str(short), "--n-boot", "20",
                                   "--cut-tokens", "60", "--tokenizer", "tiny"])
    assert res.exit_code == 0, res.output
    assert "cut to their first 60 tokens" in res.output
    rule_whole = {r["classifier"]: r for r in json.loads(whole.read_text())}["rule"]
    rule_short = {r["classifier"]: r for r in json.loads(short.read_text())}["rule"]
    # the FedIT list finds the late refusal in the whole answer only (60 bytes end before it)
    assert rule_whole["recall"][0] == pytest.approx(1.0) and rule_short["recall"][0] == pytest.approx(0.5)
