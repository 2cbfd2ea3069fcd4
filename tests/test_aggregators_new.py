"""FLAME, LASA, FLTrust, centered clipping and nearest-neighbour mixing against line-by-line ports of their
papers' algorithms (and the authors' code where it decides a detail), on identical inputs, with an edge case
each; the wrapper mechanism (``<step>+<rule>``), round-size refusals and state across a resume."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedsafe import aggregators
from fedsafe.aggregators.base import RoundContext
from fedsafe.errors import ConfigError


def _ids(n):
    return [f"c{i:02d}" for i in range(n)]


def _run(rule, x):
    return rule(x, torch.ones(x.shape[0]), _ids(x.shape[0]))


def _close(a, b, rtol=1e-5, atol=1e-7):
    a = np.asarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(a - b).max() <= rtol * scale + atol, f"max |diff| {np.abs(a - b).max():.3g}"


def _clients(seed, n=9, d=400, attackers=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * 0.1 + torch.randn(d, generator=gen) * 0.05
    x[:attackers] = -2.0 * x[attackers:].mean(0) + 0.01 * torch.randn(attackers, d, generator=gen)
    return x


# --- nearest-neighbour mixing (Allouah et al., AISTATS 2023, Algorithm 1) -----------------------------

def nnm_port(x: np.ndarray, f: int) -> np.ndarray:
    """Each vector -> mean of its n - f nearest (itself first; equal distances: lower index)."""
    n = len(x)
    out = np.empty_like(x)
    for i in range(n):
        dist = np.array([np.sum((x[i] - x[j]) ** 2) for j in range(n)])
        dist[i] = -1.0
        order = np.argsort(dist, kind="stable")[: n - f]
        out[i] = x[order].mean(axis=0)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_nnm_matches_the_paper_and_maps_weights_back(seed):
    x = _clients(seed)
    ref = nnm_port(x.double().numpy(), f=3)
    for inner, params in (("median", {"nnm": {"f": 3}}), ("krum", {"f": 3}), ("fedavg", {"nnm": {"f": 3}})):
        rule = aggregators.get(f"nnm+{inner}", **params)
        assert rule.name == f"nnm+{inner}" and rule.f == 3  # nnm+krum shares krum's f
        res = _run(rule, x)
        expected = _run(aggregators.get(inner, **{k: v for k, v in params.items() if k != "nnm"}),
                        torch.from_numpy(ref).float())
        _close(res.update, expected.update.numpy())
        if inner != "median":  # a weighted mean of the mixed updates is one of the received ones: w M
            _close(res.client_weights @ x, res.update.numpy())
        assert float(res.client_weights.sum()) == pytest.approx(1.0, abs=1e-5)
        assert res.info["nnm"] == {"f": 3, "neighbours": 6}


@pytest.mark.filterwarnings("ignore:.*at least half:RuntimeWarning")
def test_nnm_ties_and_duplicates():
    # x0 = 0 has x1 = 1 and x2 = -1 at the same distance: with n - f = 2 neighbours the lower index wins;
    # x3 duplicates x0 and cannot push x0 out of its own neighbourhood
    x = torch.tensor([[0.0], [1.0], [-1.0], [0.0], [5.0]])
    ref = nnm_port(x.double().numpy(), f=3)
    res = _run(aggregators.get("nnm+fedavg", nnm={"f": 3}, weighted=False), x)
    mixed = aggregators.get("nnm", f=3).pre(x, torch.ones(5), _ids(5))[0]
    _close(mixed, ref)
    assert mixed[0].item() == 0.0 and mixed[1].item() == 0.5  # x1's nearest other: x0 (tied with x3, lower index)
    _close(res.update, ref.mean(axis=0))


def test_nnm_refuses_rounds_below_f_plus_one_at_load_and_at_run():
    assert aggregators.min_clients("nnm+median", {"nnm": {"f": 3}}) == 4
    assert aggregators.min_clients("nnm+krum", {"f": 2}) == 7  # krum's n > 2f + 2 dominates
    with pytest.raises(ConfigError, match=r"^aggregator\.params\.nnm\.f=3: nnm mixes .* got fl\.clients_per_round=3"):
        aggregators.check_feasible("nnm+median", {"nnm": {"f": 3}}, 3, got="fl.clients_per_round=3")
    with pytest.raises(ConfigError, match=r"aggregator\.params\.nnm\.f=3"):
        _run(aggregators.get("nnm+median", nnm={"f": 3}), torch.randn(3, 5))
    with pytest.raises(ConfigError, match="nnm needs f"):
        aggregators.get("nnm+median")
    with pytest.raises(ConfigError, match="nnm needs f"):
        aggregators.check_feasible("nnm+median", {}, 10)


# --- the wrapper mechanism -------------------------------------------------------------------------

def test_norm_clip_spellings_agree_and_steps_chain():
    x = _clients(0) * 30
    old = _run(aggregators.get("norm_clip", max_norm=1.0, aggregator="krum", params={"f": 2}), x)
    new = _run(aggregators.get("norm_clip+krum", f=2, norm_clip={"max_norm": 1.0}), x)
    assert torch.equal(old.update, new.update) and torch.equal(old.client_weights, new.client_weights)
    assert old.info["clipped"] == new.info["clipped"]
    assert aggregators.get("norm_clip", max_norm=1.0).name == "norm_clip"  # round records keep the old name
    chained = aggregators.get("nnm+norm_clip+median", nnm={"f": 2}, norm_clip={"max_norm": 1.0})
    assert chained.name == "nnm+norm_clip+median"
    mixed = torch.from_numpy(nnm_port(x.double().numpy(), 2)).float()
    _close(_run(chained, x).update, _run(aggregators.get("norm_clip+median", norm_clip={"max_norm": 1.0}),
                                         mixed).update.numpy())
    with pytest.raises(ConfigError, match="not a filter"):
        aggregators.get("median+nnm")


def test_wrapper_forwards_state_and_prepare_to_the_inner_rule():
    x = _clients(1)
    first = aggregators.get("nnm+centered_clipping", nnm={"f": 2}, tau=0.5)
    _run(first, x)
    resumed = aggregators.get("nnm+centered_clipping", nnm={"f": 2}, tau=0.5)
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(_run(first, x * 0.5).update, _run(resumed, x * 0.5).update)
    lasa = aggregators.get("nnm+lasa", nnm={"f": 2})
    layout = _layout([100, 300])
    lasa.prepare(RoundContext(round=1, global_vec=torch.zeros(400), flat=layout))
    assert lasa.inner.spans == [(0, 100), (100, 400)]


# --- centered clipping (Karimireddy, He, Jaggi, ICML 2021) -----------------------------------------

class CenteredClippingPort:
    """The paper's iteration v <- v + mean_i clip_tau(x_i - v), L times, centre kept across calls."""

    def __init__(self, tau, iterations):
        self.tau, self.iterations, self.v = tau, iterations, None

    def __call__(self, xs):
        if self.v is None:
            self.v = np.zeros_like(xs[0])
        for _ in range(self.iterations):
            clipped = []
            for x in xs:
                z = x - self.v
                norm = np.linalg.norm(z)
                clipped.append(z * min(1.0, self.tau / norm if norm > 0 else math.inf))
            self.v = self.v + sum(clipped) / len(xs)
        return self.v.copy()


