"""Privacy: leakage metrics on fixed strings, and extraction attacks on a tiny model that memorised strings."""

import random

import pytest
import torch

from fedsafe.attacks import privacy as pv
from fedsafe.data.format import TokenizedExample, format_example
from fedsafe.evaluation import leakage as lk


@pytest.fixture(autouse=True)
def _one_thread():
    # two threads on a shared, loaded CPU are far slower than one for a model this small
    torch.set_num_threads(1)


# --- leakage metrics -----------------------------------------------------------------------------

def _lcs_dp(a, b):
    m = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            m[i + 1][j + 1] = m[i][j] + 1 if x == y else max(m[i][j + 1], m[i + 1][j])
    return m[-1][-1]


def test_bit_parallel_lcs_equals_dynamic_programming():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randint(0, 5) for _ in range(rng.randint(0, 40))]
        b = [rng.randint(0, 5) for _ in range(rng.randint(0, 90))]  # > 64 bits: big-int path
        assert pv.lk.lcs_length(a, b) == _lcs_dp(a, b)


def test_rouge_l_on_fixed_strings():
    # LCS("the cat sat on the mat", "the cat on mat") = 4: P = 4/6, R = 4/4, F1 = 0.8
    assert lk.rouge_l("the cat sat on the mat", "the cat on mat") == pytest.approx(0.8)
    assert lk.rouge_l("The Cat, sat.", "the cat sat") == 1.0  # case and punctuation are not words
    assert lk.rouge_l("alpha beta", "gamma delta") == 0.0
    assert lk.rouge_l("", "gamma") == 0.0


def test_exact_and_near_exact_rates_on_fixed_strings():
    refs = [" ".join(f"w{i}" for i in range(20)), "a completely different training text here", "short one"]
    one_word_changed = " ".join(f"w{i}" if i != 7 else "zz" for i in range(20))  # LCS 19/20 -> F1 0.95
    gens = [refs[0], one_word_changed, "nothing in common at all", refs[2] + " extra words appended now"]
    rep = lk.leakage(gens, refs)
    scores = [m.score for m in rep.matches]
    assert scores[0] == 1.0 and rep.matches[0].exact
    assert scores[1] == pytest.approx(0.95) and rep.matches[1].index == 0 and not rep.matches[1].exact
    assert scores[2] == 0.0 and rep.matches[2].index == -1
    assert scores[3] == pytest.approx(2 * (2 / 6) * 1 / ((2 / 6) + 1))  # LCS 2, P 2/6, R 1
    assert rep.summary["exact_rate"] == 0.25
    assert rep.summary["near_exact_rate"] == 0.5
    assert rep.summary["rougeL_mean"] == pytest.approx(sum(scores) / 4)


def test_ngram_prefilter_finds_the_exhaustive_best_match():
    rng = random.Random(1)
    vocab = [f"t{i}" for i in range(400)]
    refs = [" ".join(rng.choices(vocab, k=rng.randint(8, 30))) for _ in range(300)]
    gens = []
    for _ in range(60):  # noisy copies: drop/replace some words of a random training text
        w = rng.choice(refs).split()
        gens.append(" ".join(x if rng.random() > 0.25 else rng.choice(vocab) for x in w if rng.random() > 0.1))
    index = lk.ReferenceIndex(refs)
    fast = [index.best_match(g, k=8).score for g in gens]
    full = [index.best_match(g, exhaustive=True).score for g in gens]
    assert fast == pytest.approx(full)


def test_pairwise_completion_scores():
    out = lk.pairwise(["the secret is 42", "nope"], ["the secret is 42", "the secret is 43"])
    assert out["exact_rate"] == 0.5 and out["near_exact_rate"] == 0.5


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    kept = torch.isfinite(pv.top_p_filter(logits, 0.7))[0].tolist()
    assert kept == [False, True, False, True]  # 0.5 + 0.3 >= 0.7
    assert torch.isfinite(pv.top_p_filter(logits, 1.0)).all()


