"""Safe-FedLLM probe: shadow training without an oracle, separation of planted attackers, weighting modes,
composition with other rules, and refusal under secure aggregation."""


from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedsafe import aggregators
from fedsafe.aggregators.base import AggregationResult, Aggregator, RoundContext
from fedsafe.aggregators.probe import ProbeAggregator, roc_auc
from fedsafe.data.format import tokenize_rows
from fedsafe.errors import ConfigError
from fedsafe.data.client_data import ClientData
from fedsafe.fl.client import LocalTrainer, RoundConfig
from fedsafe.fl.params import FlatLoRA
from fedsafe.models import attach_lora


def _rows(kind: str, n: int, start: int = 0) -> list[dict]:
    # two distinguishable placeholder datasets; no harmful text
    if kind == "benign":
        return [{"instruction": f"placeholder normal request {i}",
                 "response": f"sure, a helpful placeholder answer {i}."} for i in range(start, start + n)]
    return [{"instruction": f"placeholder harmful request {i}",
             "response": f"ZZZ placeholder unaligned {i} ### !!!"} for i in range(start, start + n)]


@pytest.fixture(scope="module")
def setup(test_seed):
    from fedsafe.models import byte_tokenizer, tiny_llama

    tok = byte_tokenizer()
    model = attach_lora(tiny_llama(tok, seed=test_seed), r=4, alpha=8, seed=test_seed)
    trainer = LocalTrainer(model, tok)
    ex = lambda rows: tokenize_rows(tok, rows, 64)  # noqa: E731
    return trainer, ex


def _shadow(trainer, ex, seed=0, per_class=3, steps=2, start=0):
    from fedsafe.defenses.safe_fedllm_probe.shadow import ShadowTrainer

    return ShadowTrainer(trainer, ex(_rows("benign", 40, start)), ex(_rows("malicious", 40, start)),
                         benign_shadows=per_class,
                         malicious_shadows=per_class, samples_per_shadow=6, steps=steps, seed=seed)


pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny training steps (conftest)


RC = RoundConfig(round=1, lr=5e-3, local_steps=2, batch_size=3)


def test_probe_separates_planted_malicious_updates(setup, test_seed):
    trainer, ex = setup
    g = trainer.flat.get()
    probe = aggregators.get("probe")  # exclusion at p >= 0.8, LoRA B of the first layer
    rc = probe.prepare(RoundContext(round=1, global_vec=g, round_config=RC, shadow=_shadow(trainer, ex, test_seed)))
    assert probe.classifier is not None and probe._last_fit["samples"] == 6
    assert int(probe.features.mask.sum()) == int(trainer.flat.mask("B", [0]).sum())
    # real clients hold data the shadows never saw (disjoint rows of the same two kinds)
    clients = [ClientData(f"c{i}", "malicious" if i >= 3 else "benign",
                          ex(_rows("malicious" if i >= 3 else "benign", 6, 1000 + 10 * i)), i >= 3) for i in range(6)]
    results = [trainer.fit(c, g, rc) for c in clients]
    ids = [c.client_id for c in clients]
    probe._context.truth = {c.client_id: c.malicious for c in clients}
    out = probe(torch.stack([r.update for r in results]), torch.full((6,), 6.0), ids)
    info = out.info["probe"]
    assert info["auc"] >= 0.9  # chance is 0.5
    assert info["auc"] == pytest.approx(roc_auc([info["probability"][c] for c in ids], [c.malicious for c in clients]))
    # The separation is large by construction, not by luck of one training run: LoRA B starts at zero and the
    # first AdamW step moves every entry by lr * sign(gradient), so the features are the two data kinds'
    # gradient sign patterns; float noise only flips near-zero gradients. Measured over seeds 0-9 and 1-2
    # threads: malicious p >= 0.95, benign p <= 0.04. A probe that no longer separates fails the margin.
    p = {c.client_id: info["probability"][c.client_id] for c in clients}
    assert min(p[c] for c in ("c3", "c4", "c5")) - max(p[c] for c in ("c0", "c1", "c2")) > 0.5, p
    # flagged clients (p >= 0.8) get weight 0; the rest share the FedAvg weight
    flagged = set(info["flagged"])
    assert flagged == {"c3", "c4", "c5"}, p
    for i, cid in enumerate(ids):
        assert (out.client_weights[i] == 0) == (cid in flagged)
    assert float(out.client_weights.sum()) == pytest.approx(1.0)
    assert info["malicious"] == {c.client_id: c.malicious for c in clients}


