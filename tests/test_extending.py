"""The two plug-ins docs/extending.md walks through: sign flipping (an attack) and weak DP (a defense)."""

import json
from pathlib import Path

import pytest
import torch

from fedsafe import aggregators
from fedsafe.config import load_config
from fedsafe.errors import ConfigError
from fedsafe.data.client_data import ClientData
from fedsafe.fl.client import ClientResult, RoundConfig

RC = RoundConfig(round=1, lr=0.01, local_steps=1, batch_size=1)


def _plugin(name, overrides):
    import fedsafe.plugins as plugins

    cfg = load_config(None, ["model.name=tiny", *overrides])
    ctx = plugins.RunContext(**vars(plugins.Setup.from_config(cfg)))
    return plugins.build(cfg, ctx).get(name)


ROLES = ("roles=[{name: benign, clients: 2, data: [{path: 'starter:train'}]}, "
         "{name: malicious, clients: 1, data: [{path: 'starter:train'}]}]")


def test_sign_flip_negates_only_attackers():
    p = _plugin("sign_flip", [ROLES, "sign_flip.enabled=true", "sign_flip.scale=3"])
    h = torch.tensor([1.0, -2.0, 0.5])
    bad = p.client_update(ClientResult("c2", h.clone(), 4), ClientData("c2", "malicious", [], True), None, RC, None)
    good = p.client_update(ClientResult("c0", h.clone(), 4), ClientData("c0", "benign", [], False), None, RC, None)
    assert torch.equal(bad.update, -3 * h) and bad.metrics["sign_flip"] == 3
    assert torch.equal(good.update, h)


def test_sign_flip_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"sign_flip.roles: \['nobody'\] are not roles"):
        load_config(None, ["sign_flip.enabled=true", "sign_flip.roles=[nobody]"])
    with pytest.raises(ConfigError, match="no role attacks"):
        load_config(None, ["sign_flip.enabled=true"])


def test_median_resists_sign_flip_where_fedavg_does_not():
    """Two benign clients near +1, one flipped attacker at -3: FedAvg moves against the benign direction less
    than the benign mean, the median keeps the benign value (a formula check, not a training outcome)."""
    benign = torch.tensor([[1.0, 1.0], [1.2, 0.8]])
    flipped = -3 * torch.tensor([[1.1, 0.9]])
    updates = torch.cat([benign, flipped])
    n = torch.ones(3)
    avg = aggregators.get("fedavg")(updates, n, ["a", "b", "c"]).update
    med = aggregators.get("median")(updates, n, ["a", "b", "c"]).update
    assert torch.allclose(avg, (benign.sum(0) + flipped[0]) / 3)
    assert float(avg @ benign.mean(0)) < 0 < float(med @ benign.mean(0))


def test_weak_dp_clips_then_noises_the_rule_output():
    p = _plugin("weak_dp", ["weak_dp.enabled=true", "weak_dp.max_norm=1.0", "weak_dp.noise_std=0.01",
                            "aggregator.name=median", "fl.clients_per_round=2"])
    rule = p.server_view(aggregators.get("median"))
    updates = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.5]])
    res = rule(updates, torch.ones(3), ["a", "b", "c"])
    clipped = torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.5]])
    expected = clipped.median(dim=0).values
    assert res.info["weak_dp"]["clipped"] == [True, False, False]
    noise = res.update - expected
    assert 0 < float(noise.abs().max()) < 0.06  # N(0, 0.01^2): five sigma
    no_noise = _plugin("weak_dp", ["weak_dp.enabled=true", "weak_dp.max_norm=1.0"]).server_view(
        aggregators.get("fedavg"))(updates, torch.ones(3), ["a", "b", "c"])
    assert torch.allclose(no_noise.update, clipped.mean(0))


def test_weak_dp_is_refused_under_secure_aggregation():
    with pytest.raises(ConfigError, match="weak_dp clips each client's plaintext update; it is incompatible with "
                                          "secure_agg.enabled"):
        load_config(None, ["weak_dp.enabled=true", "secure_agg.enabled=true"])


def test_sign_flip_and_weak_dp_in_a_run(tmp_path):
    """End to end on the tiny model: the attacker's logged update norm is scale x its honest one, and weak DP's
    bound holds for every update the rule saw."""
    from fedsafe.pipeline import run_experiment

    common = ["model.name=tiny", f"output_dir={tmp_path}", "fl.rounds=1", "fl.local_steps=2", "fl.batch_size=2",
              "data.samples_per_client=4", "data.max_length=64", "fl.clients_per_round=3", "fl.lr=0.01",
              "eval.helpfulness_proxy=false", "eval.normal_prompts=null", ROLES]
    res = run_experiment(load_config(None, [*common, "name=sf", "sign_flip.enabled=true", "sign_flip.scale=2",
                                            "weak_dp.enabled=true", "weak_dp.max_norm=0.05"]), progress=False)
    recs = [json.loads(x) for x in (Path(res.run_dir) / "metrics.jsonl").read_text().splitlines()]
    rnd = next(r for r in recs if r["type"] == "round")
    info = rnd["aggregator_info"]["weak_dp"]
    clients = [r for r in recs if r["type"] == "client"]
    mal = next(c for c in clients if c["malicious"])
    assert mal["sign_flip"] == 2
    # the client's own metric is its honest update norm; the server saw twice that, then clipped it to 0.05
    i = rnd["clients"].index(mal["client_id"])
    assert info["norms"][i] == pytest.approx(2 * mal["update_norm"], rel=1e-4)
    assert rnd["update_norm"] <= 0.05 + 1e-6
