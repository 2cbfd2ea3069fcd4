"""fl.lora_aggregation on the tiny model: frozen factors, exact aggregation (FFA-LoRA, RoLoRA), the inexact
default, FedEx-LoRA's saved residual against the average of the client models, refusals, payload bytes."""

import os

import pytest
import torch

from fedsafe.aggregators import get as get_rule
from fedsafe.config import FLConfig, load_config
from fedsafe.data.format import tokenize_rows
from fedsafe.engines.inprocess import InProcessEngine
from fedsafe.errors import ConfigError
from fedsafe.data.client_data import ClientData
from fedsafe.fl.client import LocalTrainer, RoundConfig
from fedsafe.fl.lora_aggregation import (LoRAAggregation, lora_pairs, products, relative_errors,
                                         trainable_factors)
from fedsafe.fl.loop import run_rounds
from fedsafe.fl.server import Server
from fedsafe.models import attach_lora
from fedsafe.rundir import RunDir


def _client(tok, cid, offset, n=8):
    # two clients with different data: client drift, so separately averaged factors are visibly inexact
    rows = [{"instruction": f"item {i + offset}", "response": f"{'xyz' if offset else 'abc'} {i * 7 + offset}"}
            for i in range(n)]
    return ClientData(cid, "benign", tokenize_rows(tok, rows, 64))


def _tiny():
    from fedsafe.models import byte_tokenizer, tiny_llama

    tok = byte_tokenizer()
    return tiny_llama(tok, seed=_seed()), tok


def _seed():
    return int(os.environ.get("FEDSAFE_TEST_SEED", "0"))


def _setup():
    model, tok = _tiny()  # a fresh model per run: attach_lora changes the model it wraps
    peft = attach_lora(model, r=4, alpha=8)
    trainer = LocalTrainer(peft, tok)
    return trainer, [_client(tok, "c0", 0), _client(tok, "c1", 500)]


def _run(tmp_path, mode, rounds=2, **fl):
    trainer, clients = _setup()
    cfg = FLConfig(rounds=rounds, local_steps=4, batch_size=4, lr=5e-2, lr_schedule="constant",
                   lora_aggregation=mode, **fl)
    init = trainer.flat.get()
    server = Server(cfg, init, get_rule("fedavg"), num_clients=2)
    run_dir = RunDir.create(tmp_path, mode)
    run_rounds(server, InProcessEngine(trainer, clients), clients, run_dir, rounds=rounds, clients_per_round=2)
    return server, init, run_dir.records("round")


def test_schedule_of_trained_factors():
    assert [trainable_factors("factors", t) for t in (1, 2)] == ["AB", "AB"]
    assert [trainable_factors("ffa", t) for t in (1, 2, 3)] == ["B", "B", "B"]
    assert [trainable_factors("rolora", t) for t in (1, 2, 3, 4)] == ["B", "A", "B", "A"]  # B first: B_0 = 0
    assert [trainable_factors("fedex", t) for t in (1, 2)] == ["AB", "AB"]


@pytest.mark.parametrize("trainable", ["B", "A"])
def test_frozen_factor_update_is_exactly_zero(trainable):
    trainer, clients = _setup()
    flat = trainer.flat
    g = flat.get()
    g[flat.mask("B")] = 0.01 * torch.randn(int(flat.mask("B").sum()))  # B != 0 so that A has a gradient
    res = trainer.fit(clients[0], g, RoundConfig(round=1, lr=1e-2, local_steps=3, batch_size=4,
                                                 weight_decay=0.1, trainable=trainable))
    frozen = flat.mask("A" if trainable == "B" else "B")
    assert bool((res.update[frozen] == 0).all())  # exactly, not approximately (weight decay included)
    assert float(res.update[~frozen].abs().max()) > 1e-4
    assert all(p.requires_grad for p in flat.params)  # unfrozen again after fit


