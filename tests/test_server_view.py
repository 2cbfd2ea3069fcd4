"""What an honest-but-curious server learns from updates (issue 20): update-level membership inference and
DAGER-style reconstruction from LoRA updates, on the tiny model with memorised random strings.

Assertions use wide margins: the separations they check are large and systematic (member loss drops of
~0.4 nats vs ~0.07; span residuals of ~1e-5 vs > 0.1), not outcomes of chaotic training.
"""

import random

import pytest
import torch

from fedsafe.attacks.server_view import reconstruction as R
from fedsafe.attacks.server_view.update_mia import update_membership_inference
from fedsafe.data.format import TokenizedExample
from fedsafe.data.client_data import ClientData
from fedsafe.fl.client import LocalTrainer, RoundConfig
from fedsafe.fl.params import FlatLoRA
from fedsafe.models import attach_lora, byte_tokenizer, tiny_llama


def _example(tok, text: str) -> TokenizedExample:
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    return TokenizedExample(ids, ids.clone())


def _random_text(rng: random.Random, n: int = 32, alphabet: str = "abcdefghijklmnopqrstuvwxyz ") -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


# ------------------------------------------------------------------------------------------------
# Update-level membership inference
# ------------------------------------------------------------------------------------------------

def test_update_mia_separates_members_in_plaintext_and_not_in_a_large_sum(test_seed):
    tok = byte_tokenizer()
    model = attach_lora(tiny_llama(tok, seed=test_seed), r=8, alpha=16)
    flat = FlatLoRA(model)
    global_vec = flat.get()
    rng = random.Random(test_seed)
    clients = [ClientData(f"c{i}", "benign", [_example(tok, _random_text(rng)) for _ in range(6)]) for i in range(32)]
    nonmembers = [_example(tok, _random_text(rng)) for _ in range(30)]
    trainer = LocalTrainer(model, tok)
    rc = RoundConfig(round=1, lr=0.01, local_steps=10, batch_size=6, seed=test_seed)  # memorise the 6 strings
    updates = [trainer.fit(c, global_vec, rc).update for c in clients]
    target = clients[0].examples
    others = torch.stack(updates[1:]).mean(0)
    loaded = flat.get()

    plain = update_membership_inference(model, flat, global_vec, updates[0], target, nonmembers, tok.pad_token_id,
                                        reference_update=others)
    # each member's loss drops by ~0.4 nats under its own client's update, non-members' by ~0.07
    assert plain["auc"] >= 0.95 and plain["auc_ref"] >= 0.95, plain
    assert plain["member_gain"] > plain["nonmember_gain"] + 0.1, plain

    # secure aggregation: the server sees only the mean of 32 updates; the target's members are 1/32 of it
    summed = update_membership_inference(model, flat, global_vec, torch.stack(updates).mean(0), target, nonmembers,
                                         tok.pad_token_id)
    assert summed["auc"] <= 0.85 and summed["auc"] < plain["auc"] - 0.15, (plain, summed)
    assert torch.equal(flat.get(), loaded)  # the attack restores the model's adapter


def test_update_mia_reference_calibration_is_loss_under_reference_minus_loss_under_update(tiny):
    model, tok = tiny
    model = attach_lora(model, r=4, alpha=8)
    flat = FlatLoRA(model)
    g = flat.get()
    rng = random.Random(1)
    texts = [_example(tok, _random_text(rng, 16)) for _ in range(4)]
    gen = torch.Generator().manual_seed(0)
    u, ref = torch.randn(g.numel(), generator=gen) * 0.05, torch.randn(g.numel(), generator=gen) * 0.05
    from fedsafe.attacks.server_view.update_mia import mean_losses

    out = update_membership_inference(model, flat, g, u, texts[:2], texts[2:], tok.pad_token_id, reference_update=ref)
    lu, lr = mean_losses(model, flat, g + u, texts, tok.pad_token_id), mean_losses(model, flat, g + ref, texts,
                                                                                    tok.pad_token_id)
    cal = [a - b for a, b in zip(lr, lu)]
    expected = (sum(c_m > c_n for c_m in cal[:2] for c_n in cal[2:])
                + 0.5 * sum(c_m == c_n for c_m in cal[:2] for c_n in cal[2:])) / 4
    assert out["auc_ref"] == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------
