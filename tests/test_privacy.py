"""Privacy: leakage metrics on fixed strings, and extraction attacks on a tiny model that memorised strings."""

import random

import pytest
import torch

from fedsafe.attacks.privacy_extraction import extraction as pv
from fedsafe.data.format import IGNORE_INDEX, TokenizedExample, format_example
from fedsafe.evaluation import leakage as lk


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


def test_prefilter_is_a_lower_bound_and_exhaustive_finds_the_best_match():
    from fedsafe.config import ExperimentConfig

    # 30 training texts made of the same 8 frequent words in shuffled orders: no word is rare, and the
    # generation shares no word trigram with any of them, so the prefilter has no candidate to score
    rng = random.Random(0)
    common = [f"w{i}" for i in range(8)]
    gen = "w0 w2 w4 w6 w1"
    tri = {tuple(gen.split()[i:i + 3]) for i in range(3)}
    refs = []
    while len(refs) < 30:
        words = rng.sample(common, 8)
        if not tri & {tuple(words[i:i + 3]) for i in range(6)}:
            refs.append(" ".join(words))
    fast = lk.leakage([gen], refs)
    full = lk.leakage([gen], refs, exhaustive=True)
    best = max(lk.rouge_l(gen, r) for r in refs)  # brute force, independent of the index
    assert fast.matches[0].score == 0.0 and fast.summary["lower_bound"] is True
    assert full.matches[0].score == pytest.approx(best) and best >= 0.5 and full.summary["lower_bound"] is False
    assert full.summary["search"] == "exhaustive" and fast.summary["search"] == "prefilter(candidates=8)"
    # the experiment option, and what the attack records
    assert ExperimentConfig().privacy.exhaustive is False
    assert ExperimentConfig.model_validate({"privacy": {"exhaustive": True}}).privacy.exhaustive is True
    flat = pv.flatten_result({"zero_input": {**fast.summary, "canaries_in_generations": 0}})
    assert flat["zero_rougeL_lower_bound"] is True


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
#
# The fixture trains until the memorisation is certain, and checks it: every next token of a memorised string
# (the choice of the first token after BOS aside) has probability >= P_MEMORISED at the attacks' sampling
# temperature 0.7. With top_p 0.9 or 0.95 that makes sampling reproduce the rest of the string exactly, and
# greedy decoding too, whatever the floating-point path; how many steps that takes may differ between
# machines, what the tests assert on does not. FEDSAFE_TEST_SEED changes the model's init and the LoRA init
# and sampling seeds.

# no two strings share a two-character context that continues differently: memorised in a few hundred steps
OLD = ["fjord mango violet 8", "glyph zebra dwarf 6"]  # known to the base model; round 1 starts only these
NEW = ["winds kudzu river 1", "plum bison tulip 5"]  # continuations known to the base; round 2 starts them too
ADAPTER_ONLY = ["amber forest bells 3", "cobalt meadow rings 2"]  # learned through the LoRA rounds alone
NONMEMBERS = ["linen garden moth 4", "ocean jade crumb 7", "pixel sky waltz 0", "hazel quiz knot 9"]
TEMPERATURE = 0.7
P_MEMORISED = 0.99


def _plain(tok, text, first_label=True):
    """BOS + text + EOS with labels on every token; ``first_label=False``: none on the first token after BOS."""
    ids = torch.tensor([tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id])
    labels = ids.clone()
    if not first_label:
        labels[1] = IGNORE_INDEX
    return TokenizedExample(ids, labels)


@torch.no_grad()
def _min_token_prob(model, examples, contrast=None, temperature=TEMPERATURE) -> float:
    """Smallest probability at ``temperature`` of a labelled next token (the token after BOS aside)."""
    worst = 1.0
    for ex in examples:
        logits = pv._contrasted_logits(model, contrast, input_ids=ex.input_ids[None])[0, :-1]
        labels = ex.labels[1:]
        pos = (labels != IGNORE_INDEX).nonzero()[:, 0]
        pos = pos[pos > 0]  # position 0 predicts the first token after BOS: a choice between strings
        p = torch.softmax(logits[pos] / temperature, -1).gather(1, labels[pos][:, None])
        worst = min(worst, float(p.min()))
    return worst


@torch.no_grad()
def _start_prob(model, tok, strings, contrast=None) -> float:
    """Probability at the sampling temperature that a generation from BOS starts like one of ``strings``."""
    logits = pv._contrasted_logits(model, contrast, input_ids=torch.tensor([[tok.bos_token_id]]))[0, -1]
    firsts = sorted({tok(s, add_special_tokens=False)["input_ids"][0] for s in strings})
    return float(torch.softmax(logits / TEMPERATURE, -1)[firsts].sum())