def test_frozen_factor_update_is_exactly_zero_under_local_dp():
    from fedsafe.defenses.differential_privacy.mechanism import DPLocalTrainer

    model, tok = _tiny()
    peft = attach_lora(model, r=4, alpha=8)
    trainer = DPLocalTrainer(peft, tok, clip_norm=1.0, noise_multiplier=1.0)
    res = trainer.fit(_client(tok, "c0", 0), trainer.flat.get(),
                      RoundConfig(round=1, lr=1e-2, local_steps=2, batch_size=4, trainable="B"))
    assert bool((res.update[trainer.flat.mask("A")] == 0).all())
    assert float(res.update[trainer.flat.mask("B")].abs().max()) > 0


def test_aggregation_error_matches_a_loop_over_clients_and_layers():
    torch.manual_seed(0)

    class Flat:  # a two-layer LoRA layout, same shapes, as FlatLoRA lays it out
        from fedsafe.fl.params import ParamSpec

        specs = (ParamSpec("m.l0.lora_A.weight", (2, 5), 0), ParamSpec("m.l0.lora_B.weight", (3, 2), 10),
                 ParamSpec("m.l1.lora_A.weight", (2, 5), 16), ParamSpec("m.l1.lora_B.weight", (3, 2), 26))
        numel = 32

    flat = Flat()
    pairs = lora_pairs(flat)
    clients, w, glob = torch.randn(3, 32), torch.tensor([1.0, 2.0, 5.0]), torch.randn(32)
    got = torch.cat([relative_errors(avg, g) for _, avg, g in products(pairs, clients, w, glob)])
    wn = w / w.sum()
    for j, p in enumerate(pairs):
        def f(v, s):
            return v[s.offset: s.offset + s.numel].view(s.shape)
        avg = sum(wn[i] * f(clients[i], p.b) @ f(clients[i], p.a) for i in range(3))
        ref = (avg - f(glob, p.b) @ f(glob, p.a)).norm() / avg.norm()
        torch.testing.assert_close(got[j], ref, rtol=1e-5, atol=1e-6)


def test_ffa_and_rolora_aggregate_exactly_factors_does_not(tmp_path):
    _, _, factors = _run(tmp_path, "factors")
    errors = {"factors": [r["aggregation_error"] for r in factors]}
    for mode in ("ffa", "rolora"):
        _, _, records = _run(tmp_path, mode)
        errors[mode] = [r["aggregation_error"] for r in records]
        assert [r["trainable"] for r in records] == ([["B", "B"], ["B", "A"]][mode == "rolora"])
    # 14 adapted layers, each at float32 rounding (~1e-7) when exact; ~0.1-1 per layer under client drift
    assert all(e < 1e-4 for e in errors["ffa"] + errors["rolora"]), errors
    assert all(e > 0.05 for e in errors["factors"]), errors


def test_ffa_keeps_a_at_its_shared_init_and_halves_the_payload(tmp_path):
    server, init, records = _run(tmp_path, "ffa", rounds=1)
    flat = server.lora.flat
    a = flat.mask("A")
    assert torch.equal(server.global_vec[a], init[a])  # A never left the seeded init every party builds
    _, _, factors = _run(tmp_path, "factors", rounds=1)
    assert records[0]["bytes_per_client"] == 4 * int(flat.mask("B").sum())
    assert factors[0]["bytes_per_client"] == 4 * flat.numel
    assert records[0]["bytes_kind"] == "plaintext"
    ratio = records[0]["bytes_per_client"] / factors[0]["bytes_per_client"]
    assert 0.35 < ratio < 0.65  # B's share: (sum of out dims) / (sum of in + out dims) over the layers