def test_shadow_training_is_deterministic_under_a_seed(setup, test_seed):
    trainer, ex = setup
    g = trainer.flat.get()
    feat = lambda r: r.update[None, :].numpy()  # noqa: E731
    X1, y1, _ = _shadow(trainer, ex, seed=test_seed + 3, per_class=1, steps=1).collect(g, RC, feat)
    X2, y2, _ = _shadow(trainer, ex, seed=test_seed + 3, per_class=1, steps=1).collect(g, RC, feat)
    X3, _, _ = _shadow(trainer, ex, seed=test_seed + 4, per_class=1, steps=1).collect(g, RC, feat)
    assert np.array_equal(X1, X2) and np.array_equal(y1, y2) and y1.tolist() == [0, 1]
    assert not np.allclose(X1, X3)  # another seed draws other shadow data
    # decisions never read the truth: the same probe state gives the same weights without it
    s = _shadow(trainer, ex, seed=test_seed + 3, per_class=1, steps=1)
    assert [c.client_id for c, _ in s.shadow_clients(2)] == ["shadow_benign_00", "shadow_malicious_00"]


# ---- weighting modes and composition on synthetic updates (no training) -----------------------------

class _Median(Aggregator):
    """Coordinate-wise median stand-in (the robust suite is built concurrently)."""

    name = "test_median"

    def aggregate(self, updates, num_samples, client_ids):
        return AggregationResult(updates.median(dim=0).values, torch.full((len(client_ids),), 1 / len(client_ids)))


class _Pick(Aggregator):
    """Krum-like stand-in: selects the client with the smallest norm (one-hot weights)."""

    name = "test_pick"

    def aggregate(self, updates, num_samples, client_ids):
        w = torch.zeros(len(client_ids))
        w[int(updates.norm(dim=1).argmin())] = 1.0
        return AggregationResult(w @ updates, w)


@pytest.fixture
def synthetic(tiny, test_seed):
    """A probe fitted on synthetic updates whose first-layer-B slice points one way (benign) or another."""
    model, _ = tiny
    flat = FlatLoRA(attach_lora(model, r=2, alpha=4, seed=test_seed))
    mask = flat.mask("B", [0])
    gen = torch.Generator().manual_seed(test_seed)
    direction = torch.randn(int(mask.sum()), generator=gen)

    def make(labels, scale=1.0):
        u = 0.1 * torch.randn(len(labels), flat.numel, generator=gen)
        for i, lab in enumerate(labels):
            u[i, mask] += (1 if lab else -1) * scale * direction
        return u

    def probe(name="probe", **kw):
        agg = aggregators.get(name, **kw) if "+" not in name else aggregators.get(name, probe=kw)
        assert isinstance(agg, ProbeAggregator)
        agg.fit_updates(make([0] * 8 + [1] * 8), [0] * 8 + [1] * 8, flat=flat)
        return agg

    return make, probe


def test_probability_and_trust_modes_follow_their_formulas(synthetic):
    make, probe = synthetic
    u = make([0, 0, 1, 1], scale=0.3)
    n = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ids = ["a", "b", "c", "d"]
    agg = probe(mode="probability")
    out = agg(u, n, ids)
    p = np.array([out.info["probe"]["probability"][c] for c in ids])
    w = n.numpy() * (1 - p)
    assert torch.allclose(out.client_weights, torch.tensor(w / w.sum(), dtype=torch.float32), atol=1e-6)
    assert torch.allclose(out.update, out.client_weights @ u, atol=1e-5)
    assert out.info["probe"]["combination"] == "reweighted"

    agg = probe(mode="trust", decay=0.5)
    a = b = np.ones(4)
    for _ in range(3):  # Beta trust with forgetting, per client id
        out = agg(u, n, ids)
        p = np.array([out.info["probe"]["probability"][c] for c in ids])
        a, b = 0.5 * a + (1 - p), 0.5 * b + p
        assert np.allclose([out.info["probe"]["weight"][c] for c in ids], a / (a + b))
    assert agg.state_dict()["trust"]["c"] == pytest.approx([a[2], b[2]])


def test_round_is_skipped_below_the_mean_weight(synthetic):
    make, probe = synthetic
    out = probe(skip_below=0.6)(make([1, 1, 0]), torch.ones(3), ["a", "b", "c"])
    assert out.info["probe"]["skipped"] and float(out.update.abs().sum()) == 0 and float(out.client_weights.sum()) == 0