# Reconstruction (DAGER on LoRA A factors)
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def wide(test_seed):
    """A tiny Llama of width 128 with LoRA r=32 (q/k/v give 96 A rows) and a non-zero global B (round >= 2)."""
    tok = byte_tokenizer()
    model = attach_lora(tiny_llama(tok, seed=test_seed, hidden_size=128), r=32, alpha=32)
    flat = FlatLoRA(model)
    g = flat.get()
    gen = torch.Generator().manual_seed(test_seed)
    for s in flat.specs:
        if s.kind == "B":
            g[s.offset: s.offset + s.numel] = torch.randn(s.numel, generator=gen) * 0.05
    return model, tok, flat, g


TEXTS = ["the quick brown fox", "jumps over a dog"]


def _fit(model, tok, g, texts, *, optimizer="sgd", steps=1, batch_size=None, lr=0.5):
    client = ClientData("c0", "benign", [_example(tok, t) for t in texts])
    rc = RoundConfig(round=2, lr=lr, local_steps=steps, batch_size=batch_size or len(texts), optimizer=optimizer,
                     max_grad_norm=None)
    return client, LocalTrainer(model, tok).fit(client, g, rc).update


def _true_tokens(client) -> set[int]:
    return {t for e in client.examples for t in e.input_ids.tolist()}


def test_single_sgd_step_reveals_the_tokens_and_the_sequences(wide):
    model, tok, flat, g = wide
    client, update = _fit(model, tok, g, TEXTS)
    loaded = flat.get()
    rec = R.reconstruct(model, flat, g, update, max_len=32)
    scores = R.token_scores(rec.tokens, _true_tokens(client))
    # every token but the last of each text (its position gets no gradient) is in the span; nothing else is
    assert scores["token_precision"] >= 0.9 and scores["token_recall"] >= 0.8, scores
    assert not rec.saturated_l0 and rec.method == "dager"
    texts = [tok.decode(s) for s in rec.sequences]
    for t in TEXTS:  # DAGER's layer-2 search rebuilds each text up to its unconfirmed last token
        assert any(x.startswith(t[:-1]) for x in texts), texts
    assert torch.equal(flat.get(), loaded)


def test_span_check_residuals_separate_batch_tokens_from_the_rest(wide):
    model, tok, flat, g = wide
    client, update = _fit(model, tok, g, TEXTS)
    flat.set(g)
    _, res, rank, capacity = R.recover_tokens(model, flat, update, tau=0.5)
    inside = [t for e in client.examples for t in e.input_ids[:-1].tolist()]
    outside = [v for v in range(len(res)) if v not in _true_tokens(client) and v != tok.pad_token_id]
    assert float(res[inside].max()) < 1e-3 < 0.1 < float(res[outside].min())
    assert rank == len(set(inside)) and capacity == 96


def _reproduced(tok, rec) -> int:
    texts = [tok.decode(s) for s in rec.sequences]
    return sum(any(x.startswith(t[:-1]) for x in texts) for t in TEXTS)