def test_canaries_are_seeded_and_follow_the_format():
    a, b = pv.make_canaries(5, 6, seed=3), pv.make_canaries(5, 6, seed=3)
    assert [c.response for c in a] == [c.response for c in b]
    assert len({c.name for c in a}) == 5
    for c in a:
        assert len(c.secret) == 6 and c.secret.isdigit()
        assert c.response == f"The account number of {c.name} is {c.secret}."
    assert [c.secret for c in pv.make_canaries(5, 6, seed=4)] != [c.secret for c in a]


def test_membership_auc_formula():
    assert pv.membership_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert pv.membership_auc([0, 1], [2, 3]) == 0.0
    assert pv.membership_auc([1, 2], [1, 2]) == 0.5


# --- attacks on a tiny model that memorised a few strings ------------------------------------------

OLD = ["zebra quartz jumps 7", "mango river sings 42"]
NEW = ["copper lantern owls 9", "silver kettle hums 5"]
NONMEMBERS = ["violet ocean drums 3", "amber forest winds 8", "cobalt meadow rings 1", "linen garden bells 6"]


def _plain(tok, text):
    ids = torch.tensor([tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id])
    return TokenizedExample(ids, ids.clone())


@pytest.fixture(scope="module")
def memorised():
    """A tiny model that memorised OLD, NEW and a canary; LoRA round 1 favours OLD, round 2 favours NEW.

    Returns the three global adapters (round 0 = LoRA init = the base model) on the one PEFT model.
    """
    from fedsafe.data.format import collate
    from fedsafe.fl.client import ClientData, LocalTrainer, RoundConfig
    from fedsafe.fl.params import FlatLoRA
    from fedsafe.models import attach_lora, byte_tokenizer, tiny_llama

    torch.set_num_threads(1)
    tok = byte_tokenizer()
    model = tiny_llama(tok, seed=0)
    # BOS doubles as the pad token, whose embedding row starts at zero: zero-input generation from BOS
    # would see a zero vector, so it gets a random row like any other token
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[tok.bos_token_id] = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0)) * 0.02
    canary = pv.make_canaries(1, 4, seed=11)[0]
    canary_ex = format_example(tok, canary.instruction, canary.response, 256)
    old, new = [_plain(tok, s) for s in OLD], [_plain(tok, s) for s in NEW]
    # memorising through LoRA alone takes hundreds of steps on this random model: the base learns the
    # strings (full fine-tuning is fast), and the LoRA rounds shift which of them the model prefers
    batch = collate(old + new + [canary_ex] * 2, tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(200):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    peft = attach_lora(model, r=8, alpha=16, seed=0)
    flat = FlatLoRA(peft)
    trainer = LocalTrainer(peft, tok)
    theta0 = flat.get()
    rc = dict(batch_size=8, max_grad_norm=None, lr=5e-3, local_steps=15)
    r1 = trainer.fit(ClientData("v", "victim", old * 3 + new), theta0, RoundConfig(round=1, **rc))
    theta1 = theta0 + r1.update
    r2 = trainer.fit(ClientData("v", "victim", old + new * 3), theta1, RoundConfig(round=2, **rc))
    theta2 = theta1 + r2.update
    flat.set(theta2)
    return {"model": peft, "tok": tok, "flat": flat, "rounds": [theta0, theta1, theta2], "canary": canary}


def test_zero_input_generation_extracts_memorised_strings(memorised):
    m, tok = memorised["model"], memorised["tok"]
    gens = pv.zero_input_attack(m, tok, 16, max_new_tokens=28, temperature=0.3, top_p=0.9, seed=0)
    rep = lk.leakage(gens, OLD + NEW)
    assert rep.summary["near_exact_rate"] >= 0.5, gens
    assert rep.summary["distinct_sources"] >= 2


def test_partial_input_completion_reconstructs_suffixes(memorised):
    m, tok = memorised["model"], memorised["tok"]
    samples = [_plain(tok, s).input_ids.tolist() for s in OLD + NEW]
    comps = pv.partial_input_attack(m, tok, samples, 0.3)
    assert sum(c.completion == c.target for c in comps) >= 3, comps
    assert lk.pairwise([c.completion for c in comps], [c.target for c in comps])["near_exact_rate"] >= 0.75


def test_membership_inference_separates_members(memorised):
    m, tok = memorised["model"], memorised["tok"]
    res = pv.membership_inference(m, [_plain(tok, s) for s in OLD + NEW], [_plain(tok, s) for s in NONMEMBERS],
                                  tok.pad_token_id)
    assert res["auc"] == 1.0 and res["member_loss"] < res["nonmember_loss"]
    # calibrated by the base model, which already knew OLD: only what the adapters learned (NEW) stands out
    new = pv.membership_inference(m, [_plain(tok, s) for s in NEW], [_plain(tok, s) for s in NONMEMBERS],
                                  tok.pad_token_id)
    assert new["auc_ref"] == 1.0


def test_canary_exposure_and_extraction(memorised):
    m, tok, c = memorised["model"], memorised["tok"], memorised["canary"]
    e = pv.canary_exposure(m, tok, c, n_candidates=63, digits=4, seed=0)
    assert e["rank"] == 1 and e["exposure"] == pytest.approx(6.0)  # log2(64) - log2(1)
    x = pv.canary_extraction(m, tok, c, n_samples=4, temperature=0.3, top_p=0.9, seed=0)
    assert x["greedy_extracted"] and x["extraction_rate"] >= 0.5
    # a canary that was never inserted ranks like any candidate
    other = pv.make_canaries(1, 4, seed=12)[0]
    assert pv.canary_exposure(m, tok, other, n_candidates=63, digits=4, seed=0)["exposure"] < 4.0


def test_logit_contrast_uses_the_reference_adapter_exactly(memorised):
    m, tok, flat = memorised["model"], memorised["tok"], memorised["flat"]
    theta0, theta1, theta2 = memorised["rounds"]
    ids = _plain(tok, NEW[0]).input_ids[None]
    with torch.no_grad():
        z2 = m(input_ids=ids).logits
        flat.set(theta1)
        z1 = m(input_ids=ids).logits
        flat.set(theta2)
        contrast = pv.LogitContrast(pv.adapter_params(m, flat, theta1), alpha=0.5)
        z = pv._contrasted_logits(m, contrast, input_ids=ids)
    assert torch.allclose(z, z2 + 0.5 * (z2 - z1), atol=1e-4)
    assert torch.equal(flat.get(), theta2)  # the loaded adapter was never touched


def test_multi_round_contrast_favours_recently_learned_strings(memorised):
    m, tok, flat = memorised["model"], memorised["tok"], memorised["flat"]
    theta0, theta1, theta2 = memorised["rounds"]
    kw = dict(max_new_tokens=28, temperature=0.7, top_p=0.95, seed=1)

    def new_share(gens):  # generations whose best-matching training string is one learned in round 2
        rep = lk.leakage(gens, OLD + NEW)
        return sum(mt.index >= len(OLD) and mt.score >= 0.3 for mt in rep.matches) / len(gens)

    plain = pv.zero_input_attack(m, tok, 24, **kw)
    contrast = pv.zero_input_attack(m, tok, 24, contrast=pv.LogitContrast(pv.adapter_params(m, flat, theta1), 1.0),
                                    **kw)
    # LoRA factors are extrapolated separately (B'A' is quadratic in alpha), so a small alpha already moves far
    flat.set(theta2 + 0.25 * (theta2 - theta1))
    try:
        param = pv.zero_input_attack(m, tok, 24, **kw)
    finally:
        flat.set(theta2)
    assert new_share(contrast) > new_share(plain), (plain, contrast)
    assert new_share(param) >= new_share(plain), (plain, param)


def test_kv_cached_sampler_matches_full_recomputation(memorised):
    m, tok = memorised["model"], memorised["tok"]
    prompts = [[tok.bos_token_id, 104, 105], [tok.bos_token_id]]  # different lengths: left padding
    got = pv.sample_sequences(m, prompts, max_new_tokens=6, pad_id=tok.pad_token_id, eos_id=None, greedy=True)
    for p, g in zip(prompts, got):
        ids = list(p)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(m(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert g == ids[len(p):]


# --- wiring: one tiny experiment with the privacy block, client-level DP and constrained updates -----

def test_pipeline_runs_attacks_dp_accounting_and_writes_the_table(tmp_path):
    import json

    from fedsafe.config import ExperimentConfig
    from fedsafe.pipeline import run_experiment
    from fedsafe.rundir import RunDir

    rows = [{"instruction": f"Note {i}?", "response": f"record {i} says {w} {i * 7}"}
            for i, w in enumerate(["river", "lamp", "stone", "cloud", "tree", "field"])]
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    held = [{"instruction": f"Other {i}?", "response": f"entry {i} notes {w}"} for i, w in enumerate(["boat", "hill"])]
    (tmp_path / "h.jsonl").write_text("\n".join(json.dumps(r) for r in held))
    cfg = ExperimentConfig.model_validate({
        "name": "pv", "output_dir": str(tmp_path / "runs"), "model": {"name": "tiny"}, "lora": {"r": 4, "alpha": 8},
        "roles": [{"name": "victim", "clients": 2, "data": [{"path": str(tmp_path / "v.jsonl")}]}],
        "data": {"samples_per_client": 3, "max_length": 128, "heldout": [{"path": str(tmp_path / "h.jsonl")}]},
        "fl": {"rounds": 2, "clients_per_round": 2, "local_steps": 2, "batch_size": 2},
        "eval": {"prompts": None},
        "privacy": {"enabled": True, "variants": ["plain", "logit_contrast", "param_contrast"], "n_zero_input": 2,
                    "max_new_tokens": 4, "prefix_fractions": [0.5], "n_partial": 2, "n_mia": 2,
                    "canaries": {"n": 1, "repeats": 2, "digits": 3, "n_candidates": 10, "n_samples": 1}},
        "dp": {"client_level": True, "noise_multiplier": 0.8, "clip_norm": 0.5},
        "constrained": {"l2_mu": 0.01, "kl_beta": 0.1}})
    res = run_experiment(cfg, progress=False)
    rd = RunDir(res.run_dir)
    dp_recs = rd.records("dp")
    assert [r["round"] for r in dp_recs] == [1, 2] and dp_recs[0]["epsilon"] < dp_recs[1]["epsilon"]
    priv = rd.records("privacy")
    assert {r["variant"] for r in priv} == {"plain", "logit_contrast", "param_contrast"}
    assert all(r["round"] == 2 for r in priv) and "mia_auc" in priv[0] and "canary_exposure" in priv[0]
    canaries = json.loads((rd.path / "privacy" / "canaries.json").read_text())
    assert len(canaries) == 1 and canaries[0]["client_id"] in {"client_00", "client_01"}
    table = (rd.path / "privacy_table.md").read_text()
    assert "client-DP(sigma=0.8,C=0.5)+L2(mu=0.01)+KL(beta=0.1)" in table
    assert (rd.path / "plots" / "privacy_leakage_utility.png").exists()
    rows_ = lk.leakage_utility_rows([rd.path])
    assert len(rows_) == 3 and rows_[0]["epsilon"] == pytest.approx(dp_recs[-1]["epsilon"])
    # a grid directory (runs under runs/) reads the same rows; anything else is a one-line error
    grid = tmp_path / "grid"
    (grid / "runs").mkdir(parents=True)
    (grid / "runs" / rd.path.name).symlink_to(rd.path, target_is_directory=True)
    assert lk.leakage_utility_rows([grid]) == rows_
    from fedsafe.errors import FedsafeError

    with pytest.raises(FedsafeError, match="neither a run directory"):
        lk.leakage_utility_rows([tmp_path / "v.jsonl"])


def test_bertscore_is_one_on_identical_text_and_lower_otherwise(tiny):
    model, tok = tiny
    s = lk.bertscore_with(model, tok, ["the same words", "alpha beta"], ["the same words", "zzzz qqqq 123"])
    assert s[0] == pytest.approx(1.0, abs=1e-5)
    assert s[1] < 0.999