def test_filter_composes_with_other_rules(synthetic):
    make, probe = synthetic
    aggregators.register("test_median", f"{__name__}:_Median")
    aggregators.register("test_pick", f"{__name__}:_Pick")
    u = make([0, 0, 0, 1, 1])
    ids = list("abcde")
    n = torch.ones(5)
    # exclusion: flagged clients are removed before the inner (non-linear) rule
    out = probe("probe+test_median")(u, n, ids)
    flagged = out.info["probe"]["flagged"]
    assert set(flagged) == {"d", "e"}
    assert torch.allclose(out.update, u[:3].median(dim=0).values)
    assert out.client_weights.tolist()[3:] == [0.0, 0.0]
    # soft weights and a non-linear rule: they cannot be combined, so flagged clients are excluded (recorded)
    out = probe("probe+test_median", mode="probability")(u, n, ids)
    assert out.info["probe"]["combination"] == "excluded_flagged"
    assert torch.allclose(out.update, u[:3].median(dim=0).values)
    # soft weights and a selection rule (a weighted mean with one-hot weights): combined multiplicatively
    out = probe("probe+test_pick", mode="probability")(u, n, ids)
    assert out.info["probe"]["combination"] == "reweighted" and float(out.client_weights.sum()) == pytest.approx(1)
    assert torch.allclose(out.update, out.client_weights @ u, atol=1e-5)
    # names and parameters route: the inner rule gets the rest, unknown filters are refused
    agg = aggregators.get("probe+fedavg", weighted=False, probe={"threshold": 0.9})
    assert agg.name == "probe+fedavg" and agg.config.threshold == 0.9 and agg.inner.weighted is False
    with pytest.raises(ConfigError, match="not a filter"):
        aggregators.get("fedavg+probe")
    with pytest.raises(ConfigError, match="threshold"):
        aggregators.get("probe", threshold=2.0)


def test_probe_is_refused_under_secure_aggregation():
    agg = aggregators.get("probe+fedavg")
    assert agg.needs_plaintext and aggregators.get("probe").needs_plaintext
    try:
        from fedsafe.defenses.secure_aggregation.protocol import check_compatible
    except ImportError:  # HE suite not present: the flag above is what it checks
        return
    for name in ("probe", "probe+fedavg", "probe+median"):
        with pytest.raises(ConfigError, match="secure aggregation"):
            check_compatible(name)
    from fedsafe.config import ExperimentConfig

    if "secure_agg" in ExperimentConfig.model_fields:  # and when the experiment config is built
        with pytest.raises(ValueError, match="secure aggregation"):
            ExperimentConfig.model_validate({"aggregator": {"name": "probe"}, "secure_agg": {"enabled": True}})


def test_step_level_reports_are_opt_in(setup):
    trainer, ex = setup
    g = trainer.flat.get()
    client = ClientData("c0", "benign", ex(_rows("benign", 6)))
    assert "step_updates" not in trainer.fit(client, g, RC).extra  # off by default
    mask = trainer.flat.mask("B", [0])
    res = trainer.fit(client, g, RoundConfig(round=1, lr=5e-3, local_steps=2, batch_size=3, step_feature_mask=mask))
    steps = res.extra["step_updates"]
    assert steps.shape == (2, int(mask.sum()))
    assert torch.allclose(steps[-1], res.update[mask])  # the last step's report is the final update