@pytest.fixture(scope="module")
def memorised(test_seed):
    """A tiny model that memorised OLD, NEW, ADAPTER_ONLY and a canary; round 2 newly starts NEW from BOS.

    - base model (full fine-tuning): OLD, the canary, and NEW's continuations (not their first token);
    - LoRA round 1: the same plus ADAPTER_ONLY's continuations; from BOS it starts only OLD strings;
    - LoRA round 2: the same plus NEW's first tokens; from BOS it starts OLD and NEW strings alike.

    Every stage trains until every string is memorised (asserted), so round 2 differs from round 1 in what
    it starts with, not in what it can continue. Returns the three global adapters on the one PEFT model.
    """
    from conftest import TEST_THREADS

    from fedsafe.data.format import collate
    from fedsafe.data.client_data import ClientData
    from fedsafe.fl.client import LocalTrainer, RoundConfig
    from fedsafe.fl.params import FlatLoRA
    from fedsafe.models import attach_lora, byte_tokenizer, tiny_llama

    torch.set_num_threads(TEST_THREADS)  # module fixtures start before the per-test autouse fixture sets it
    tok = byte_tokenizer()
    model = tiny_llama(tok, seed=test_seed)
    # BOS doubles as the pad token, whose embedding row starts at zero: zero-input generation from BOS
    # would see a zero vector, so it gets a random row like any other token
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[tok.bos_token_id] = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(test_seed)) * 0.02
    canary = pv.make_canaries(1, 4, seed=11)[0]
    canary_ex = format_example(tok, canary.instruction, canary.response, 256)
    old, new = [_plain(tok, s) for s in OLD], [_plain(tok, s) for s in NEW]
    new_cont = [_plain(tok, s, first_label=False) for s in NEW]
    only_cont = [_plain(tok, s, first_label=False) for s in ADAPTER_ONLY]
    known = old + new + [canary_ex]

    # the base learns its strings by full fine-tuning (fast); a decaying lr lets the last margins settle
    batch = collate(old + new_cont + [canary_ex], tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.05, 1 - i / 400))
    torch.manual_seed(test_seed)
    for step in range(1, 1001):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if step % 25 == 0 and _min_token_prob(model, known) >= 0.995:
            break
    assert _min_token_prob(model, known) >= 0.995, "the base model did not memorise its strings in 1000 steps"

    peft = attach_lora(model, r=8, alpha=16, seed=test_seed)
    flat = FlatLoRA(peft)
    trainer = LocalTrainer(peft, tok)

    def fit_until_memorised(data, theta, round_no, reference=None):
        # local rounds of 30 steps, the lr decaying after the first two, until every string is memorised and,
        # for round 2, known at least as well as in round 1: then the contrast z2 + (z2 - z1) still continues
        # NEW strings correctly (training on the same text only widens round 2's margins)
        for chunk in range(12):
            rc = RoundConfig(round=round_no, lr=max(1e-3, 5e-3 * 0.6 ** max(0, chunk - 1)), local_steps=30,
                             batch_size=len(data), max_grad_norm=None, seed=test_seed * 100 + chunk)
            theta = theta + trainer.fit(ClientData("v", "victim", data), theta, rc).update
            flat.set(theta)
            done = _min_token_prob(peft, known + only_cont) >= P_MEMORISED
            if done and reference is not None:
                contrast = pv.LogitContrast(pv.adapter_params(peft, flat, reference), 1.0)
                done = _min_token_prob(peft, new, contrast) >= 0.95
            if done:
                return theta
        raise AssertionError(f"LoRA round {round_no} did not memorise its strings in 360 steps")

    theta0 = flat.get()
    theta1 = fit_until_memorised(old * 2 + new_cont + only_cont + [canary_ex], theta0, 1)
    theta2 = fit_until_memorised(old + new + only_cont + [canary_ex], theta1, 2, reference=theta1)
    flat.set(theta2)
    return {"model": peft, "tok": tok, "flat": flat, "rounds": [theta0, theta1, theta2], "canary": canary}


def test_zero_input_generation_extracts_memorised_strings(memorised, test_seed):
    m, tok = memorised["model"], memorised["tok"]
    gens = pv.zero_input_attack(m, tok, 16, max_new_tokens=28, temperature=0.3, top_p=0.9, seed=test_seed)
    rep = lk.leakage(gens, OLD + NEW)
    # every generation that starts like a memorised string reproduces it (p >= 0.99 per token, top_p 0.9)
    assert rep.summary["near_exact_rate"] >= 0.75 and rep.summary["exact_rate"] >= 0.75, gens
    assert rep.summary["distinct_sources"] >= 2