@pytest.mark.parametrize("iterations", [1, 3])
def test_centered_clipping_matches_the_paper_over_rounds_and_resumes(iterations):
    rule = aggregators.get("centered_clipping", tau=0.8, iterations=iterations)
    port = CenteredClippingPort(0.8, iterations)
    state = None
    for round_no in range(4):
        x = _clients(10 + round_no)
        x[0] = x[0] * 50  # far outside tau: clipped
        if round_no == 2:
            x[1] = rule.centre.clone()  # exactly at the centre: distance 0 enters unclipped (tau / 0 = inf)
        before = None if rule.centre is None else rule.centre.clone()
        res = _run(rule, x)
        _close(res.update, port(x.double().numpy()))
        centre = torch.zeros(400) if before is None else before
        # the aggregate is the affine combination c_0 v_0 + sum_i c_i x_i that client_weights report
        _close(res.client_weights @ x + res.info["centre_weight"] * centre, res.update.numpy())
        assert res.info["clipped"][0]
        if round_no == 1:
            state = rule.state_dict()
    resumed = aggregators.get("centered_clipping", tau=0.8, iterations=iterations)
    resumed.load_state_dict(state)  # the centre after round 2, as a checkpoint holds it
    port2 = CenteredClippingPort(0.8, iterations)
    port2.v = state["centre"].double().numpy()
    x = _clients(99)
    _close(_run(resumed, x).update, port2(x.double().numpy()))


