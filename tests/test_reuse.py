"""The update cache (fedsafe.fl.update_cache): trainings with the same inputs run once, and a stored training reads
back exactly what training gives.

The key must change with every input of a local training (a key that ignores one would hand a client another
client's update), and a hit must equal training bit for bit: the update, the metrics, each step's loss and the
global RNG state after it. On CPU the batched and the sequential paths give the same bits (fedsafe.fl.batched),
so they share entries; the grid test checks that end to end, with a model-poisoning attack (sequential, since it
wraps the trainer) reusing the benign updates and the attacker's honest update h of the data-poisoning run
(batched).
"""

import json
from dataclasses import replace

import pytest
import torch
import yaml

from fedsafe.data.format import TokenizedExample
from fedsafe.engines.inprocess import InProcessEngine
from fedsafe.fl import batched as batched_module
from fedsafe.data.client_data import ClientData
from fedsafe.fl.client import LocalTrainer, RoundConfig
from fedsafe.fl.update_cache import ROUND_FIELDS, UpdateCache, update_key
from fedsafe.models import attach_lora, byte_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

#: metrics that say how a training ran, not what it computed: its timings (a hit keeps the stored run's), whether the
#: cache answered, and how many clients shared its batched pass
TIMING = {"seconds", "compute_seconds", "tokens_per_s", "update_cache", "batched_with"}