def test_partial_input_completion_reconstructs_suffixes(memorised):
    m, tok = memorised["model"], memorised["tok"]
    samples = [_plain(tok, s).input_ids.tolist() for s in OLD + NEW + ADAPTER_ONLY]
    comps = pv.partial_input_attack(m, tok, samples, 0.3)
    assert all(c.completion == c.target for c in comps), comps  # greedy on memorised text: exact
    assert lk.pairwise([c.completion for c in comps], [c.target for c in comps])["exact_rate"] == 1.0


def test_membership_inference_separates_members(memorised):
    m, tok = memorised["model"], memorised["tok"]
    members, non = [_plain(tok, s) for s in OLD + NEW + ADAPTER_ONLY], [_plain(tok, s) for s in NONMEMBERS]
    res = pv.membership_inference(m, members, non, tok.pad_token_id)
    assert res["auc"] == 1.0 and res["member_loss"] < res["nonmember_loss"]
    losses = [s / n for s, n in pv.sequence_nll(m, members + non, tok.pad_token_id)]
    assert max(losses[:len(members)]) + 1.0 < min(losses[len(members):])  # a margin, not just an order
    # calibrated by the base model (Carlini et al.): what the adapters learned stands out, what the base
    # already knew does not
    only = [_plain(tok, s) for s in ADAPTER_ONLY]
    assert pv.membership_inference(m, only, non, tok.pad_token_id)["auc_ref"] == 1.0
    assert pv.membership_inference(m, only, [_plain(tok, s) for s in OLD], tok.pad_token_id)["auc_ref"] == 1.0
    with m.disable_adapter():
        base = [s / n for s, n in pv.sequence_nll(m, only + non, tok.pad_token_id)]
    adapted = [s / n for s, n in pv.sequence_nll(m, only + non, tok.pad_token_id)]
    calibrated = [b - a for a, b in zip(adapted, base)]
    assert min(calibrated[:2]) > max(calibrated[2:]) + 1.0


def test_canary_exposure_and_extraction(memorised):
    m, tok, c = memorised["model"], memorised["tok"], memorised["canary"]
    e = pv.canary_exposure(m, tok, c, n_candidates=63, digits=4, seed=0)
    assert e["rank"] == 1 and e["exposure"] == pytest.approx(6.0)  # log2(64) - log2(1)
    x = pv.canary_extraction(m, tok, c, n_samples=4, temperature=0.3, top_p=0.9, seed=0)
    assert x["greedy_extracted"] and x["extraction_rate"] == 1.0
    # canaries that were never inserted: each secret's rank among the 63 candidates is uniform, so their mean
    # exposure is ~1.4 bits; it reaches 3 bits with probability ~1e-5 (one inserted canary would give 6)
    others = [pv.canary_exposure(m, tok, o, n_candidates=63, digits=4, seed=0)["exposure"]
              for o in pv.make_canaries(16, 4, seed=12)]
    assert sum(others) / len(others) < 3.0, others


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


def test_multi_round_contrast_favours_recently_learned_strings(memorised, test_seed):
    m, tok, flat = memorised["model"], memorised["tok"], memorised["flat"]
    theta0, theta1, theta2 = memorised["rounds"]
    contrast = pv.LogitContrast(pv.adapter_params(m, flat, theta1), 1.0)
    # exact first-token probabilities: round 2 starts OLD and NEW alike, its contrast with round 1 starts NEW
    p_plain, p_contrast = _start_prob(m, tok, NEW), _start_prob(m, tok, NEW, contrast)
    # LoRA factors are extrapolated separately (B'A' is quadratic in alpha), so a small alpha already moves far
    flat.set(theta2 + 0.25 * (theta2 - theta1))
    try:
        p_param = _start_prob(m, tok, NEW)
    finally:
        flat.set(theta2)
    assert 0.2 <= p_plain <= 0.8 and p_contrast >= 0.95 and p_param >= p_plain + 0.2, (p_plain, p_contrast, p_param)

    kw = dict(max_new_tokens=28, temperature=TEMPERATURE, top_p=0.95, seed=test_seed + 1)

    def new_share(gens):  # generations that reproduce a string that round 2 newly starts from BOS
        rep = lk.leakage(gens, OLD + NEW)
        return sum(mt.index >= len(OLD) and mt.score >= 0.9 for mt in rep.matches) / len(gens)

    plain = pv.zero_input_attack(m, tok, 40, **kw)
    contrasted = pv.zero_input_attack(m, tok, 40, contrast=contrast, **kw)
    # plain: ~Binomial(40, p_plain <= 0.8); contrast: nearly all NEW. A 0.1 gap fails with probability < 1e-3
    assert new_share(contrasted) >= new_share(plain) + 0.1, (plain, contrasted)