def test_reconstruction_degrades_when_its_assumptions_break(wide):
    model, tok, flat, g = wide
    client, update = _fit(model, tok, g, TEXTS)
    true = _true_tokens(client)
    base = R.reconstruct(model, flat, g, update, max_len=32)
    base_recall = R.token_scores(base.tokens, true)["token_recall"]
    assert base_recall >= 0.8 and _reproduced(tok, base) == len(TEXTS)

    # AdamW: the first step is ~ -lr * sign(gradient), not a combination of the inputs: the A rows span 96
    # directions of which the batch's tokens are not part; only a few tokens stay close enough (measured ~0.4)
    _, adam = _fit(model, tok, g, TEXTS, optimizer="adamw", lr=1e-3)
    adam_rec = R.reconstruct(model, flat, g, adam, max_len=32)
    assert adam_rec.rank_l0 == adam_rec.capacity
    assert R.token_scores(adam_rec.tokens, true)["token_recall"] <= min(0.65, base_recall - 0.25)
    assert _reproduced(tok, adam_rec) == 0

    # pruning half of each LoRA tensor (secure aggregation's shared mask) moves the A rows out of the span
    from fedsafe.defenses.secure_aggregation.pruning import pruning_mask

    mask = pruning_mask(g + 0.01 * torch.randn(g.numel(), generator=torch.Generator().manual_seed(0)), 0.5,
                        flat.specs)
    pruned = R.reconstruct(model, flat, g, update * mask, max_len=32)
    assert R.token_scores(pruned.tokens, true)["token_recall"] <= min(0.6, base_recall - 0.3)
    assert _reproduced(tok, pruned) == 0

    # a large batch: more distinct tokens (~160) than the 96 A rows can span; the span saturates
    rng = random.Random(3)
    alphabet = "".join(chr(c) for c in (*range(33, 127), *range(161, 256)))  # ~160 distinct bytes in UTF-8
    big = [_random_text(rng, 48, alphabet) for _ in range(16)]
    big_client, big_update = _fit(model, tok, g, big)
    big_rec = R.reconstruct(model, flat, g, big_update, sequences=False)
    assert big_rec.saturated_l0
    assert R.token_scores(big_rec.tokens, _true_tokens(big_client))["token_recall"] <= 0.4

    # many local steps over more data: layer-0 rows stay in the span of every token seen (SGD, fixed inputs), so
    # the token set survives, but the 8 texts have ~150 positions, more than 96 rows can span at layer 1 (and
    # layer 1 moves between steps): the exact sequence search fails, only the LM-ordered token set remains
    texts8 = [*TEXTS, "lazy cats nap at noon", "a big red barn", "seven wet frogs", "paint the old gate",
              "quiet mice run", "bring me tea"]
    multi_client, multi = _fit(model, tok, g, texts8, steps=4, batch_size=2)
    multi_rec = R.reconstruct(model, flat, g, multi, max_len=32)
    assert R.token_scores(multi_rec.tokens, _true_tokens(multi_client))["token_recall"] >= 0.7
    assert multi_rec.saturated_l1 and multi_rec.method == "lm_greedy"
    got = [tok.decode(s) for s in multi_rec.sequences]
    assert sum(any(x.startswith(t[:-1]) for x in got) for t in texts8) <= 2, got


def test_round_one_update_has_zero_a_factors_and_reveals_nothing(tiny):
    model, tok = tiny
    model = attach_lora(model, r=16, alpha=16)
    flat = FlatLoRA(model)
    g = flat.get()  # PEFT's B = 0: dL/dA = s B^T G X^T = 0
    _, update = _fit(model, tok, g, TEXTS)
    rec = R.reconstruct(model, flat, g, update)
    assert rec.rank_l0 == 0 and rec.tokens == [] and rec.method == "none"


def test_sequence_scores_use_best_match_rouge_and_exact_rates():
    tok = byte_tokenizer()
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("alpha beta gamma", "delta epsilon")]
    got = R.sequence_scores(tok, [ids[0], tok("delta zeta", add_special_tokens=False)["input_ids"]], ids)
    assert got["exact_rate"] == 0.5 and got["recovered_rate"] == 0.5
    assert got["rougeL_max"] == 1.0 and got["rougeL_mean"] == pytest.approx((1.0 + 0.5) / 2)


# ------------------------------------------------------------------------------------------------
# The plug-in
# ------------------------------------------------------------------------------------------------