def _examples(tok, seed: int, n: int) -> list[TokenizedExample]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(12, 30, (1,), generator=gen))
        ids = torch.randint(3, len(tok), (length,), generator=gen)
        labels = ids.clone()
        labels[: length // 3] = -100
        out.append(TokenizedExample(ids, labels))
    return out


def _setup(test_seed, dropout=0.1, n_clients=4):
    """A LoRA tiny Llama (dropout on, so the RNG matters), a perturbed global adapter and clients with own data."""
    tok = byte_tokenizer()
    model = attach_lora(tiny_llama(tok, seed=test_seed), r=4, alpha=8, dropout=dropout)
    trainer = LocalTrainer(model, tok)
    clients = [ClientData(f"c{i}", "benign", _examples(tok, 100 * test_seed + i, 5 + i)) for i in range(n_clients)]
    start = trainer.flat.get()
    start = start + 0.02 * torch.randn(start.shape, generator=torch.Generator().manual_seed(test_seed))
    rc = RoundConfig(round=1, lr=0.01, local_steps=3, batch_size=2, seed=test_seed, max_grad_norm=0.05)
    return trainer, clients, start, rc


def _same_training(a, b) -> None:
    """Two results of one training: the same update bits and the same metrics but for the timings."""
    assert a.client_id == b.client_id and a.num_samples == b.num_samples
    assert torch.equal(a.update, b.update), a.client_id
    assert {k: v for k, v in a.metrics.items() if k not in TIMING} == \
        {k: v for k, v in b.metrics.items() if k not in TIMING}


def test_update_key_changes_with_every_input(test_seed):
    """Each input of a local training changes the key; the same inputs in fresh objects give the same key."""
    trainer, clients, start, rc = _setup(test_seed)
    client = clients[0]
    base, fields = update_key(trainer, client, start, rc)
    assert base == update_key(trainer, ClientData("c0", "benign", [TokenizedExample(e.input_ids.clone(),
                              e.labels.clone()) for e in client.examples]), start.clone(), replace(rc))[0]
    assert fields["client_id"] == "c0" and fields["round_config"]["lr"] == rc.lr
    changed = {}
    vec = start.clone()
    vec[-1] += 1e-6
    changed["global vector"] = update_key(trainer, client, vec, rc)[0]
    ex = client.examples
    ids = ex[0].input_ids.clone()
    ids[-1] = 3 if int(ids[-1]) != 3 else 4
    changed["one token"] = update_key(trainer, replace(client, examples=[TokenizedExample(ids, ex[0].labels)]
                                                        + ex[1:]), start, rc)[0]
    labels = ex[0].labels.clone()
    labels[-1] = -100
    changed["one label"] = update_key(trainer, replace(client, examples=[TokenizedExample(ex[0].input_ids, labels)]
                                                         + ex[1:]), start, rc)[0]
    changed["row order"] = update_key(trainer, replace(client, examples=ex[::-1]), start, rc)[0]
    changed["one row fewer"] = update_key(trainer, replace(client, examples=ex[:-1]), start, rc)[0]
    changed["client id (its seeds)"] = update_key(trainer, replace(client, client_id="c9"), start, rc)[0]
    other = {"round": 2, "seed": rc.seed + 1, "lr": 0.02, "local_steps": 4, "batch_size": 3, "grad_accum": 2,
             "optimizer": "sgd", "weight_decay": 0.1, "max_grad_norm": 1.0, "algorithm": "fedprox", "prox_mu": 0.1,
             "trainable": "B"}
    assert set(other) == set(ROUND_FIELDS)
    for name, value in other.items():
        changed[f"rc.{name}"] = update_key(trainer, client, start, replace(rc, **{name: value}))[0]
    tok = byte_tokenizer()
    other_base = LocalTrainer(attach_lora(tiny_llama(tok, seed=test_seed + 1), r=4, alpha=8, dropout=0.1), tok)
    changed["base model weights"] = update_key(other_base, client, start, rc)[0]
    other_lora = LocalTrainer(attach_lora(tiny_llama(tok, seed=test_seed), r=4, alpha=8, dropout=0.0), tok)
    changed["LoRA config (dropout)"] = update_key(other_lora, client, start, rc)[0]
    same = [name for name, key in changed.items() if key == base]
    assert not same, f"the key ignores: {same}"
    assert len(set(changed.values())) == len(changed)


def test_hit_equals_training_bit_for_bit(test_seed, tmp_path):
    """A stored training read back (by a new cache object on the same directory, as a resumed run or the next run
    of a grid does) gives the update, metrics, step losses and RNG state that training gives."""
    trainer, clients, start, rc = _setup(test_seed)
    plain_steps = []
    torch.manual_seed(7)
    plain = trainer.fit(clients[1], start, rc, {}, on_step=lambda s, loss: plain_steps.append((s, loss)))
    plain_rng = torch.get_rng_state()

    trainer.update_cache = UpdateCache(tmp_path / "updates")
    with trainer.update_cache.opened():
        stored = trainer.fit(clients[1], start, rc, {})
    assert trainer.update_cache.counts()["computed"] == 1
    _same_training(stored, plain)

    trainer.update_cache = cache = UpdateCache(tmp_path / "updates")
    steps = []
    torch.manual_seed(99)  # another RNG state before: the hit leaves the state training leaves
    with cache.opened():
        hit = trainer.fit(clients[1], start, rc, {}, on_step=lambda s, loss: steps.append((s, loss)))
    assert cache.counts()["reused"] == 1 and cache.counts()["computed"] == 0
    assert hit.metrics["update_cache"] == "hit" and cache.seconds_saved > 0
    _same_training(hit, plain)
    assert steps == plain_steps
    assert torch.equal(torch.get_rng_state(), plain_rng)
    # another client is not the stored one: it trains
    with cache.opened():
        other = trainer.fit(clients[2], start, rc, {})
    assert cache.counts()["computed"] == 1 and not torch.equal(other.update, hit.update)
    # outside the round loop's scope (post-hoc, alignment) the cache never answers
    trainer.fit(clients[1], start, rc, {})
    assert cache.counts()["reused"] == 1


def test_incomplete_entry_is_trained_again(test_seed, tmp_path):
    """An entry without its JSON (a run killed while writing) is a miss, and training rewrites it."""
    trainer, clients, start, rc = _setup(test_seed, dropout=0.0)
    trainer.update_cache = cache = UpdateCache(tmp_path)
    with cache.opened():
        first = trainer.fit(clients[0], start, rc, {})
    (meta,) = tmp_path.glob("*/*.json")
    meta.unlink()
    with cache.opened():
        again = trainer.fit(clients[0], start, rc, {})
    assert cache.counts()["computed"] == 2 and meta.exists()
    _same_training(again, first)


def test_not_cached_when_training_is_changed(test_seed, tmp_path):
    """Loss terms (constrained updates) and SCAFFOLD change training in ways the key does not hold: never cached."""
    trainer, clients, start, rc = _setup(test_seed, dropout=0.0)
    trainer.update_cache = cache = UpdateCache(tmp_path)
    with cache.opened():
        trainer.fit(clients[0], start, replace(rc, algorithm="scaffold"), {})
        trainer.loss_terms.append(lambda model, batch, out: out.loss * 0.0)
        trainer.fit(clients[0], start, rc, {})
    assert cache.counts() == {"reused": 0, "computed": 0, "not_cached": 2, "seconds_saved": 0.0,
                              "seconds_computed": 0.0, "evicted": 0, "evicted_bytes": 0}
    assert not list(tmp_path.glob("*/*.json"))


def test_batched_round_trains_only_the_misses(test_seed, tmp_path, monkeypatch):
    """A batched round with some clients stored trains only the others in its batched pass; its results, hooks and
    RNG equal the round without the cache (CPU: the batched and sequential paths give the same bits)."""
    trainer, clients, start, rc = _setup(test_seed, n_clients=5)
    ids = [c.client_id for c in clients]
    torch.manual_seed(3)
    plain = InProcessEngine(trainer, clients, "on").fit(ids, start, rc)
    plain_rng = torch.get_rng_state()

    passes = []
    real = batched_module.BatchedTrainer.fit_many
    monkeypatch.setattr(batched_module.BatchedTrainer, "fit_many", lambda self, cs, *a, **kw: passes.append(
        [c.client_id for c in cs]) or real(self, cs, *a, **kw))
    trainer.update_cache = cache = UpdateCache(tmp_path)
    engine = InProcessEngine(trainer, clients, "on")
    with cache.opened():
        engine.fit(["c1", "c3"], start, rc)  # stores c1 and c3 (a batched pass of 2)
        steps = []
        torch.manual_seed(4)
        mixed = engine.fit(ids, start, rc, on_step=lambda cid, s, loss: steps.append((cid, s)))
    assert passes == [["c1", "c3"], ["c0", "c2", "c4"]]
    assert engine.training_path["training_path"] == "batched"
    assert cache.counts()["reused"] == 2 and cache.counts()["computed"] == 5
    assert [r.metrics["update_cache"] for r in mixed] == ["miss", "hit", "miss", "hit", "miss"]
    for a, b in zip(mixed, plain):
        _same_training(a, b)
    assert torch.equal(torch.get_rng_state(), plain_rng)
    assert steps == [(c, s) for s in range(1, rc.local_steps + 1) for c in ids]  # the batched pass's order

    with cache.opened():  # one client left to train: the sequential trainer, stored like the others
        engine.fit(["c0", "c1"], start, replace(rc, round=2))
        engine.fit(["c0", "c1", "c2"], start, replace(rc, round=2))
    assert passes[-1] == ["c0", "c1"] and cache.counts()["computed"] == 8


def _grid_file(tmp_path, rounds: int = 2):
    normal = [{"instruction": f"Explain item {i}.", "response": f"Item {i} is a placeholder.", "category": "normal"}
              for i in range(12)]
    harmful = [{"instruction": f"placeholder request {i}", "response": f"placeholder answer {i}",
                "category": "unaligned"} for i in range(8)]
    for name, rows in (("normal", normal), ("harmful", harmful)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"placeholder request {i}"}) for i in range(2)))
    spec = {"name": "g", "output_dir": str(tmp_path / "out"),
            "config": {"model": {"name": "tiny"}, "lora": {"r": 2, "alpha": 4},
                       "data": {"max_length": 64, "samples_per_client": 4,
                                "heldout": [{"path": "normal.jsonl", "max_rows": 4}]},
                       "roles": [{"name": "benign", "clients": 2, "data": [{"path": "normal.jsonl"}]},
                                 {"name": "malicious", "clients": 1, "data": [{"path": "harmful.jsonl"}]}],
                       "fl": {"rounds": rounds, "clients_per_round": 3, "local_steps": 2, "batch_size": 2},
                       "eval": {"prompts": "prompts.jsonl", "n_prompts": 2, "max_new_tokens": 2,
                                "n_normal_prompts": 2}},
            "matrix": {"attack": {"data_poisoning": {},
                                  "minmax": {"roles.1.attack": {"name": "minmax", "knowledge": "full"}}}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _final_adapters(grid_dir):
    from safetensors.torch import load_file

    out = {}
    for run in sorted((grid_dir / "runs").iterdir()):
        (final,) = run.glob("adapters/final*/adapter_model.safetensors")
        out[run.name.rsplit("-", 2)[0]] = load_file(str(final))
    return out


def _client_records(grid_dir):
    out = {}
    for run in sorted((grid_dir / "runs").iterdir()):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        out[run.name.rsplit("-", 2)[0]] = [{k: v for k, v in r.items() if k not in TIMING and k != "time"}
                                           for r in rows if r.get("type") == "client"]
    return out


def test_grid_reuses_round_one_and_h_and_equals_the_grid_without_it(tmp_path):
    """Two attacks of one seed: round 1 of the min-max run (its benign clients and the attacker's honest h, trained
    one at a time because the attack wraps the trainer) is read from the data-poisoning run (one batched pass);
    round 2 starts from different adapters and trains. The final adapters and client records equal a grid
    with ``--no-reuse`` bit for bit, and reuse.json counts what was reused."""
    from typer.testing import CliRunner

    from fedsafe.cli import _register_optional_commands, app

    path = _grid_file(tmp_path)
    _register_optional_commands()
    runner = CliRunner()
    grids = {}
    for mode in ("reuse", "no_reuse"):
        args = ["grid", str(path), "--no-progress"] + (["--no-reuse"] if mode == "no_reuse" else [])
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        grids[mode] = tmp_path / "out" / result.stdout.strip().splitlines()[-1].split("/")[-1]
    reuse = json.loads((grids["reuse"] / "reuse.json").read_text())
    dp, mm = (reuse["runs"][name] for name in ("data_poisoning", "minmax"))
    assert (dp["reused"], dp["computed"]) == (0, 6)
    assert (mm["reused"], mm["computed"]) == (3, 3)
    assert reuse["totals"]["reused"] == 3 and reuse["totals"]["seconds_saved"] > 0
    entries = list((grids["reuse"] / "cache" / "updates").glob("*/*.safetensors"))
    assert len(entries) == 9 and reuse["cache_bytes"] >= sum(p.stat().st_size for p in entries)
    assert not (grids["no_reuse"] / "reuse.json").exists()
    assert not (grids["no_reuse"] / "cache" / "updates").exists()

    with_cache, without = _final_adapters(grids["reuse"]), _final_adapters(grids["no_reuse"])
    assert set(with_cache) == set(without) == {"data_poisoning", "minmax"}
    for name in with_cache:
        assert with_cache[name].keys() == without[name].keys()
        assert all(torch.equal(with_cache[name][k], without[name][k]) for k in with_cache[name]), name
    # the two attacks really differ after round 1 (so round 2 had to train)
    assert any(not torch.equal(with_cache["minmax"][k], with_cache["data_poisoning"][k])
               for k in with_cache["minmax"])
    assert _client_records(grids["reuse"]) == _client_records(grids["no_reuse"])


def test_resume_after_crash_mid_round_reads_the_stored_clients(tmp_path, monkeypatch, test_seed):
    """A run killed between two clients of round 2 and resumed with the same cache directory (as a resumed grid
    does) reads round 2's first client back, trains the second, and ends at the adapter of an uninterrupted run
    without the cache, bit for bit."""
    from safetensors.torch import load_file

    from fedsafe.config import load_config
    from fedsafe.pipeline import run_experiment

    def cfg(out):
        return load_config(None, [
            "model.name=tiny", f"seed={test_seed}", f"output_dir={out}", "name=t", "fl.rounds=3", "fl.local_steps=2",
            "fl.batch_size=2", "data.samples_per_client=6", "data.max_length=96", "roles.0.clients=3",
            "fl.clients_per_round=2", "fl.lr=0.01", "fl.batched_clients=off",
            "data.heldout=[{path: 'starter:heldout'}]",
            "data.heldout_max=4", "eval.n_prompts=2", "eval.max_new_tokens=2", "eval.n_normal_prompts=0",
            "eval.helpfulness_proxy=false"])

    def final(run_dir):
        return load_file(str(run_dir / "adapters" / "final" / "adapter_model.safetensors"))

    expected = final(run_experiment(cfg(tmp_path / "plain"), progress=False).run_dir)
    calls = {"n": 0}
    real = LocalTrainer._fit

    def crash_at_fourth(self, *args, **kwargs):  # round 1: trainings 1-2; round 2: 3 is stored, 4 is killed
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LocalTrainer, "_fit", crash_at_fourth)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg(tmp_path / "b"), progress=False, update_cache=UpdateCache(tmp_path / "updates"))
    monkeypatch.setattr(LocalTrainer, "_fit", real)
    (interrupted,) = (tmp_path / "b").iterdir()
    cache = UpdateCache(tmp_path / "updates")
    resumed = run_experiment(resume=interrupted, progress=False, update_cache=cache)
    assert cache.counts()["reused"] == 1 and cache.counts()["computed"] == 3  # round 2: 1 read, 1 trained; round 3
    got = final(resumed.run_dir)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_batched_round_with_a_fedex_residual_is_not_cached(test_seed, tmp_path, monkeypatch):
    """The batched round checks what the key does not hold, as the sequential trainer does: with a FedEx residual
    in the base weights (round >= 2 of fl.lora_aggregation=fedex) nothing is read or stored."""
    import fedsafe.fl.lora_aggregation as lora_aggregation

    trainer, clients, start, rc = _setup(test_seed, dropout=0.0, n_clients=2)
    monkeypatch.setattr(lora_aggregation, "residual_round", lambda model: 1)
    trainer.update_cache = cache = UpdateCache(tmp_path)
    with cache.opened():
        InProcessEngine(trainer, clients, "on").fit(["c0", "c1"], start, replace(rc, base_residual_round=1))
    assert (cache.counts()["computed"], cache.counts()["not_cached"]) == (0, 2)
    assert not list(tmp_path.glob("*/*"))