def test_centered_clipping_state_survives_a_server_checkpoint():
    from fedsafe.config import FLConfig
    from fedsafe.fl.client import ClientResult
    from fedsafe.fl.server import Server

    def results(seed):
        x = _clients(seed, n=5, d=6)
        return [ClientResult(f"c{i}", x[i], 10) for i in range(5)]

    server = Server(FLConfig(), torch.zeros(6), aggregators.get("centered_clipping", tau=0.1))
    server.aggregate(results(1))
    copy = Server(FLConfig(), torch.zeros(6), aggregators.get("centered_clipping", tau=0.1))
    copy.load_state_dict(server.state_dict())
    assert torch.equal(copy.aggregator.centre, server.aggregator.centre)
    server.aggregate(results(2))
    copy.aggregate(results(2))
    assert torch.equal(copy.global_vec, server.global_vec)
    fresh = Server(FLConfig(), torch.zeros(6), aggregators.get("centered_clipping", tau=0.1))
    fresh.aggregate(results(2))
    assert not torch.equal(fresh.global_vec, server.global_vec)  # the centre matters: state that must be kept


def test_centered_clipping_parameters_are_checked():
    with pytest.raises(ConfigError, match="tau must be > 0"):
        aggregators.get("centered_clipping", tau=0)
    with pytest.raises(ConfigError, match="iterations"):
        aggregators.get("centered_clipping", tau=1.0, iterations=0)


# --- FLAME (Nguyen et al., USENIX Security 2022, Algorithm 1) ---------------------------------------

def flame_port(x: np.ndarray):
    """Algorithm 1 without the noise: HDBSCAN on cosine distances, median-norm clipping, plain mean."""
    from sklearn.cluster import HDBSCAN
    from sklearn.metrics.pairwise import cosine_distances

    n = len(x)
    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed", allow_single_cluster=True,
                     copy=True).fit(cosine_distances(x)).labels_
    if labels.max() < 0:
        admitted = list(range(n))
    else:
        sizes = {c: int((labels == c).sum()) for c in range(labels.max() + 1)}
        best = max(sizes, key=lambda c: (sizes[c], -c))
        admitted = [i for i in range(n) if labels[i] == best]
    norms = [np.linalg.norm(v) for v in x]
    s = np.median(norms)
    clipped = [x[i] * min(1.0, s / norms[i]) for i in admitted]
    return sum(clipped) / len(admitted), labels, admitted, s


@pytest.mark.parametrize("seed", range(4))
def test_flame_matches_the_paper(seed):
    x = _clients(20 + seed, n=11, attackers=4)
    x[5] *= 4  # a benign update with a large norm: admitted, clipped to the median norm
    ref, labels, admitted, s = flame_port(x.double().numpy())
    res = _run(aggregators.get("flame", noise=0.0), x)
    assert res.info["labels"] == labels.tolist() and res.info["admitted"] == admitted
    assert not set(admitted) & {0, 1, 2, 3}  # the attackers' cluster is the minority
    _close(res.update, ref)
    _close(res.client_weights @ x, res.update.numpy())
    assert res.info["median_norm"] == pytest.approx(s, rel=1e-6)