def test_client_level_dp_noise_never_moves_a_frozen_factor(tmp_path):
    from fedsafe.defenses.differential_privacy.mechanism import DPFedAvg

    trainer, clients = _setup()
    cfg = FLConfig(rounds=1, local_steps=2, batch_size=4, lr=1e-2, lora_aggregation="ffa")
    rule = DPFedAvg(clip_norm=0.5, noise_multiplier=1.0)
    server = Server(cfg, trainer.flat.get(), rule, num_clients=2)
    init = server.global_vec.clone()
    run_rounds(server, InProcessEngine(trainer, clients), clients, RunDir.create(tmp_path, "dp"), rounds=1,
               clients_per_round=2)
    a = trainer.flat.mask("A")
    assert torch.equal(server.global_vec[a], init[a]) and not torch.equal(server.global_vec[~a], init[~a])


def test_fedex_saved_residual_reproduces_the_average_of_the_client_models(tmp_path):
    """load_adapter's model = W0 + residual + s B_g A_g equals the mean of the last round's client models."""
    from peft import PeftModel

    from fedsafe.run_model import load_adapter
    from fedsafe.pipeline import run_experiment

    client_models: list[dict] = []  # round -> {layer: mean of client W_eff}

    def effective_weights(model, flat, vec):
        flat.set(vec)
        out = {}
        for p in lora_pairs(flat):
            m = model.get_submodule(p.module)
            out[p.module] = (m.get_base_layer().weight.detach().float()
                             + m.scaling["default"] * m.lora_B["default"].weight.detach()
                             @ m.lora_A["default"].weight.detach())
        return out

    class Recording(InProcessEngine):
        def fit(self, client_ids, global_vec, rc, on_result=None):
            results = super().fit(client_ids, global_vec, rc, on_result)
            per = [effective_weights(self.trainer.model, self.trainer.flat, global_vec + r.update) for r in results]
            n = [r.num_samples for r in results]  # FedAvg's weights
            client_models.append({k: sum(ni * p[k] for ni, p in zip(n, per)) / sum(n) for k in per[0]})
            return results

    cfg = load_config(None, [
        "model.name=tiny", f"seed={_seed()}", f"output_dir={tmp_path}", "name=fx", "fl.rounds=2",
        "fl.local_steps=3", "fl.batch_size=2", "data.samples_per_client=6", "data.max_length=96",
        "roles.0.clients=2", "fl.clients_per_round=2", "fl.lr=0.05", "fl.lr_schedule=constant",
        "fl.lora_aggregation=fedex", "eval.prompts=null", "eval.base=false"])
    res = run_experiment(cfg, progress=False, engine_factory=lambda t, c: Recording(t, c))
    records = [r for r in RunDir.open(res.run_dir).records("round")]
    assert all(r["aggregation_error"] < 1e-4 for r in records), records
    assert all(r["aggregation_error_factors"] > 1e-3 for r in records), records  # what plain averaging misses
    assert (res.run_dir / "adapters" / "fedex_residual.safetensors").exists()

    loaded = load_adapter(res.run_dir)
    expected = client_models[-1]
    worst = 0.0
    for module, want in expected.items():
        m = loaded.get_submodule(module)
        got = (m.get_base_layer().weight.detach().float()
               + m.scaling["default"] * m.lora_B["default"].weight.detach() @ m.lora_A["default"].weight.detach())
        worst = max(worst, float((got - want).abs().max()))
    assert worst < 1e-5, worst

    # plain PEFT misses the residual: its model is not the average of the client models
    plain = PeftModel.from_pretrained(_tiny()[0], str(res.run_dir / "adapters" / "final"))
    gap = 0.0
    for module, want in expected.items():
        m = plain.get_submodule(module)
        got = (m.get_base_layer().weight.detach().float()
               + m.scaling["default"] * m.lora_B["default"].weight.detach() @ m.lora_A["default"].weight.detach())
        gap = max(gap, float((got - want).abs().max()))
    assert gap > 100 * max(worst, 1e-7), (gap, worst)