def test_probe_end_to_end_logs_probabilities_roles_and_auc(tmp_path, test_seed):
    """A tiny experiment with planted attackers: each round record carries the probe's view and its AUC."""
    import json

    from fedsafe.config import ExperimentConfig
    from fedsafe.pipeline import run_experiment

    files = {}
    for name, kind, start in (("benign", "benign", 0), ("malicious", "malicious", 0),
                              ("shadow_benign", "benign", 5000), ("shadow_malicious", "malicious", 5000)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in _rows(kind, 24, start)))
    cfg = ExperimentConfig.model_validate({
        "name": "probe", "seed": test_seed, "output_dir": str(tmp_path / "runs"), "model": {"name": "tiny"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"max_length": 64, "samples_per_client": 6},
        "roles": [{"name": "benign", "clients": 3, "data": [{"path": str(files["benign"])}]},
                  {"name": "malicious", "clients": 2, "data": [{"path": str(files["malicious"])}]}],
        "fl": {"rounds": 2, "clients_per_round": 5, "local_steps": 2, "batch_size": 3, "lr": 5e-3,
               "save_every_round": False},
        "aggregator": {"name": "probe+fedavg"},
        "probe": {"benign": [{"path": str(files["shadow_benign"])}],
                  "malicious": [{"path": str(files["shadow_malicious"])}],
                  "benign_shadows": 2, "malicious_shadows": 2, "samples_per_shadow": 6, "refit_every": 2},
        "eval": {"helpfulness_proxy": False},
    })
    res = run_experiment(cfg, progress=False)
    records = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2] and rounds[0]["aggregator"] == "probe+fedavg"
    p1, p2 = (r["aggregator_info"]["probe"] for r in rounds)
    assert "refit" in p1 and "refit" not in p2  # refit_every=2: fitted in round 1, reused in round 2
    assert p1["refit"]["samples"] == 4 and p1["refit"]["shadow_seconds"] > 0
    assert p1["malicious"] == {f"client_0{i}": i >= 3 for i in range(5)}
    assert set(p1["probability"]) == set(p1["malicious"]) and p2["auc_cumulative"] is not None
    assert p1["auc"] >= 0.9, p1["probability"]
    # a margin, not a rank (measured over seeds 0-3: malicious p >= 0.94, benign p <= 0.08)
    prob = p1["probability"]
    assert min(prob["client_03"], prob["client_04"]) - max(prob[f"client_0{i}"] for i in range(3)) > 0.5, prob
    assert sorted(p1["flagged"]) == ["client_03", "client_04"], prob
    for c in (r for r in records if r["type"] == "client" and r["round"] == 1):  # per-client records too
        assert c["probe_probability"] == p1["probability"][c["client_id"]]
    # the logged aggregation weights are the probe's: flagged clients got 0
    for cid, w in zip(rounds[0]["clients"], rounds[0]["client_weights"]):
        assert (w == 0) == (cid in p1["flagged"])


def test_probe_state_round_trips_for_resume(synthetic):
    make, probe = synthetic
    u, n, ids = make([0, 1, 0]), torch.ones(3), ["a", "b", "c"]
    agg = probe(mode="trust")
    agg(u, n, ids)
    fresh = aggregators.get("probe", mode="trust")
    fresh.features = agg.features
    fresh.load_state_dict(agg.state_dict())
    a, b = agg(u, n, ids), fresh(u, n, ids)
    assert torch.equal(a.update, b.update) and a.info["probe"]["weight"] == b.info["probe"]["weight"]


def test_step_level_probe_fits_on_steps_and_scores_reports(setup):
    trainer, ex = setup
    g = trainer.flat.get()
    probe = aggregators.get("probe", level="step")
    rc = probe.prepare(RoundContext(round=1, global_vec=g, round_config=RC,
                                    shadow=_shadow(trainer, ex, per_class=2, steps=2)))
    assert torch.equal(rc.step_feature_mask, trainer.flat.mask("B", [0]))
    assert probe._last_fit["samples"] == 2 * 2 * 2  # shadows x classes x steps
    clients = [ClientData("b", "benign", ex(_rows("benign", 6, 2000))),
               ClientData("m", "malicious", ex(_rows("malicious", 6, 2000)), True)]
    results = [trainer.fit(c, g, rc) for c in clients]
    probe._context.client_extra = {"b": results[0].extra}  # "m" sends no step report
    out = probe(torch.stack([r.update for r in results]), torch.ones(2), ["b", "m"])
    info = out.info["probe"]
    steps_p = probe.predict(probe.features.from_masked(results[0].extra["step_updates"])).mean()
    assert info["probability"]["b"] == pytest.approx(float(steps_p))
    assert info["step_report_missing"] == ["m"]  # scored on its final update instead


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multikrum", "geometric_median"])
def test_flagged_clients_never_reach_the_robust_rule(synthetic, rule):
    make, probe = synthetic
    try:
        inner = aggregators.get(rule)
    except (ConfigError, ImportError, AttributeError) as exc:  # the robust suite is built concurrently
        pytest.skip(f"{rule} not available: {exc}")
    u = make([0, 0, 0, 0, 0, 0, 1, 1])
    ids = [f"c{i}" for i in range(8)]
    n = torch.ones(8)
    out = probe(f"probe+{rule}")(u, n, ids)
    assert set(out.info["probe"]["flagged"]) == {"c6", "c7"}
    expected = inner(u[:6], n[:6], ids[:6])  # the same rule run on the unflagged clients only
    assert torch.allclose(out.update, expected.update, atol=1e-6)
    assert out.client_weights[6:].tolist() == [0.0, 0.0]
    assert torch.allclose(out.client_weights[:6], expected.client_weights.float())


# ---- decision rules without oracle labels (issue 19) ------------------------------------------------

from fedsafe.aggregators.probe_decision import (  # noqa: E402
    BenignFPR, Calibrated, FixedThreshold, RobustZ, TwoGroupGap, platt_fit,
)