def test_kv_cached_sampler_matches_full_recomputation(memorised):
    m, tok = memorised["model"], memorised["tok"]
    prompts = [[tok.bos_token_id, 104, 105], [tok.bos_token_id]]  # different lengths: left padding
    got = pv.sample_sequences(m, prompts, max_new_tokens=6, pad_id=tok.pad_token_id, eos_id=None, greedy=True)
    for p, g in zip(prompts, got):
        ids = list(p)
        with torch.no_grad():
            for tok_cached in g:
                logits = m(input_ids=torch.tensor([ids])).logits[0, -1]
                if tok_cached != int(logits.argmax()):  # only a float-level tie may pick another token
                    assert float(logits.max() - logits[tok_cached]) < 1e-4, (p, g, ids)
                    break
                ids.append(tok_cached)
        assert len(g) == 6


# --- membership inference draws its members from the examples the victims trained on ----------------

def test_local_trainer_reports_the_examples_it_trained_on(tiny):
    from fedsafe.data.client_data import ClientData
    from fedsafe.fl.client import LocalTrainer, RoundConfig
    from fedsafe.models import attach_lora

    model, tok = tiny
    peft = attach_lora(model, r=4, alpha=8, seed=0)

    class Spy(list):  # records which examples local training reads
        read: set = set()

        def __getitem__(self, i):
            Spy.read.add(i)
            return super().__getitem__(i)

    examples = Spy(_plain(tok, f"example number {i}") for i in range(12))
    trainer = LocalTrainer(peft, tok)
    res = trainer.fit(ClientData("c", "victim", examples), trainer.flat.get(),
                      RoundConfig(round=1, lr=1e-3, local_steps=2, batch_size=2))
    assert res.metrics["seen_examples"] == sorted(Spy.read)
    assert len(res.metrics["seen_examples"]) == 4  # 2 steps x 2 examples of 12: most were never trained on


def test_membership_members_are_drawn_from_examples_trained_on(memorised, tmp_path):
    from fedsafe.config import ExperimentConfig
    from fedsafe.rundir import RunDir

    m, tok, flat = memorised["model"], memorised["tok"], memorised["flat"]
    theta0, theta1, theta2 = memorised["rounds"]
    never = ["quill harbor stone 5", "maple tundra spark 1", "onyx prairie flute 2", "raven cedar plume 7"]
    # client a holds the memorised strings and 4 it never trained on; client b's update was dropped by the rule
    a_texts = OLD + never + NEW + ADAPTER_ONLY
    victims = [_plain(tok, s) for s in a_texts] + [_plain(tok, s) for s in never]
    keys = [("a", i) for i in range(len(a_texts))] + [("b", i) for i in range(len(never))]
    trained = [a_texts.index(s) for s in OLD + NEW + ADAPTER_ONLY]
    data = pv.AttackData(victims, [_plain(tok, s) for s in NONMEMBERS], [], keys)
    cfg = ExperimentConfig.model_validate({"privacy": {
        "enabled": True, "variants": ["plain"], "n_zero_input": 0, "n_partial": 0, "n_mia": 16}})
    rd = RunDir.create(tmp_path, "mia")
    rd.log({"type": "client", "round": 1, "client_id": "a", "aggregation_weight": 1.0, "seen_examples": trained[:3]})
    rd.log({"type": "client", "round": 2, "client_id": "a", "aggregation_weight": 1.0, "seen_examples": trained[2:]})
    rd.log({"type": "client", "round": 2, "client_id": "b", "aggregation_weight": 0.0, "seen_examples": [0, 1, 2, 3]})
    rd.log({"type": "client", "round": 3, "client_id": "a", "aggregation_weight": 1.0, "seen_examples": [2, 3, 4]})
    attacker = pv.PrivacyAttacker(cfg.privacy, m, tok, flat, theta0, data, rd, progress=False, seed=cfg.seed)
    attacker.observe(1, theta1)
    attacker.observe(2, theta2)
    try:
        mia = attacker.run(2)["plain"]["mia"]
    finally:
        flat.set(theta2)
    # the 6 memorised strings only: never-trained ones (round 3 is later, b's update was dropped) are not members
    assert mia["member_pool"] == "trained_on" and mia["n_trained_on"] == 6 and mia["n_members"] == 6
    assert mia["auc"] == 1.0
    rec = rd.records("privacy")[-1]
    assert rec["mia_member_pool"] == "trained_on" and rec["mia_n_members"] == 6