@pytest.mark.parametrize("override, needle", [
    (["fl.lora_aggregation=fedex", "secure_agg.enabled=true"], "fl.lora_aggregation=fedex cannot be combined with "
                                                               "secure_agg.enabled"),
    (["fl.lora_aggregation=fedex", "dp.client_level=true"], "fl.lora_aggregation=fedex cannot be combined with "
                                                            "dp.client_level=true"),
    (["fl.lora_aggregation=fedex", "fl.algorithm=fedadam"], "fl.lora_aggregation=fedex needs plain averaging"),
    (["fl.lora_aggregation=fedex", "fl.server_lr=0.5"], "fl.lora_aggregation=fedex needs plain averaging"),
    (["fl.lora_aggregation=rolora", "aggregator.name=probe"], "probe.features.kind=B reads one LoRA factor"),
    (["fl.lora_aggregation=ffa", "aggregator.name=probe", "probe.features.kind=A"], "probe.features.kind=A reads"),
    (["fl.lora_aggregation=exact"], "fl.lora_aggregation"),
])
def test_incompatible_combinations_are_refused_at_load(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, ["roles.0.clients=4", *override])


def test_linear_modes_load_with_secure_aggregation_and_dp():
    for mode in ("ffa", "rolora"):
        assert load_config(None, [f"fl.lora_aggregation={mode}", "secure_agg.enabled=true"]).fl.lora_aggregation == mode
        assert load_config(None, [f"fl.lora_aggregation={mode}", "dp.client_level=true"])
    assert load_config(None, ["fl.lora_aggregation=rolora", "aggregator.name=probe", "probe.features.kind=both"])
    assert LoRAAggregation  # the server-side object the loop attaches


def test_round_config_fields_travel_to_flower_clientapps():
    from fedsafe.engines.flower import codec

    rc = RoundConfig(round=4, lr=1e-3, local_steps=2, batch_size=2, trainable="A", base_residual_round=3)
    _, got, *_ = codec.decode_train(codec.encode_train(torch.zeros(3), rc, "client_00", "seed: 0", "tk"))
    assert (got.trainable, got.base_residual_round) == ("A", 3)


def _tiny_run_cfg(tmp_path, name, *extra):
    return load_config(None, [
        "model.name=tiny", f"seed={_seed()}", f"output_dir={tmp_path}", f"name={name}", "fl.rounds=2",
        "fl.local_steps=2", "fl.batch_size=2", "data.samples_per_client=6", "data.max_length=96",
        "roles.0.clients=2", "fl.clients_per_round=2", "fl.lr=0.05", "fl.lr_schedule=constant",
        "eval.prompts=null", "eval.base=false", *extra])