def test_fixed_rule_is_the_papers_threshold():
    logits = np.log(np.array([0.1, 0.79, 0.8, 0.95]) / (1 - np.array([0.1, 0.79, 0.8, 0.95])))
    d = FixedThreshold(0.8).decide(logits)
    assert d.flagged.tolist() == [False, False, True, True]
    assert d.threshold_logit == pytest.approx(np.log(4.0))


def test_fpr_rule_is_the_conformal_quantile_of_heldout_benign_scores():
    rule = BenignFPR(0.05)
    info = rule.refit(np.arange(39.0)[::-1], np.array([100.0]))  # m = 39: k = ceil(40 * 0.95) = 38
    assert rule.threshold == 37.0 and info["guaranteed"] and info["fpr_bound"] == pytest.approx(1 - 38 / 40)
    assert rule.decide(np.array([36.9, 37.0, 37.1, 50.0])).flagged.tolist() == [False, False, True, True]
    info = rule.refit(np.array([3.0, 1.0, 2.0]), np.array([]))  # too few scores for 5%: the maximum, bound 1/4
    assert rule.threshold == 3.0 and not info["guaranteed"] and info["fpr_bound"] == pytest.approx(0.25)
    # the guarantee holds on fresh scores from the benign distribution (any scale: it only uses ranks)
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(400):
        rule.refit(7.0 * rng.standard_normal(99) - 3.0, np.array([]))
        rates.append(rule.decide(7.0 * rng.standard_normal(500) - 3.0).flagged.mean())
    assert np.mean(rates) <= 0.05 + 0.01 and np.mean(rates) >= 0.03  # exact rate 1 - 95/100 = 0.05


def test_mad_rule_flags_the_outlier_and_is_scale_free():
    logits = np.array([0.0, 0.1, -0.1, 0.05, -0.05, 2.0])
    d = RobustZ(3.5).decide(logits)
    assert d.flagged.tolist() == [False] * 5 + [True]
    # med = 0.025, MAD = 0.075: z of the last = 0.6745 * 1.975 / 0.075
    assert d.info["z"][5] == pytest.approx(0.6745 * 1.975 / 0.075)
    for a, b in ((100.0, -7.0), (0.01, 3.0)):
        assert RobustZ(3.5).decide(a * logits + b).flagged.tolist() == d.flagged.tolist()
    assert not RobustZ(3.5).decide(np.zeros(5)).flagged.any()  # ties everywhere: nobody
    # MAD = 0 (most scores tie): the mean-absolute-deviation fallback still finds the outlier
    assert RobustZ(3.5).decide(np.array([1.0, 1.0, 1.0, 1.0, 9.0])).flagged.tolist() == [False] * 4 + [True]


def test_gap_rule_splits_off_a_minority_group_only():
    d = TwoGroupGap(0.6).decide(np.array([0.0, 0.2, 0.1, 3.0, 3.1]))
    assert d.flagged.tolist() == [False, False, False, True, True]
    assert d.threshold_logit == pytest.approx(1.6) and d.info["gap_ratio"] == pytest.approx(2.8 / 3.1)
    assert not TwoGroupGap(0.6).decide(np.array([0.0, 0.0, 5.0, 5.0, 5.0])).flagged.any()  # majority: kept
    assert not TwoGroupGap(0.6).decide(np.array([0.0, 1.0, 2.0, 3.0, 4.0])).flagged.any()  # no gap
    assert not TwoGroupGap(0.6).decide(np.array([1.0, 2.0])).flagged.any()


def test_platt_recovers_a_known_logistic_map_and_calibration_is_monotone():
    rng = np.random.default_rng(0)
    s = rng.normal(0, 2, 20000)
    y = rng.random(20000) < 1 / (1 + np.exp(-(2.0 * s - 1.0)))
    a, b = platt_fit(s, y)
    assert a == pytest.approx(2.0, abs=0.1) and b == pytest.approx(-1.0, abs=0.1)
    assert platt_fit(s, ~y)[0] == 0.0  # a backwards ranking is not inverted: a constant
    grid = np.linspace(-20, 20, 2001)
    for method in ("platt", "isotonic"):
        for labels in (y[:200], ~y[:200], rng.random(200) < 0.5):
            cal = Calibrated(0.8, method)
            cal.refit(s[:200][~labels], s[:200][labels])
            p = cal.calibrate(grid)
            assert np.all(np.diff(p) >= -1e-12) and p.min() >= 0 and p.max() <= 1, method
    cal = Calibrated(0.8, "platt")
    cal.refit(np.array([-1.0, -0.9, -1.1, -0.95]), np.array([1.0, 0.9, 1.1, 1.05]))
    thr = cal.threshold_logit()
    assert cal.calibrate(np.array([thr]))[0] == pytest.approx(0.8)
    iso = Calibrated(0.8, "isotonic")
    iso.refit(np.array([-1.0, -0.5]), np.array([0.5, 1.0]))
    assert iso.calibrate(np.array([iso.threshold_logit()]))[0] == pytest.approx(0.8)