def test_plugin_attacks_individual_updates_and_the_aggregate(wide, tmp_path):
    from fedsafe.attacks.server_view.plugin import ServerViewAttack, ServerViewConfig
    from fedsafe.config import ExperimentConfig
    from fedsafe.plugins import RunContext, Setup

    model, tok, flat, g = wide
    rng = random.Random(5)
    clients = [ClientData(f"c{i}", "benign", [_example(tok, _random_text(rng, 12)) for _ in range(2)])
               for i in range(3)]
    cfg = ExperimentConfig()
    setup = Setup.from_config(cfg)
    ctx = RunContext(**{k: getattr(setup, k) for k in Setup.__dataclass_fields__}, model=model, tokenizer=tok,
                     flat=flat, init_vec=g, clients=clients)
    nonmembers = [_example(tok, _random_text(rng, 12)) for _ in range(6)]
    plugin = ServerViewAttack(ServerViewConfig(enabled=True, max_clients=2, max_len=16), ctx)
    plugin._nonmembers = nonmembers
    rc = RoundConfig(round=2, lr=0.5, local_steps=1, batch_size=2, optimizer="sgd", max_grad_norm=None)
    plugin.round_start(2, g, rc)
    results = [LocalTrainer(model, tok).fit(c, g, rc) for c in clients]

    calls = []

    def fedavg(updates, num_samples, client_ids):
        calls.append(client_ids)
        return updates.mean(0)

    rule = plugin.server_view(fedavg)
    mean = rule(torch.stack([r.update for r in results]), torch.ones(3), [r.client_id for r in results])
    assert calls == [["c0", "c1", "c2"]] and torch.allclose(mean, torch.stack([r.update for r in results]).mean(0))
    seen = {r.client_id: [clients[int(r.client_id[1:])].examples[i] for i in r.metrics["seen_examples"]]
            for r in results}
    records = plugin.attack_round(2, g, plugin.updates, mean, ["c0", "c1", "c2"], seen=seen)
    views = [(r["view"], r["client_id"]) for r in records]
    assert views == [("individual", "c0"), ("individual", "c1"), ("aggregate", "c0")]
    ind = records[0]
    assert ind["type"] == "server_view" and ind["rec_method"] == "dager" and ind["rec_token_recall"] >= 0.8
    assert 0.0 <= ind["mia_auc"] <= 1.0 and ind["update_bytes"] == 4 * g.numel()
    # the aggregate of 3 single-step updates is a single step on the union batch (6 texts): still in capacity
    assert records[2]["rec_token_recall"] >= 0.8


def test_table_rows_average_views_and_mark_what_the_server_sees(tmp_path):
    import json
    import math

    import yaml

    from fedsafe.attacks.server_view.table import server_view_rows

    def run(name, cfg, views):
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        recs = [{"type": "round", "round": r, "seconds": 10.0 * r} for r in (1, 2)]
        recs += [{"type": "heldout", "round": 2, "before": 2.5, "after": 2.0}]
        recs += [{"type": "server_view", "round": r, "view": v, "mia_auc": auc, "rec_token_recall": rec,
                  "rec_method": "dager", "update_bytes": 400} for r, v, auc, rec in views]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
        return d

    plain = run("plain", {"model": {"name": "tiny"}}, [(1, "individual", 1.0, 0.0), (2, "individual", 0.8, 0.9),
                                                       (1, "aggregate", 0.6, 0.0), (2, "aggregate", 0.4, 0.5)])
    secure = run("secure", {"secure_agg": {"enabled": True, "prune_start": 0.5, "prune_end": 0.5}},
                 [(1, "aggregate", 0.5, 0.0), (2, "aggregate", 0.7, 0.2)])
    rows = server_view_rows([plain, secure])
    by = {(r["run"], r["view"]): r for r in rows}
    ind = by[("plain", "individual")]
    assert ind["sees"] and ind["mia_auc"] == pytest.approx(0.9) and ind["rec_token_recall"] == pytest.approx(0.9)
    assert ind["helpfulness_proxy"] == pytest.approx(math.exp(2.0)) and ind["round_seconds"] == pytest.approx(15.0)
    agg = by[("secure", "aggregate")]
    assert agg["sees"] and agg["defense"].startswith("secure-agg(prune=0.5") and agg["rec_token_recall"] == 0.2
    assert ("secure", "individual") not in by