def test_fedex_in_flower_simulation_equals_inprocess(tmp_path):
    from safetensors.torch import load_file

    from fedsafe.engines.flower.simulation import run_flower_experiment
    from fedsafe.pipeline import run_experiment

    cfg = _tiny_run_cfg(tmp_path, "fx", "fl.lora_aggregation=fedex")
    a = run_experiment(cfg, progress=False)
    b = run_flower_experiment(cfg, progress=False)
    for name in ("adapters/final/adapter_model.safetensors", "adapters/fedex_residual.safetensors"):
        wa, wb = load_file(str(a.run_dir / name)), load_file(str(b.run_dir / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    # round 2's client losses are computed on the model with round 1's residual in its base weights
    assert a.round_losses == pytest.approx(b.round_losses, rel=1e-5)


def test_ffa_under_secure_aggregation_with_pruning_keeps_a_frozen(tmp_path):
    from safetensors.torch import load_file

    from fedsafe.fl.params import FlatLoRA
    from fedsafe.pipeline import run_experiment

    cfg = _tiny_run_cfg(tmp_path, "he", "fl.lora_aggregation=ffa", "secure_agg.enabled=true",
                        "secure_agg.prune_start=0.2", "secure_agg.prune_end=0.5")
    res = run_experiment(cfg, progress=False)
    saved = load_file(str(res.run_dir / "adapters" / "final" / "adapter_model.safetensors"))
    peft = attach_lora(_tiny()[0], cfg.lora.r, int(cfg.lora.alpha), cfg.lora.dropout, cfg.lora.target_modules,
                       seed=cfg.seed)
    init = FlatLoRA(peft).state_dict(FlatLoRA(peft).get())
    assert all(torch.equal(saved[k], init[k]) for k in saved if ".lora_A." in k)  # A: its shared init
    assert any(float(saved[k].abs().max()) > 0 for k in saved if ".lora_B." in k)  # B trained, from 0
    records = RunDir.open(res.run_dir).records("round")
    assert all(r["bytes_kind"] == "ciphertext" and r["bytes_per_client"] > 0 for r in records)
    assert all(r["aggregation_error"] is None for r in records)  # the server never sees a client's factors


def test_fedex_residual_survives_a_checkpoint_into_a_fresh_model(tmp_path):
    server, init, records = _run(tmp_path, "fedex", rounds=1)
    model = server.lora.model
    trainer2, _ = _setup()  # a fresh process's model: no residual yet
    resumed = Server(server.cfg, init, get_rule("fedavg"), num_clients=2)
    resumed.load_state_dict(server.state_dict())
    resumed.attach_lora(LoRAAggregation("fedex", trainer2.flat, trainer2.model))
    moved = 0.0
    for p in lora_pairs(trainer2.flat):
        w1 = model.get_submodule(p.module).get_base_layer().weight
        w2 = trainer2.model.get_submodule(p.module).get_base_layer().weight
        torch.testing.assert_close(w2, w1, rtol=0, atol=1e-6)
        moved = max(moved, float(server.lora.residual[p.module + ".weight"].abs().max()))
    assert moved > 1e-4  # the residual is not trivially zero
    assert resumed.round_config(1).base_residual_round == 1


def test_load_adapter_without_residual_is_plain_peft_and_refuses_a_stale_round(tmp_path):
    from fedsafe.run_model import load_adapter
    from fedsafe.pipeline import run_experiment

    res = run_experiment(_tiny_run_cfg(tmp_path, "ffa", "fl.lora_aggregation=ffa"), progress=False)
    model = load_adapter(res.run_dir)  # no residual file: the adapter alone
    assert not (res.run_dir / "adapters" / "fedex_residual.safetensors").exists()
    assert getattr(model, "_fedsafe_residual_round", 0) == 0
    fx = run_experiment(_tiny_run_cfg(tmp_path, "fx", "fl.lora_aggregation=fedex"), progress=False)
    assert load_adapter(fx.run_dir / "adapters" / "round_0002")._fedsafe_residual_round == 2
    with pytest.raises(ConfigError, match="saved the residual of round 2 only"):
        load_adapter(fx.run_dir / "adapters" / "round_0001")


# ---- fedex under robust rules (issue 28, item 1) and its read-back aggregation error (item 2) ------------

def _fl(mode="fedex", **kw):
    # the default norm bound (fl.max_norm_ratio), where present, would clip the attacker before the rule:
    # these tests look at the rule alone
    extra = {"max_norm_ratio": None} if "max_norm_ratio" in FLConfig.model_fields else {}
    return FLConfig(rounds=1, lora_aggregation=mode, **extra, **kw)


def _effective(model, flat, vec):
    """Per adapted layer, the weight the model computes with: base (+ residual) + s B A (float64)."""
    flat.set(vec)
    out = {}
    for p in lora_pairs(flat):
        m = model.get_submodule(p.module)
        out[p.module] = (m.get_base_layer().weight.detach().double()
                         + m.scaling["default"] * m.lora_B["default"].weight.detach().double()
                         @ m.lora_A["default"].weight.detach().double())
    return out


def _start(seed=0):
    """The tiny model with LoRA and a global vector whose B is non-zero (as after a first round)."""
    trainer, _ = _setup()
    flat = trainer.flat
    g = flat.get()
    gen = torch.Generator().manual_seed(seed)
    b = flat.mask("B")
    g[b] = 0.05 * torch.randn(int(b.sum()), generator=gen)
    return trainer, flat, g


def _updates(flat, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [0.01 * torch.randn(flat.numel, generator=gen) for _ in range(n)]


def _round(rule, updates, mode="fedex", seed=0, **rule_params):
    """One server round of ``rule`` on ``updates``; returns (change of the model's weights, stats, W before,
    W after, the server)."""
    from fedsafe.fl.client import ClientResult

    trainer, flat, g = _start(seed)
    agg = get_rule(rule, **rule_params) if isinstance(rule, str) else rule
    server = Server(_fl(mode), g, agg, num_clients=len(updates))
    server.attach_lora(LoRAAggregation(mode, flat, trainer.model))
    before = _effective(trainer.model, flat, g)
    stats = server.aggregate([ClientResult(f"c{i}", u.clone(), 8) for i, u in enumerate(updates)])
    after = _effective(trainer.model, flat, server.global_vec)
    change = sum(float((after[k] - before[k]).norm()) for k in before)
    return change, stats, before, after, (trainer, flat, g)


@pytest.mark.parametrize("rule, params", [("norm_clip", {"max_norm": 0.3}),
                                          ("norm_clip", {"max_norm": 0.3, "aggregator": "median"}),
                                          ("krum", {"f": 1}), ("multikrum", {"f": 1, "m": 3}),
                                          ("bulyan", {"f": 1}), ("dnc", {"f": 1})])
def test_fedex_follows_the_rule_when_one_attacker_scales_its_update(rule, params):
    """Issue 28: with fedex the global change grew with the attacker's scale (0.38 / 3.3 / 276 under norm_clip
    for x1 / x10 / x100) since the residual averaged the raw factors; it must stay bounded as with factors."""
    n = 7  # bulyan needs 4f + 3
    changes, factors = {}, {}
    for k in (1, 10, 100):
        ups = _updates(_start()[1], n)
        ups[0] = k * ups[0]  # one attacker, boosted
        changes[k] = _round(rule, ups, **params)[0]
        factors[k] = _round(rule, ups, mode="factors", **params)[0]
    assert changes[100] < 2 * changes[1] and changes[10] < 2 * changes[1], (changes, factors)
    assert changes[100] < 3 * factors[100], (changes, factors)


@pytest.mark.parametrize("rule, params", [("median", {}), ("trimmed_mean", {"beta": 0.2}), ("bulyan", {"f": 1}),
                                          ("norm_clip", {"max_norm": 10.0, "aggregator": "median"})])
def test_fedex_under_a_coordinate_wise_rule_ignores_an_attacker_huge_on_few_coordinates(rule, params):
    """Issue 28: an attacker huge on 5% of the coordinates moved the fedex model by 3179 (median) and 1632
    (trimmed mean) against 0.39 with factors; the residual must be the rule's own aggregate of client models."""
    n = 7
    ups = _updates(_start()[1], n)
    gen = torch.Generator().manual_seed(5)
    idx = torch.randperm(ups[0].numel(), generator=gen)[: ups[0].numel() // 20]
    ups[0][idx] = 50.0
    benign = _round(rule, _updates(_start()[1], n), **params)[0]
    change, stats, *_ = _round(rule, ups, **params)
    factors = _round(rule, ups, mode="factors", **params)[0]
    assert change < 3 * max(benign, factors), (change, benign, factors)
    assert stats["fedex_target"] in ("median", "trimmed_mean", "bulyan")


def _median(v, stats):
    return v.median(dim=0).values


def _trimmed(v, stats):  # beta 0.2 of 5 clients: one value off each end
    return v.sort(dim=0).values[1:-1].mean(dim=0)


def _bulyan(v, stats):  # the 3 (= beta) of Krum's 5 selected values nearest the median, per coordinate
    sel = v[stats["aggregator_info"]["selected"]]
    med = sel.median(dim=0).values
    nearest = (sel - med).abs().argsort(dim=0)[: stats["aggregator_info"]["beta"]]
    return sel.gather(0, nearest).mean(dim=0)


@pytest.mark.parametrize("rule, params, n, reference", [("median", {}, 5, _median),
                                                        ("trimmed_mean", {"beta": 0.2}, 5, _trimmed),
                                                        ("bulyan", {"f": 1}, 7, _bulyan)])
def test_fedex_under_a_coordinate_wise_rule_is_that_rule_over_the_client_models(rule, params, n, reference):
    """The reference: W = rule_i(W_prev + s (B_i A_i - B_0 A_0)) per coordinate, from the client models."""
    ups = _updates(_start()[1], n)
    ups[0][:50] = 30.0
    _, stats, before, after, (trainer, flat, g) = _round(rule, ups, **params)
    models = [_effective(trainer.model, flat, g + u) for u in ups]
    shift = {k: _effective(trainer.model, flat, g)[k] - before[k] for k in before}  # the residual now in the base
    for k in before:
        want = reference(torch.stack([m[k] - shift[k] for m in models]), stats)
        torch.testing.assert_close(after[k], want, rtol=0, atol=1e-6)
    assert stats["aggregation_error"] < 1e-3


def test_fedex_under_norm_clip_is_the_mean_of_the_clipped_client_models():
    ups = _updates(_start()[1], 3)
    ups[1] = 50 * ups[1]
    _, stats, before, after, (trainer, flat, g) = _round("norm_clip", ups, max_norm=0.3)
    clipped = [u * min(1.0, 0.3 / float(u.norm())) for u in ups]
    shift = {k: _effective(trainer.model, flat, g)[k] - before[k] for k in before}
    models = [_effective(trainer.model, flat, g + u) for u in clipped]
    for k in before:
        want = sum(m[k] - shift[k] for m in models) / 3
        torch.testing.assert_close(after[k], want, rtol=0, atol=1e-6)
    assert stats["fedex_target"] == "weighted_mean"


@pytest.mark.parametrize("name, params", [("geometric_median", {}), ("residual", {}),
                                          ("norm_clip", {"max_norm": 1.0, "aggregator": "geometric_median"}),
                                          ("probe+residual", {})])
def test_fedex_with_a_rule_it_cannot_follow_is_refused_at_load(name, params):
    sets = [f"aggregator.params.{k}={v}" for k, v in params.items()]
    with pytest.raises(ConfigError, match=r"fl\.lora_aggregation=fedex cannot be combined with aggregator\.name="):
        load_config(None, ["roles.0.clients=8", "fl.clients_per_round=8", "fl.lora_aggregation=fedex",
                           f"aggregator.name={name}", *sets])
    assert load_config(None, ["roles.0.clients=8", "fl.clients_per_round=8", "fl.lora_aggregation=ffa",
                               f"aggregator.name={name}", *sets])


def test_fedex_refuses_a_rule_whose_output_it_cannot_reproduce_at_run_time():
    from fedsafe.aggregators.base import AggregationResult, Aggregator
    from fedsafe.errors import FedsafeError

    class Shrink(Aggregator):  # not a weighted mean of its inputs, not a known coordinate-wise rule
        name = "shrink"

        def aggregate(self, updates, num_samples, client_ids):
            w = torch.full((updates.shape[0],), 1.0 / updates.shape[0])
            return AggregationResult(torch.tanh(w @ updates), w)

    with pytest.raises(FedsafeError, match="not a weighted mean"):
        _round(Shrink(), _updates(_start()[1], 3))


def test_fedex_with_the_probe_follows_its_exclusion_and_the_inner_median():
    from fedsafe import aggregators

    trainer, flat, _ = _start()
    mask = flat.mask("B", [0])
    gen = torch.Generator().manual_seed(3)
    direction = torch.randn(int(mask.sum()), generator=gen)

    def make(labels, scale=1.0):
        u = 0.01 * torch.randn(len(labels), flat.numel, generator=gen)
        for i, lab in enumerate(labels):
            u[i, mask] += (1 if lab else -1) * scale * 0.05 * direction
        return u

    probe = aggregators.get("probe+median")
    probe.fit_updates(make([0] * 8 + [1] * 8), [0] * 8 + [1] * 8, flat=flat)
    ups = list(make([0, 0, 0, 0, 1]))
    ups[4] = 100 * ups[4]  # flagged by the probe
    idx = torch.randperm(flat.numel, generator=gen)[: flat.numel // 20]
    ups[3][idx] = 50.0  # not flagged: the median must ignore it
    change, stats, *_ = _round(probe, ups)
    assert "c4" in stats["aggregator_info"]["probe"]["flagged"]
    factors = _round(probe, ups, mode="factors")[0]
    assert change < 3 * factors, (change, factors)
    assert stats["aggregation_error"] < 1e-3


def _fault(monkeypatch, kind):
    from fedsafe.fl import lora_aggregation as la

    if kind == "not_applied":
        monkeypatch.setattr(la, "_add_to_base", lambda model, key, delta: None, raising=False)
    elif kind == "wrong_sign":
        orig = la.__dict__.get("_add_to_base")
        monkeypatch.setattr(la, "_add_to_base", lambda model, key, delta: orig(model, key, -delta), raising=False)
    elif kind == "wrong_scale":
        orig_init = LoRAAggregation.__init__

        def init(self, *a, **kw):
            orig_init(self, *a, **kw)
            self.scaling = {k: 2 * v for k, v in self.scaling.items()}
        monkeypatch.setattr(LoRAAggregation, "__init__", init)


@pytest.mark.parametrize("fault", [None, "not_applied", "wrong_sign", "wrong_scale"])
def test_fedex_aggregation_error_reads_back_what_the_model_holds(monkeypatch, fault):
    """Issue 28 item 2: the logged error was ||avg - (glob + (avg - glob))||, 0 by construction."""
    _fault(monkeypatch, fault)
    ups = _updates(_start()[1], 3)
    _, stats, before, after, (trainer, flat, g) = _round("fedavg", ups)
    assert stats["aggregation_error_factors"] > 0.05  # what the factors alone miss (client drift)
    if fault is None:
        assert stats["aggregation_error"] < 1e-3, stats
    else:  # the model misses the residual (or holds it with the wrong sign or scale): the error says so
        assert stats["aggregation_error"] > 0.5 * stats["aggregation_error_factors"], stats


def test_fedex_coordinate_wise_target_does_not_depend_on_the_memory_chunks():
    from fedsafe.fl.lora_aggregation import RuleTarget, target_products

    _, flat, g = _start()
    ups = torch.stack(_updates(flat, 5))
    rule = get_rule("median")
    target = RuleTarget(torch.arange(5), ups, combine=lambda v: rule(v, torch.ones(5), list("abcde")).update,
                        kind="median")
    pairs = lora_pairs(flat)
    whole = [t_l for _, t, _ in target_products(pairs, g, target, g + ups[0]) for t_l in t]
    small = [t_l for _, t, _ in target_products(pairs, g, target, g + ups[0], chunk_values=1000) for t_l in t]
    assert len(whole) == len(small) == len(pairs)
    for x, y in zip(whole, small):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-7)


def test_fedex_follows_weak_dp_clipping_and_refuses_its_noise():
    from fedsafe.defenses.weak_dp import WeakDPRule

    ups = _updates(_start()[1], 7)
    changes = []
    for k in (1, 100):
        ups[0] = k * _updates(_start()[1], 7)[0]
        changes.append(_round(WeakDPRule(get_rule("fedavg"), max_norm=0.3, noise_std=0.0), ups)[0])
    assert changes[1] < 1.5 * changes[0], changes
    with pytest.raises(ConfigError, match=r"fl\.lora_aggregation=fedex cannot be combined with weak_dp\.noise_std"):
        load_config(None, ["fl.lora_aggregation=fedex", "weak_dp.enabled=true", "weak_dp.noise_std=0.001"])
    assert load_config(None, ["fl.lora_aggregation=fedex", "weak_dp.enabled=true", "weak_dp.noise_std=0"])