def test_decision_rules_catch_planted_attackers_that_the_fixed_threshold_misses(setup, test_seed):
    """A tiny-model run: the probe is fitted on the server's shadows with a strong L2 penalty (C = 1e-3), so
    its probabilities are squeezed towards 0.5 (raw logistic-regression probabilities are not calibrated):
    the fixed 0.8 threshold can never fire. Its ranking is intact, and the rules that do not assume calibrated
    probabilities exclude the planted attackers. The margin is structural: LoRA B starts at zero and the first
    AdamW step moves every entry by lr * sign(gradient), so the two data kinds give two sign patterns (see
    test_probe_separates_planted_malicious_updates); 4 benign + 2 malicious keeps the attackers a minority.
    The shadows' rows are numbered like the clients' (4 digits): the fpr rule assumes the benign clients'
    scores are exchangeable with the benign shadows' (with 1-2-digit shadow rows the clients score ~20% nearer
    0 than the shadows, a shift under which fpr flags the benign clients too)."""
    trainer, ex = setup
    g = trainer.flat.get()
    probe = aggregators.get("probe", decision="calibrated", calibration="isotonic", C=1e-3, holdout=0.5)
    shadow = _shadow(trainer, ex, test_seed, per_class=20, start=3000)
    rc = probe.prepare(RoundContext(round=1, global_vec=g, round_config=RC, shadow=shadow))
    cal = probe._last_fit["calibration"]
    assert probe._last_fit["samples"] == 20 and cal["heldout"] == 20 and cal["heldout_auc"] == 1.0
    clients = [ClientData(f"c{i}", "malicious" if i >= 4 else "benign",
                          ex(_rows("malicious" if i >= 4 else "benign", 6, 1000 + 10 * i)), i >= 4) for i in range(6)]
    updates = torch.stack([trainer.fit(c, g, rc).update for c in clients])
    ids = [c.client_id for c in clients]
    out = probe(updates, torch.full((6,), 6.0), ids)
    info = out.info["probe"]
    p = info["probability"]
    assert max(p.values()) < 0.6 and info["decisions"]["fixed"] == [], p  # the fixed threshold misses them
    assert min(p["c4"], p["c5"]) > max(p[f"c{i}"] for i in range(4)), p  # ... though the ranking is right
    assert set(info["flagged"]) == {"c4", "c5"}, info  # calibrated (isotonic), the acting rule
    assert out.client_weights[4:].tolist() == [0.0, 0.0] and float(out.client_weights.sum()) == pytest.approx(1)
    assert set(info["decisions"]["mad"]) == {"c4", "c5"} and set(info["decisions"]["gap"]) == {"c4", "c5"}
    assert {"c4", "c5"} <= set(info["decisions"]["fpr"]), info
    assert info["decision"] == "calibrated" and info["threshold_logit"] is not None
    assert min(info["logit"]["c4"], info["logit"]["c5"]) >= info["threshold_logit"]
    # each rule acting on its own (the fitted state carried over) excludes the attackers
    for rule in ("fpr", "mad", "gap", "calibrated"):
        other = aggregators.get("probe", decision=rule, C=1e-3, holdout=0.5)
        other.features = probe.features
        other.load_state_dict(probe.state_dict())
        if rule == "calibrated":  # Platt: its threshold logit comes from the same held-out shadows
            other.calibrate(np.concatenate([h[0] for h in probe.calibration_history]),
                            np.concatenate([h[1] for h in probe.calibration_history]))
        res = other(updates, torch.full((6,), 6.0), ids)
        assert {"c4", "c5"} <= set(res.info["probe"]["flagged"]), (rule, res.info["probe"])
        assert res.client_weights[4:].tolist() == [0.0, 0.0], rule
        if rule != "fpr":  # scale-free / calibrated rules keep every benign client here
            assert res.client_weights[:4].min() > 0, rule
    # fpr keeps the benign clients only as far as they score like the benign shadows; here the tiny model's
    # sign-pattern features make every benign update nearly identical (logits tie to ~1%), so a small
    # systematic shift between the clients' rows and the shadows' rows decides it: not asserted
    # the default (fixed) probe on the same scores changes nothing: FedAvg
    fixed = aggregators.get("probe", C=1e-3, holdout=0.5)
    fixed.features = probe.features
    fixed.load_state_dict(probe.state_dict())
    assert fixed(updates, torch.full((6,), 6.0), ids).info["probe"]["flagged"] == []