@pytest.mark.parametrize("attack", [{"name": "mixing", "normal_share": 0.5}, {"name": "minmax", "start_round": 2}],
                         ids=["mixing", "late_start"])
def test_members_of_an_adaptive_attacker_are_the_texts_it_trained_on(tiny, attack):
    """An adaptive attacker under ``mixing`` (or before its late ``start_round``) trains on a replaced list, and
    its ``seen_examples`` index that list: the server view's members must be those texts, not the client's own
    examples at the same indices (issue 28); without the list at hand the client is left out."""
    from types import SimpleNamespace

    from fedsafe.attacks.adaptive.base import parse_attack
    from fedsafe.attacks.adaptive.plugin import AdaptiveAttack, AdaptiveTrainer
    from fedsafe.attacks.server_view.plugin import ServerViewAttack, ServerViewConfig
    from fedsafe.config import ExperimentConfig
    from fedsafe.plugins import RunContext, Setup

    model, tok = tiny
    peft = attach_lora(model, r=2, alpha=4, seed=0)
    rng = random.Random(7)
    own = [_example(tok, "own " + _random_text(rng, 12)) for _ in range(8)]
    pool = [_example(tok, "pool " + _random_text(rng, 12)) for _ in range(20)]
    benign = ClientData("b0", "benign", [_example(tok, "benign " + _random_text(rng, 12)) for _ in range(8)])
    attacker = ClientData("m0", "malicious", own, malicious=True)

    class Spy(LocalTrainer):  # what the model really trained on: the list passed in, at the seen indices
        trained: dict = {}

        def fit(self, client, global_vec, rc, client_state=None, on_step=None):
            res = super().fit(client, global_vec, rc, client_state, on_step)
            self.trained[client.client_id] = [client.examples[i] for i in res.metrics["seen_examples"]]
            return res

    plugin = AdaptiveAttack.__new__(AdaptiveAttack)  # the client side needs no tokenizer here: pool given
    plugin.attacks = {"malicious": parse_attack({**attack, "benign_data": []})}
    plugin.benign_pools, plugin.seed, plugin.ctx = {"malicious": pool}, 0, SimpleNamespace(clients=[benign, attacker])
    spy = Spy(peft, tok)
    trainer = AdaptiveTrainer(spy, plugin)
    g = spy.flat.get()
    rc = RoundConfig(round=1, lr=1e-2, local_steps=3, batch_size=2)
    results = [trainer.fit(c, g, rc) for c in (benign, attacker)]
    records = [{"type": "client", "round": 1, "client_id": r.client_id, **r.metrics} for r in results]
    setup = Setup.from_config(ExperimentConfig())
    ctx = RunContext(**{k: getattr(setup, k) for k in Setup.__dataclass_fields__}, model=peft, tokenizer=tok,
                     flat=spy.flat, init_vec=g, clients=[benign, attacker], trainer=trainer,
                     run_dir=SimpleNamespace(records=lambda kind=None: records))
    view = ServerViewAttack(ServerViewConfig(enabled=True), ctx)
    members = view.seen_examples(1)
    assert [id(e) for e in members["m0"]] == [id(e) for e in spy.trained["m0"]]
    pool_ids = {id(e) for e in pool}
    assert any(id(e) in pool_ids for e in members["m0"])  # texts from the benign pool are members
    assert [id(e) for e in members["b0"]] == [id(e) for e in spy.trained["b0"]]  # own data: unchanged
    assert results[1].metrics["seen_examples_from"] in ("mixing", "late_start_benign")
    ctx.trainer = None  # e.g. the client trained in a Flower ClientApp: its members are unknown here
    assert "m0" not in view.seen_examples(1) and "b0" in view.seen_examples(1)