def test_flame_noise_is_lambda_times_the_median_norm_and_reproducible():
    x = _clients(30, n=7, d=20000, attackers=2)
    quiet = _run(aggregators.get("flame", noise=0.0), x)
    rule = aggregators.get("flame", noise=0.01, seed=3)
    first = _run(rule, x)
    sigma = 0.01 * first.info["median_norm"]
    assert first.info["noise_std"] == pytest.approx(sigma)
    assert float((first.update - quiet.update).std()) == pytest.approx(sigma, rel=0.03)
    state = rule.state_dict()
    second = _run(rule, x)
    assert not torch.equal(first.update, second.update)  # fresh noise every round
    resumed = aggregators.get("flame", noise=0.01, seed=3)
    resumed.load_state_dict(state)
    assert torch.equal(_run(resumed, x).update, second.update)  # a resumed run draws the same noise


def test_flame_all_noise_admits_everyone(monkeypatch):
    from fedsafe.aggregators import flame

    x = _clients(31, n=6, attackers=2)
    monkeypatch.setattr(flame, "hdbscan_labels", lambda dist, mcs, ms: -np.ones(len(dist), dtype=int))
    res = _run(aggregators.get("flame", noise=0.0), x)
    assert res.info["all_noise"] and res.info["admitted"] == list(range(6))
    norms = x.double().norm(dim=1)
    s = float(np.median(norms.numpy()))
    _close(res.update, (x.double() * (s / norms).clamp(max=1)[:, None]).mean(0).numpy())
    assert flame.admitted_from_labels(np.array([1, 0, 0, 1, -1])).tolist() == [1, 2]  # tie: the lower label
    assert _run(aggregators.get("flame"), x[:1]).info["admitted"] == [0]  # one client: no clustering


# --- FLTrust (Cao et al., NDSS 2021) ----------------------------------------------------------------

def fltrust_port(x: np.ndarray, g0: np.ndarray) -> np.ndarray:
    ts = []
    for g in x:
        denom = np.linalg.norm(g) * np.linalg.norm(g0)
        ts.append(max(0.0, float(g @ g0) / denom) if denom > 0 else 0.0)
    if sum(ts) == 0:
        return np.zeros_like(g0)
    return sum(t * np.linalg.norm(g0) / np.linalg.norm(g) * g for t, g in zip(ts, x) if t > 0) / sum(ts)


def test_fltrust_matches_the_paper_and_its_edge_cases():
    x = _clients(40)
    x[4] = 0.0  # a zero client update: trust 0
    g0 = x[5:].mean(0) + 0.01
    rule = aggregators.get("fltrust")
    rule.server_update = g0
    res = _run(rule, x)
    _close(res.update, fltrust_port(x.double().numpy(), g0.double().numpy()))
    _close(res.client_weights @ x, res.update.numpy())
    assert res.client_weights[:3].abs().max() == 0 and res.client_weights[4] == 0  # attackers point away
    assert res.update.norm().item() <= g0.norm().item() * (1 + 1e-5)  # a convex combination of norm-||g0|| vectors
    rule.server_update = torch.zeros(400)  # a zero server update: no trust anywhere, the zero update
    zero = _run(rule, x)
    assert zero.info["all_zero_trust"] and torch.equal(zero.update, torch.zeros(400))
    assert torch.equal(zero.client_weights, torch.zeros(9))
    rule.server_update = -x[5:].sum(0)  # now the benign cosines are negative (ReLU: trust 0), the attackers' not
    _close(_run(rule, x).update, fltrust_port(x.double().numpy(), rule.server_update.double().numpy()))