def test_membership_falls_back_to_all_victims_only_when_training_is_unknown(memorised, tmp_path, caplog):
    from fedsafe.config import ExperimentConfig
    from fedsafe.rundir import RunDir

    m, tok, flat = memorised["model"], memorised["tok"], memorised["flat"]
    victims = [_plain(tok, s) for s in OLD + NEW]
    data = pv.AttackData(victims, [_plain(tok, s) for s in NONMEMBERS], [], [("a", i) for i in range(4)])
    cfg = ExperimentConfig.model_validate({"privacy": {"enabled": True, "n_mia": 4}})
    rd = RunDir.create(tmp_path, "old")
    rd.log({"type": "client", "round": 1, "client_id": "a", "aggregation_weight": 1.0})  # an older run's record
    attacker = pv.PrivacyAttacker(cfg.privacy, m, tok, flat, memorised["rounds"][0], data, rd, progress=False,
                                  seed=cfg.seed)
    with caplog.at_level("WARNING", logger="fedsafe"):
        pool, kind = attacker.member_pool(1)
    assert kind == "all_victim_examples" and len(pool) == 4 and "trained on are unknown" in caplog.text
    attacker.run_dir = None
    attacker.trained = {("a", 1)}
    pool, kind = attacker.member_pool(1)
    assert kind == "trained_on" and pool == [victims[1]]


# --- the privacy table: client-level and example-level epsilon in their own columns ------------------

def test_privacy_table_keeps_client_and_example_epsilon_apart(tmp_path):
    import json

    import yaml

    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "tiny"}, "dp": {
        "client_level": True, "noise_multiplier": 1.0, "clip_norm": 0.5, "local": True,
        "local_noise_multiplier": 1.0, "local_clip_norm": 1.0}}))
    records = [
        {"type": "dp", "round": 1, "level": "client", "epsilon": 2.0, "delta": 1e-5},
        {"type": "dp", "round": 2, "level": "client", "epsilon": 3.0, "delta": 1e-5},
        {"type": "client", "round": 1, "client_id": "a", "dp_epsilon": 7.0, "dp_delta": 1e-6},
        {"type": "client", "round": 2, "client_id": "b", "dp_epsilon": 9.0, "dp_delta": 1e-6},
        {"type": "client", "round": 3, "client_id": "a", "dp_epsilon": 50.0, "dp_delta": 1e-6},  # after the attack
        {"type": "dp", "round": 3, "level": "client", "epsilon": 4.0, "delta": 1e-5},
        {"type": "privacy", "round": 2, "variant": "plain", "zero_rougeL": 0.25, "zero_near_exact": 0.0,
         "zero_rougeL_lower_bound": True, "mia_auc": 0.6},
    ]
    (rd / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (row,) = lk.leakage_utility_rows([rd])
    assert "epsilon" not in row
    assert (row["eps_client"], row["delta_client"]) == (3.0, 1e-5)  # the client-level record of round 2
    assert (row["eps_example"], row["delta_example"]) == (9.0, 1e-6)  # the largest local epsilon by round 2
    md = lk.leakage_utility_markdown([row])
    header = md.splitlines()[0]
    assert "eps_client" in header and "eps_example" in header and "| epsilon |" not in header
    assert ">=0.250" in md  # the prefilter's best-match ROUGE-L is shown as a lower bound


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
    # members come from the examples the victims trained on, which every client reports
    clients = rd.records("client")
    assert clients and all(r["seen_examples"] and max(r["seen_examples"]) < r["samples"] for r in clients)
    assert all(r["mia_member_pool"] == "trained_on" for r in priv)
    assert all(r["zero_rougeL_lower_bound"] is True for r in priv)  # the default prefilter: a lower bound
    canaries = json.loads((rd.path / "privacy" / "canaries.json").read_text())
    assert len(canaries) == 1 and canaries[0]["client_id"] in {"client_00", "client_01"}
    table = (rd.path / "privacy_table.md").read_text()
    assert "client-DP(sigma=0.8,C=0.5)+L2(mu=0.01)+KL(beta=0.1)" in table
    assert (rd.path / "plots" / "privacy_leakage_utility.png").exists()
    rows_ = lk.leakage_utility_rows([rd.path])
    assert len(rows_) == 3 and rows_[0]["eps_client"] == pytest.approx(dp_recs[-1]["epsilon"])
    assert rows_[0]["delta_client"] == dp_recs[-1]["delta"] and rows_[0]["eps_example"] is None
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