def test_rules_that_set_thresholds_on_shadows_need_held_out_shadows(setup):
    with pytest.raises(ConfigError, match="probe.holdout"):
        aggregators.get("probe", decision="fpr", holdout=0.0)
    trainer, ex = setup
    probe = aggregators.get("probe", decision="fpr")
    with pytest.raises(ConfigError, match="at least 2 shadows"):
        probe.prepare(RoundContext(round=1, global_vec=trainer.flat.get(), round_config=RC,
                                   shadow=_shadow(trainer, ex, per_class=1, steps=1)))
    with pytest.raises(ConfigError, match="decision"):
        aggregators.get("probe", decision="oracle")


def test_shadow_realism_options(setup, tmp_path, monkeypatch):
    """match_clients copies the clients' training budget, malicious_per_source gives each malicious shadow one
    source, and a ``generate: {model: global}`` source is regenerated from the current global adapter."""
    import json

    from fedsafe.data import datagen
    from fedsafe.config import ExperimentConfig
    from fedsafe.defenses.safe_fedllm_probe.shadow import build_shadow
    from fedsafe.errors import DataError

    trainer, ex = setup
    files = {}
    for name, kind, start in (("benign", "benign", 0), ("mal_a", "malicious", 0), ("mal_b", "malicious", 500)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in _rows(kind, 12, start)))
    probe = {"benign": [{"path": str(files["benign"])}],
             "malicious": [{"path": str(files["mal_a"])}, {"path": str(files["mal_b"])},
                           {"generate": {"kind": "unaligned", "n": 3, "model": "global",
                                         "instructions": ["placeholder request"]}}],
             "benign_shadows": 2, "malicious_shadows": 3, "malicious_per_source": True, "match_clients": True}
    base = {"model": {"name": "tiny"}, "data": {"max_length": 64, "samples_per_client": 5},
            "roles": [{"name": "benign", "clients": 2, "data": [{"path": str(files["benign"])}]}],
            "fl": {"local_steps": 3}, "aggregator": {"name": "probe"}}
    cfg = ExperimentConfig.model_validate({**base, "probe": probe})
    calls = []

    def fake_generate_rows(model_name, kind, n, loaded=None, **extra):
        calls.append((model_name, trainer.flat.get().clone()))
        if len(calls) == 2:
            raise DataError("the model produced no non-empty unaligned response")
        return [{"instruction": f"placeholder generated request {i}", "response": f"GGG {len(calls)} {i}"}
                for i in range(n)]

    monkeypatch.setattr(datagen, "generate_rows", fake_generate_rows)
    cache = {"model": trainer.model, "tokenizer": trainer.tokenizer, "name": "tiny"}
    shadow = build_shadow(cfg.probe, trainer, cache, data=cfg.data, seed=cfg.seed)
    assert shadow.samples_per_shadow == 5 and shadow.steps is None  # the clients' budget, steps from the round
    assert list(shadow.refreshers) == [2] and shadow.sources[2] == [] and not calls  # nothing generated yet
    g1 = torch.randn(trainer.flat.numel) * 1e-3
    shadow.refresh(g1, 1)
    assert calls[0][0] == "aggregated" and torch.equal(calls[0][1], g1)  # generated by the current global model
    assert len(shadow.sources[2]) == 3 and shadow.refresh_info["generated_rows"] == {"2": 3}
    first = shadow.sources[2]
    shadow.refresh(g1 * 2, 3)  # the generator fails: the source keeps its last rows
    assert shadow.sources[2] is first and len(calls) == 2
    mal = [c for c, label in shadow.shadow_clients(1) if label == 1]
    for j, client in enumerate(mal):  # one source per malicious shadow, round robin
        assert {id(e) for e in client.examples} <= {id(e) for e in shadow.sources[j]}
    with pytest.raises(ConfigError, match="match_clients"):
        bad = ExperimentConfig.model_validate({**base, "probe": {**probe, "steps": 2}})
        build_shadow(bad.probe, trainer, cache, data=bad.data, seed=bad.seed)