def test_fltrust_takes_its_server_update_from_the_root_trainer_each_round():
    rule = aggregators.get("fltrust")
    with pytest.raises(ConfigError, match="fltrust.root"):
        _run(rule, torch.randn(3, 4))
    calls = []

    def root_update(global_vec, rc):
        calls.append(rc)
        return torch.ones(4) * (len(calls))

    rule.root_update = root_update
    assert rule.prepare(RoundContext(round=1, global_vec=torch.zeros(4), round_config="rc1")) == "rc1"
    assert torch.equal(rule.server_update, torch.ones(4)) and calls == ["rc1"]
    wrapped = aggregators.get("nnm+fltrust", nnm={"f": 1})
    wrapped.inner.root_update = root_update
    wrapped.prepare(RoundContext(round=2, global_vec=torch.zeros(4), round_config="rc2"))
    assert torch.equal(wrapped.inner.server_update, torch.full((4,), 2.0))


# --- LASA (Xu et al., WACV 2025; the authors' JiiahaoXU/LASA) ----------------------------------------

def _layout(sizes):
    specs, offset = [], 0
    for size in sizes:
        specs.append(SimpleNamespace(offset=offset, numel=size))
        offset += size
    return SimpleNamespace(specs=specs)


def lasa_port(x: np.ndarray, sizes, sparsity=0.3, lambda_n=1.0, lambda_s=1.0):
    """Algorithm of the paper with the authors' choices: torch's lower median for the clipping norm, a global
    top-k mask with '>', per-layer MZ-scores with np.median / np.std, all clients when none passes."""
    n, d = x.shape
    norms = np.linalg.norm(x, axis=1)
    clip = np.sort(norms)[(n - 1) // 2]
    x = np.stack([v / nv * min(nv, clip) for v, nv in zip(x, norms)])
    k = int(d * (1 - sparsity))
    for i in range(n):
        threshold = np.sort(np.abs(x[i]))[::-1][k - 1]
        x[i] = x[i] * (np.abs(x[i]) > threshold)
    out, start = [], 0
    for size in sizes:
        layer = x[:, start:start + size]
        start += size
        mags = np.linalg.norm(layer, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            mz_n = np.abs((mags - np.median(mags)) / np.std(mags))
        keep_n = {i for i in range(n) if mz_n[i] < lambda_n}
        purity = np.array([0.5 * (1 + np.sign(v).sum() / np.abs(np.sign(v)).sum()) for v in layer])
        with np.errstate(divide="ignore", invalid="ignore"):
            mz_s = np.abs((purity - np.median(purity)) / np.std(purity))
        keep_s = {i for i in range(n) if mz_s[i] < lambda_s}
        benign = sorted(keep_n & keep_s) or list(range(n))
        out.append(layer[benign].mean(axis=0))
    return np.concatenate(out)


@pytest.mark.parametrize("seed", range(3))
def test_lasa_matches_the_authors_algorithm(seed):
    sizes = [64, 160, 96, 80]
    x = _clients(50 + seed, n=10, d=sum(sizes), attackers=3)
    x[7, 64:224] *= 6  # one benign client with one outsized layer
    rule = aggregators.get("lasa").bind(_layout(sizes))
    res = _run(rule, x)
    _close(res.update, lasa_port(x.double().numpy(), sizes))
    assert res.info["layers"] == 4
    assert float(res.client_weights.sum()) == pytest.approx(1.0, abs=1e-5)


def test_lasa_edge_cases_equal_norms_and_ties_at_the_threshold():
    # every client the same magnitudes (std 0: all MZ-scores NaN) -> the layer admits everyone;
    # |values| tied at the k-th largest are dropped (the authors' strict '>')
    x = torch.tensor([[1.0, -1.0, 2.0, 2.0, -0.5], [-1.0, 1.0, 2.0, -2.0, 0.5], [1.0, 1.0, -2.0, 2.0, 0.5]])
    rule = aggregators.get("lasa", sparsity=0.4).bind(_layout([5]))
    res = _run(rule, x)
    _close(res.update, lasa_port(x.double().numpy(), [5], sparsity=0.4))
    assert res.info["admitted_per_layer"] == [3]
    from fedsafe.aggregators.lasa import sparsify_topk

    k_kept = (sparsify_topk(x, 0.4) != 0).sum(dim=1)
    assert k_kept.tolist() == [2, 2, 2]  # k = 3, but the third-largest |value| 1.0 is tied and dropped
    # no layout: the whole vector is one layer (and prepare binds the server's layout)
    plain = _run(aggregators.get("lasa"), _clients(60))
    assert plain.info["layers"] == 1


# --- config load and the registry ------------------------------------------------------------------

def test_new_rules_are_registered_and_refused_at_config_load():
    assert {"flame", "lasa", "fltrust", "centered_clipping", "nnm"} <= set(aggregators.available())
    for name in ("flame", "lasa", "fltrust"):
        assert aggregators.min_clients(name, {}) == 1
    assert aggregators.min_clients("centered_clipping", {"tau": 1.0}) == 1
    from fedsafe.config import ExperimentConfig

    base = {"roles": [{"name": "benign", "clients": 4, "data": [{"path": "starter:train"}]}],
            "fl": {"clients_per_round": 4}}
    with pytest.raises(Exception, match=r"aggregator\.params\.nnm\.f=4"):
        ExperimentConfig.model_validate({**base, "aggregator": {"name": "nnm+median", "params": {"nnm": {"f": 4}}}})
    with pytest.raises(Exception, match=r"aggregator\.params\.f=2: krum"):
        ExperimentConfig.model_validate({**base, "aggregator": {"name": "nnm+krum", "params": {"f": 2}}})


def test_centered_clipping_and_nnm_allocate_on_the_device_of_their_input():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 300, generator=gen)
    for name, params in (("centered_clipping", {"tau": 1.0}), ("nnm+median", {"nnm": {"f": 2}})):
        ref = _run(aggregators.get(name, **params), x)
        previous = torch.get_default_device()
        torch.set_default_device("meta")
        try:
            got = _run(aggregators.get(name, **params), x)
        finally:
            torch.set_default_device(previous)
        assert got.update.device.type == "cpu" and torch.equal(got.update, ref.update)


# --- FLTrust's root data in a run (the plug-in that trains the server update) -------------------------

@pytest.fixture
def fltrust_plugin():
    import fedsafe.plugins as plugins
    from fedsafe.aggregators.fltrust_root import FLTrustRoot

    added = FLTrustRoot.name not in plugins._REGISTRY
    if added:  # until the built-in registry lists it
        plugins.register(FLTrustRoot)
    yield FLTrustRoot
    if added:
        plugins._REGISTRY.pop(FLTrustRoot.name, None)


def test_fltrust_needs_root_data_at_config_load(fltrust_plugin):
    from fedsafe.config import load_config

    with pytest.raises(ConfigError, match=r"fltrust\.root"):
        load_config(None, ["aggregator.name=fltrust"])
    cfg = load_config(None, ["aggregator.name=nnm+fltrust", "aggregator.params={nnm: {f: 1}}",
                             "posthoc.enabled=true", "posthoc.aligned=[{path: 'starter:train', categories: [aligned]}]",
                             "posthoc.normal=[{path: 'starter:train', categories: [normal]}]"])
    assert cfg.aggregator.name == "nnm+fltrust"  # the post-hoc data is the default root set


def test_fltrust_trains_the_server_update_on_the_root_data_each_round(fltrust_plugin, tmp_path):
    import json
    from pathlib import Path

    from fedsafe.config import load_config
    from fedsafe.pipeline import run_experiment

    cfg = load_config(None, ["model.name=tiny", f"output_dir={tmp_path}", "name=fltrust", "fl.rounds=2",
                             "fl.local_steps=2", "fl.batch_size=2", "data.samples_per_client=4", "data.max_length=96",
                             "roles.0.clients=3", "fl.clients_per_round=3", "fl.lr=0.01",
                             "eval.helpfulness_proxy=false", "eval.normal_prompts=null", "aggregator.name=fltrust",
                             "fltrust.root=[{path: 'starter:train', categories: [normal]}]", "fltrust.samples=6"])
    run = run_experiment(cfg, progress=False)
    rounds = [json.loads(x) for x in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["type"] == "round"]
    assert len(rounds) == 2
    norms = [r["aggregator_info"]["server_update_norm"] for r in rounds]
    assert all(v > 0 for v in norms) and norms[0] != norms[1]  # trained anew from each round's global adapter
    for r in rounds:  # the logged trust scores give the logged weights: TS_i ||g0|| / (||g_i|| sum TS)
        info = r["aggregator_info"]
        trust, g_norms = np.array(info["trust"]), np.array(r["update_norms"])
        expected = trust * info["server_update_norm"] / g_norms / trust.sum()
        np.testing.assert_allclose(r["client_weights"], expected, rtol=1e-4)


def test_lasa_filters_per_lora_tensor_in_a_run(tmp_path):
    import json
    from pathlib import Path

    from fedsafe.config import load_config
    from fedsafe.pipeline import run_experiment

    cfg = load_config(None, ["model.name=tiny", f"output_dir={tmp_path}", "name=lasa", "fl.rounds=1",
                             "fl.local_steps=2", "fl.batch_size=2", "data.samples_per_client=4", "data.max_length=96",
                             "roles.0.clients=3", "fl.clients_per_round=3", "fl.lr=0.01",
                             "eval.helpfulness_proxy=false", "eval.normal_prompts=null", "aggregator.name=nnm+lasa",
                             "aggregator.params={nnm: {f: 1}}"])
    run = run_experiment(cfg, progress=False)
    record = next(json.loads(x) for x in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines()
                  if json.loads(x)["type"] == "round")
    from safetensors.torch import load_file

    tensors = load_file(str(Path(run.run_dir) / "adapters" / "final" / "adapter_model.safetensors"))
    assert record["aggregator"] == "nnm+lasa"
    assert record["aggregator_info"]["layers"] == len(tensors) > 1  # one layer per LoRA A / B tensor
    assert record["aggregator_info"]["nnm"] == {"f": 1, "neighbours": 2}


# --- issue 32 item 4: weights only when asked, clipping without a copy --------------------------------

@pytest.mark.parametrize("name,params,window", [("median", {}, lambda n: ((n - 1) // 2, n // 2 + 1)),
                                                ("trimmed_mean", {"beta": 0.2}, lambda n: (2, n - 2))])
def test_order_statistic_weights_are_computed_on_demand_and_share_ties(name, params, window):
    from fedsafe.aggregators.base import sort_columns, window_shares

    x = torch.randint(-3, 4, (10, 257)).float()  # many ties at every window end
    res = _run(aggregators.get(name, **params), x)
    assert res.weights_pending  # the aggregate alone never pays for the per-client bookkeeping
    start, stop = window(10)
    expected = window_shares(x, sort_columns(x), start, stop) / (stop - start) / x.shape[1]
    assert torch.allclose(res.client_weights, expected.float(), atol=1e-7)
    assert not res.weights_pending and float(res.client_weights.sum()) == pytest.approx(1.0, abs=1e-6)


def test_norm_clip_before_fedavg_folds_the_clipping_into_the_weights():
    x = _clients(70) * 40
    samples = torch.arange(1.0, 10.0)
    res = aggregators.get("norm_clip", max_norm=1.0)(x, samples, _ids(9))
    norms = x.double().norm(dim=1)
    scale = (1.0 / norms).clamp(max=1.0)
    w = samples.double() / samples.sum()
    _close(res.update, ((w * scale) @ x.double()).numpy())  # sum_i w_i s_i x_i, no clipped matrix built
    assert torch.allclose(res.client_weights, w.float()) and res.info["clipped"] == (scale < 1).tolist()
    composed = aggregators.get("norm_clip+median", norm_clip={"max_norm": 1.0})(x, samples, _ids(9))
    _close(composed.update, (x.double() * scale[:, None]).median(dim=0).values.numpy())