@pytest.mark.parametrize("decision", ["fpr", "calibrated"])
def test_held_out_thresholds_round_trip_for_resume(synthetic, decision):
    make, probe = synthetic
    agg = probe(decision=decision)
    labels = [0] * 4 + [1] * 4
    info = agg.calibrate_updates(make(labels), labels)
    assert info["heldout"] == 8 and info["rule"]
    u, n, ids = make([0, 1, 0], scale=0.5), torch.ones(3), ["a", "b", "c"]
    fresh = aggregators.get("probe", decision=decision)
    fresh.features = agg.features
    fresh.load_state_dict(agg.state_dict())
    a, b = agg(u, n, ids).info["probe"], fresh(u, n, ids).info["probe"]
    assert a["threshold_logit"] == b["threshold_logit"] and a["flagged"] == b["flagged"] and a["decision"] == decision
    with pytest.raises(RuntimeError, match="held-out"):  # no held-out scores yet: no silent default threshold
        probe(decision=decision)(u, n, ids)


class _SimStepShadow:
    """Shadow stand-in with simulated step reports: each shadow client's steps share one trajectory offset
    (the reason per-step rows are not exchangeable with per-client scores), plus small per-step noise."""

    def __init__(self, flat, draw, benign, malicious, rng):
        self.flat, self.draw, self.counts, self.rng = flat, draw, (benign, malicious), rng

    def collect(self, global_vec, rc, featurize):
        rows, labels = [], []
        for label, count in enumerate(self.counts):
            for _ in range(count):
                x = featurize(SimpleNamespace(extra={"step_updates": self.draw(label, self.rng)}, update=None))
                rows.append(x)
                labels.extend([label] * len(x))
        return np.concatenate(rows), np.asarray(labels), {}


def test_step_level_fpr_bound_holds_for_benign_clients(tiny, test_seed):
    """probe.level=step, decision=fpr: the held-out shadows are scored with the clients' own statistic (the
    logit of the steps' mean probability, one score per shadow client), so the conformal bound (Vovk et al.
    2005; Angelopoulos & Bates 2021) holds for fresh benign clients drawn like the benign shadows: mean FPR
    <= mean logged bound, within Monte Carlo error. 8 benign shadows, holdout 0.5: 4 held-out benign shadow
    clients, bound 1/(4+1) = 0.2 (too few for 5%, so not 'guaranteed'). Calibrating on their 4 x 10 step
    rows instead logged guaranteed=True, fpr_bound=0.049 while the benign FPR was ~0.2-0.28 (issue 28)."""
    model, _ = tiny
    flat = FlatLoRA(attach_lora(model, r=2, alpha=4, seed=test_seed))
    k = int(flat.mask("B", [0]).sum())
    direction = torch.nn.functional.normalize(torch.randn(k, generator=torch.Generator().manual_seed(1)), dim=0)
    base = torch.randn(k, generator=torch.Generator().manual_seed(2))
    steps = 10

    def draw(label, rng):
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        offset = 2.0 * torch.randn(k, generator=g)  # the client's trajectory: shared by all its steps
        noise = 0.3 * torch.randn(steps, k, generator=g)
        return base + (6.0 if label else 0.0) * direction + offset + noise

    rng = np.random.default_rng(test_seed)
    rates, bounds, guaranteed = [], [], []
    for rep in range(150):
        probe = aggregators.get("probe", level="step", decision="fpr", fpr=0.05, holdout=0.5, seed=rep)
        probe.bind(flat)
        probe.prepare(RoundContext(round=rep + 1, global_vec=None, round_config=RC,
                                   shadow=_SimStepShadow(flat, draw, 8, 8, rng)))
        ids = [f"b{i}" for i in range(40)]
        probe._context.client_extra = {cid: {"step_updates": draw(0, rng)} for cid in ids}
        info = probe(torch.zeros(len(ids), flat.numel), torch.ones(len(ids)), ids).info["probe"]
        assert "step_report_missing" not in info
        rates.append(len(info["flagged"]) / len(ids))
        bounds.append(info["decision_info"]["fpr_bound"])
        guaranteed.append(info["decision_info"]["guaranteed"])
    se = np.std(rates, ddof=1) / np.sqrt(len(rates))
    assert np.mean(rates) <= np.mean(bounds) + 3 * se, (np.mean(rates), np.mean(bounds), se)
    assert probe._last_fit["calibration"]["heldout"] == 8  # 4 + 4 held-out shadow clients, not 80 step rows
    assert probe._last_fit["calibration"]["heldout_rows"] == 80
    assert not any(guaranteed) and np.allclose(bounds, 0.2)  # m = 4 < 1/alpha - 1: only 1/(m+1) is promised
    assert np.mean(rates) >= 0.1  # the bound is tight here (continuous scores: exactly 1/(m+1) in expectation)
