"""FL algorithms against their papers' update rules; client training; LoRA flat-vector boundary."""

import math
from types import SimpleNamespace

import pytest
import torch

from fedsafe.config import FLConfig
from fedsafe.data.format import TokenizedExample, tokenize_rows
from fedsafe.data.client_data import ClientData
from fedsafe.fl.client import ClientResult, LocalTrainer, RoundConfig
from fedsafe.fl.params import FlatLoRA
from fedsafe.fl.server import Server, ServerOptimizer, round_lr, sample_clients
from fedsafe.models import attach_lora


class _Mean:
    """Stand-in sample-weighted mean so these tests do not depend on the aggregator suite."""

    name = "mean"

    def __call__(self, updates, num_samples, client_ids):
        w = num_samples / num_samples.sum()
        return type("R", (), {"update": (w[:, None] * updates).sum(0), "client_weights": w, "info": {}})()


def test_cosine_schedule_matches_openfedllm():
    cfg = FLConfig(rounds=10, lr=1e-3, lr_min=1e-5)
    assert round_lr(cfg, 0) == pytest.approx(1e-3)
    assert round_lr(cfg, 5) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert round_lr(FLConfig(rounds=4, lr=2e-4, lr_schedule="constant"), 3) == 2e-4


def test_sampling_is_seeded_and_without_replacement():
    ids = [f"c{i}" for i in range(10)]
    a = sample_clients(ids, 3, seed=1, round_idx=4)
    assert a == sample_clients(ids, 3, seed=1, round_idx=4) and len(set(a)) == 3
    assert any(sample_clients(ids, 3, 1, r) != a for r in range(5, 10))


@pytest.mark.parametrize("algo", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizers_follow_reddi_et_al(algo):
    cfg = FLConfig(algorithm=algo, server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3, server_momentum=0.8)
    opt = ServerOptimizer(cfg, 3)
    x = torch.tensor([1.0, -2.0, 0.5])
    m = torch.zeros(3)
    v = torch.full((3,), cfg.tau ** 2) if algo != "fedavgm" else torch.zeros(3)
    for delta in (torch.tensor([0.1, -0.2, 0.3]), torch.tensor([-0.05, 0.4, 0.0])):
        x_new = opt.step(x, delta)
        if algo == "fedavgm":
            v = 0.8 * v + delta
            expect = x + 0.1 * v
        else:
            m = 0.9 * m + 0.1 * delta
            if algo == "fedadagrad":
                v = v + delta ** 2
            elif algo == "fedadam":
                v = 0.99 * v + 0.01 * delta ** 2
            else:
                v = v - 0.01 * delta ** 2 * torch.sign(v - delta ** 2)
            expect = x + 0.1 * m / (v.sqrt() + 1e-3)
        torch.testing.assert_close(x_new, expect)
        x = x_new


def test_fedavg_server_step_is_weighted_mean():
    server = Server(FLConfig(), torch.zeros(2), _Mean())
    res = [ClientResult("a", torch.tensor([1.0, 0.0]), 3), ClientResult("b", torch.tensor([0.0, 1.0]), 1)]
    stats = server.aggregate(res)
    torch.testing.assert_close(server.global_vec, torch.tensor([0.75, 0.25]))
    assert stats["client_weights"] == pytest.approx([0.75, 0.25]) and server.round == 1


def test_server_drops_invalid_updates_and_continues():
    server = Server(FLConfig(), torch.zeros(2), _Mean(), max_update_norm=10.0)
    res = [ClientResult("ok", torch.tensor([1.0, 1.0]), 1),
           ClientResult("nan", torch.tensor([float("nan"), 0.0]), 1),
           ClientResult("shape", torch.zeros(3), 1),
           ClientResult("huge", torch.tensor([100.0, 0.0]), 1)]
    stats = server.aggregate(res)
    torch.testing.assert_close(server.global_vec, torch.tensor([1.0, 1.0]))
    assert {d["client_id"] for d in stats["dropped"]} == {"nan", "shape", "huge"}
    assert stats["client_weights"] == [1.0, 0.0, 0.0, 0.0]


# --- client training on the tiny model ------------------------------------------------------------

def _client(tok, n=8, cid="c0"):
    rows = [{"instruction": f"item {i}", "response": f"value {i * 7}"} for i in range(n)]
    return ClientData(cid, "benign", tokenize_rows(tok, rows, 64))


def _trainer(tiny, seed=0):
    model, tok = tiny
    peft = attach_lora(model, r=4, alpha=8, seed=seed)
    return LocalTrainer(peft, tok), tok


def test_flat_vector_round_trip_and_peft_names(tiny):
    trainer, _ = _trainer(tiny)
    flat = trainer.flat
    v = torch.randn(flat.numel)
    flat.set(v)
    torch.testing.assert_close(flat.get(), v)
    state = flat.state_dict(v)
    assert all(".default." not in k and "lora_" in k for k in state)
    torch.testing.assert_close(flat.from_state_dict(state), v)
    assert flat.mask(kind="B").sum() + flat.mask(kind="A").sum() == flat.numel
    with pytest.raises(ValueError, match="expected"):
        flat.set(torch.zeros(3))


def test_local_training_lowers_loss_and_is_deterministic(tiny):
    trainer, tok = _trainer(tiny)
    client = _client(tok)
    g = trainer.flat.get()
    rc = RoundConfig(round=1, lr=5e-3, local_steps=15, batch_size=4, seed=3)
    r1 = trainer.fit(client, g, rc)
    r2 = trainer.fit(client, g, rc)
    assert r1.metrics["last_loss"] < r1.metrics["first_loss"]
    torch.testing.assert_close(r1.update, r2.update)  # same seed, same round, same client -> same update
    assert r1.num_samples == 8 and r1.metrics["update_norm"] > 0


def test_fedprox_term_pulls_towards_global(tiny):
    trainer, tok = _trainer(tiny)
    client = _client(tok)
    g = trainer.flat.get()
    base = RoundConfig(round=1, lr=1e-2, local_steps=10, batch_size=4, max_grad_norm=None)
    plain = trainer.fit(client, g, base)
    prox = trainer.fit(client, g, RoundConfig(**{**base.__dict__, "algorithm": "fedprox", "prox_mu": 50.0}))
    assert prox.update.norm() < plain.update.norm()


def test_scaffold_control_variate_on_tiny_model(tiny):
    # c_i+ is the mean of the K clipped local gradients (Option II without AdamW's sign-like displacement):
    # its norm is at most max_grad_norm, where (x - y)/(K lr) under AdamW is ~1 per coordinate
    trainer, tok = _trainer(tiny)
    client = _client(tok)
    g = trainer.flat.get()
    c = torch.full((trainer.flat.numel,), 1e-3)
    rc = RoundConfig(round=1, lr=1e-2, local_steps=4, batch_size=4, algorithm="scaffold", scaffold_c=c,
                     max_grad_norm=1.0)
    c_old = torch.full((trainer.flat.numel,), 2e-3)
    state = {"scaffold_c": c_old.clone()}
    res = trainer.fit(client, g, rc, state)
    c_new = state["scaffold_c"]
    assert torch.isfinite(c_new).all() and 0 < float(c_new.norm()) <= 1.0 + 1e-4
    torch.testing.assert_close(res.extra["delta_c"], c_new - c_old)
    assert float(res.update.abs().max()) > 0


def test_scaffold_server_control_update():
    server = Server(FLConfig(algorithm="scaffold"), torch.zeros(2), _Mean(), num_clients=4)
    res = [ClientResult("a", torch.zeros(2), 1, extra={"delta_c": torch.tensor([1.0, 0.0])}),
           ClientResult("b", torch.zeros(2), 1, extra={"delta_c": torch.tensor([0.0, 1.0])})]
    server.aggregate(res)
    torch.testing.assert_close(server.scaffold_c, torch.tensor([0.25, 0.25]))  # (|S|/N) * mean


# --- SCAFFOLD on toy quadratics through the real LocalTrainer and Server --------------------------

class _Quadratic(torch.nn.Module):
    """Client k's loss 0.5 * sum_j a[k, j] (w_j - b[k, j])^2; k is the first token of the batch."""

    def __init__(self, curvature, optimum, init):
        super().__init__()
        self.w = torch.nn.Parameter(torch.as_tensor(init, dtype=torch.float32).clone())
        self.register_buffer("a", torch.as_tensor(curvature, dtype=torch.float32))
        self.register_buffer("b", torch.as_tensor(optimum, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None, labels=None):
        k = int(input_ids[0, 0])
        return SimpleNamespace(loss=0.5 * (self.a[k] * (self.w - self.b[k]) ** 2).sum())


def _quadratic_run(curvature, optimum, init, cfg, num_clients, rounds):
    """``rounds`` rounds of all quadratic clients; returns the server and each round's client updates."""
    trainer = LocalTrainer(_Quadratic(curvature, optimum, init), SimpleNamespace(pad_token_id=0))
    clients = [ClientData(f"c{k}", "benign", [TokenizedExample(torch.tensor([k]), torch.tensor([k]))] * 4)
               for k in range(len(curvature))]
    server = Server(cfg, trainer.flat.get(), _Mean(), num_clients=num_clients)
    states = {c.client_id: {} for c in clients}
    updates = []
    for r in range(rounds):
        rc = server.round_config(r)
        results = [trainer.fit(c, server.global_vec, rc, states[c.client_id]) for c in clients]
        server.aggregate(results)
        updates.append([res.update for res in results])
    return server, states, updates


def test_scaffold_issue_example_control_variate_is_a_gradient():
    # one client of N=2 on 0.5 * 1e-3 * (w - 1)^2, lr 5e-4, K=10: the gradient is about -1e-3 along the way.
    # AdamW's displacement gave c_i = -0.9998 and flipped round 2's update to -0.005 (away from w=1)
    cfg = FLConfig(algorithm="scaffold", lr=5e-4, lr_schedule="constant", local_steps=10, rounds=2)
    server, states, updates = _quadratic_run([[1e-3]], [[1.0]], [0.0], cfg, num_clients=2, rounds=2)
    c_i = float(states["c0"]["scaffold_c"][0])
    assert -1.0e-3 <= c_i <= -0.98e-3  # mean gradient of round 2, taken on w in [0.005, 0.01]
    round1, round2 = float(updates[0][0][0]), float(updates[1][0][0])
    assert round1 > 0.004 and round2 > 0.5 * round1  # AdamW: ~lr per step towards the optimum, both rounds
    assert float(server.scaffold_c[0]) == pytest.approx(c_i / 2, rel=0.02)  # c = (1/N) sum of delta c_i


def test_scaffold_correction_is_not_clipped(monkeypatch):
    # the optimizer must see clip(g) + (c - c_i): gradient 5 clipped to 1, plus the correction 0.5
    seen = []

    class SpyAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append(float(self.param_groups[0]["params"][0].grad[0]))
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    trainer = LocalTrainer(_Quadratic([[5.0]], [[-1.0]], [0.0]), SimpleNamespace(pad_token_id=0))
    client = ClientData("c0", "benign", [TokenizedExample(torch.tensor([0]), torch.tensor([0]))])
    rc = RoundConfig(round=1, lr=1e-3, local_steps=3, batch_size=1, algorithm="scaffold", max_grad_norm=1.0,
                     scaffold_c=torch.tensor([0.7]))
    state = {"scaffold_c": torch.tensor([0.2])}
    trainer.fit(client, torch.tensor([0.0]), rc, state)
    assert seen == pytest.approx([1.5, 1.5, 1.5], abs=1e-6)
    assert float(state["scaffold_c"][0]) == pytest.approx(1.0, abs=1e-6)  # mean of the clipped gradients


def test_scaffold_removes_client_drift_on_heterogeneous_quadratic():
    # two clients with different curvatures: the global optimum is x* = sum_k a_k b_k / sum_k a_k = (2/3, 1/3).
    # FedAvg with K local AdamW steps drifts to where the clients' displacements cancel (far from x*);
    # SCAFFOLD's correction makes each client follow the global gradient, so x* is its fixed point
    curvature, optimum = [[0.3, 0.6], [0.6, 0.3]], [[0.0, 1.0], [1.0, -1.0]]
    x_star = torch.tensor([2 / 3, 1 / 3])
    final = {}
    for algo in ("fedavg", "scaffold"):
        cfg = FLConfig(algorithm=algo, lr=0.01, local_steps=10, rounds=25)  # cosine schedule over 25 rounds
        server, _, _ = _quadratic_run(curvature, optimum, [0.0, 0.0], cfg, num_clients=2, rounds=25)
        final[algo] = float((server.global_vec - x_star).abs().max())
    assert final["fedavg"] > 0.2  # measured 0.57
    assert final["scaffold"] < 0.03  # measured 4e-4


# --- SCAFFOLD's control variates go through validation and the robust rule ------------------------

def _scaffold_results(byzantine_dc):
    honest = [ClientResult(f"h{i}", torch.tensor([0.1, 0.1 + 0.01 * i]), 1,
                           extra={"delta_c": torch.tensor([0.2, -0.2])}) for i in range(5)]
    bad = ClientResult("byz", torch.tensor([5.0, -5.0]), 1, extra={"delta_c": byzantine_dc})
    return honest + [bad]


@pytest.mark.parametrize("byzantine_dc, max_grad_norm", [
    (torch.tensor([float("nan"), 1e9]), 1.0),  # dropped by validation (non-finite)
    (torch.tensor([0.0, 1e9]), 1.0),           # dropped by validation (norm > 2 * max_grad_norm)
    (torch.tensor([0.0, 1e9]), None),          # no bound: Krum gives it weight 0, so it must not count
])
def test_scaffold_delta_c_validated_and_follows_krum(byzantine_dc, max_grad_norm):
    from fedsafe.aggregators import get

    server = Server(FLConfig(algorithm="scaffold", max_grad_norm=max_grad_norm), torch.zeros(2),
                    get("krum", f=1), num_clients=10)
    stats = server.aggregate(_scaffold_results(byzantine_dc))
    assert stats["client_weights"][-1] == 0.0
    # Krum keeps one honest client: c = (1/N) * its delta_c
    torch.testing.assert_close(server.scaffold_c, torch.tensor([0.02, -0.02]))
    if max_grad_norm is not None:
        assert [d["client_id"] for d in stats["dropped"]] == ["byz"]
        assert "delta_c" in stats["dropped"][0]["reason"]


def test_scaffold_delta_c_uses_the_rule_weights():
    class Weighted:
        name = "weighted"

        def __call__(self, updates, num_samples, client_ids):
            w = torch.tensor([0.75, 0.25, 0.0])
            return SimpleNamespace(update=w @ updates, client_weights=w, info={})

    server = Server(FLConfig(algorithm="scaffold"), torch.zeros(2), Weighted(), num_clients=4)
    res = [ClientResult(c, torch.zeros(2) + 0.1, 1, extra={"delta_c": dc}) for c, dc in
           [("a", torch.tensor([1.0, 0.0])), ("b", torch.tensor([0.0, 1.0])), ("c", torch.tensor([0.9, 0.9]))]]
    server.aggregate(res)
    # two clients kept (weight > 0): c = (2/4) * (0.75 * dc_a + 0.25 * dc_b)
    torch.testing.assert_close(server.scaffold_c, torch.tensor([0.375, 0.125]))


# --- stateful server optimisers do not move on rounds without an update ---------------------------

class _SkippingProbe:
    """Stands in for the probe when it skips a round: zero update, all weights 0, info.probe.skipped."""

    name = "probe"

    def __call__(self, updates, num_samples, client_ids):
        n, d = updates.shape
        return SimpleNamespace(update=torch.zeros(d), client_weights=torch.zeros(n),
                               info={"probe": {"skipped": True, "mean_weight": 0.1}})


class _RefusingSecureAgg:
    """Stands in for SecureAggServer refusing to decrypt a sum of too few clients."""

    def aggregate(self, results, global_vec, round):
        return None, {"client_weights": [0.0] * len(results), "dropped": [], "update_norm": 0.0,
                      "aggregator_info": {"secure_agg": True}, "kept": [0],
                      "skipped": "fewer than 2 clients kept; refusing to decrypt"}


@pytest.mark.parametrize("algo", ["fedavgm", "fedadam"])
def test_stateful_server_optimizers_skip_rounds_without_update(algo):
    server = Server(FLConfig(algorithm=algo), torch.zeros(2), _Mean())
    server.aggregate([ClientResult("a", torch.tensor([0.01, -0.02]), 1)])  # a real round builds up state
    moved = server.global_vec.clone()
    state = server.optimizer.state_dict()
    assert float(moved.abs().sum()) > 0 and any(float(v.abs().sum()) > 0 for v in state.values())

    def unchanged():
        torch.testing.assert_close(server.global_vec, moved, rtol=0, atol=0)
        for k, v in server.optimizer.state_dict().items():
            torch.testing.assert_close(v, state[k], rtol=0, atol=0)

    stats = server.aggregate([ClientResult("a", torch.tensor([float("nan"), 0.0]), 1)])  # no valid update
    unchanged()
    assert stats["skipped"] == "no valid update" and stats["update_norm"] == 0.0
    server.aggregator = _SkippingProbe()
    stats = server.aggregate([ClientResult("a", torch.tensor([0.01, 0.01]), 1)])
    unchanged()
    assert "probe skipped" in stats["skipped"]
    server.secure = _RefusingSecureAgg()
    stats = server.aggregate([ClientResult("a", torch.tensor([0.01, 0.01]), 1)])
    unchanged()
    assert "refusing" in stats["skipped"] and server.round == 4


def test_round_left_too_small_for_the_rule_by_drops_is_skipped_not_crashed():
    """Krum f=1 needs 5 updates; one of 5 is NaN, so 4 remain: the round is skipped, the run goes on."""
    from fedsafe.aggregators import get

    server = Server(FLConfig(algorithm="fedavgm"), torch.zeros(2), get("krum", f=1))
    before = server.global_vec.clone()
    updates = [torch.tensor([0.01 * i, 0.0]) for i in range(4)] + [torch.tensor([float("nan"), 0.0])]
    stats = server.aggregate([ClientResult(f"c{i}", u, 1) for i, u in enumerate(updates)])
    assert "refused 4 updates" in stats["skipped"] and "aggregator.params.f" in stats["skipped"]
    torch.testing.assert_close(server.global_vec, before, rtol=0, atol=0)
    assert float(server.optimizer.state["v"].abs().sum()) == 0.0 and server.round == 1
    stats = server.aggregate([ClientResult(f"c{i}", torch.tensor([0.01, 0.0]), 1) for i in range(5)])
    assert stats.get("skipped") is None and float(server.global_vec[0]) > 0  # the next full round applies


# --- server learning rate defaults ----------------------------------------------------------------

def test_server_lr_default_per_optimizer():
    from fedsafe.config import load_config

    for algo in ("fedavg", "fedprox", "scaffold", "fedavgm"):
        assert FLConfig(algorithm=algo).resolved_server_lr == 1.0
    for algo in ("fedadam", "fedyogi", "fedadagrad"):
        assert FLConfig(algorithm=algo).resolved_server_lr == 1e-3  # OpenFedLLM's fedopt_eta
    assert FLConfig(algorithm="fedadam", server_lr=0.5).resolved_server_lr == 0.5  # an explicit value wins
    # --set fl.algorithm after the defaults were filled in still gets the adaptive default
    assert load_config(None, ["fl.algorithm=fedadam"]).fl.resolved_server_lr == 1e-3
    # FedAdam's first step on a coordinate delta of 5e-3 with tau=1e-3: 0.237 * eta, now below FedAvg's 5e-3
    step = ServerOptimizer(FLConfig(algorithm="fedadam"), 1).step(torch.zeros(1), torch.tensor([5e-3]))
    expected = 1e-3 * 0.1 * 5e-3 / (math.sqrt(0.99 * 1e-6 + 0.01 * 25e-6) + 1e-3)
    assert float(step[0]) == pytest.approx(expected, rel=1e-4) and float(step[0]) < 5e-3


def test_scaffold_with_rolora_keeps_the_frozen_factors_control_variates(tiny):
    """SCAFFOLD (Karimireddy et al. 2020) under fl.lora_aggregation=rolora: a round that trains B after a round
    that trained A leaves A's stale .grad behind; A gets no correction, its c_i and delta_c do not move, and
    the server's c does not move on A. On B, with SGD local steps, c_i+ follows Option II exactly:
    c_i+ = c_i - c + (x - y_K) / (K lr)."""
    from fedsafe.fl.lora_aggregation import trainable_factors, trainable_mask

    trainer, tok = _trainer(tiny)
    client = _client(tok)
    n = trainer.flat.numel
    gen = torch.Generator().manual_seed(0)
    c = 1e-2 * torch.randn(n, generator=gen)
    c_i0 = 1e-2 * torch.randn(n, generator=gen)
    g = trainer.flat.get()
    lr, steps = 1e-2, 3
    base = dict(lr=lr, local_steps=steps, batch_size=4, algorithm="scaffold", optimizer="sgd", scaffold_c=c)
    assert trainable_factors("rolora", 2) == "A" and trainable_factors("rolora", 3) == "B"
    trainer.fit(client, g, RoundConfig(round=2, trainable="A", **base), {"scaffold_c": c_i0.clone()})
    state = {"scaffold_c": c_i0.clone()}
    res = trainer.fit(client, g, RoundConfig(round=3, trainable="B", **base), state)
    on_b = trainable_mask(trainer.flat, "B")
    frozen = ~on_b
    c_i1 = state["scaffold_c"]
    torch.testing.assert_close(c_i1[frozen], c_i0[frozen], rtol=0, atol=0)  # the frozen factor's c_i is kept
    assert float(res.extra["delta_c"][frozen].abs().max()) == 0.0
    assert float(res.update[frozen].abs().max()) == 0.0
    option_ii = c_i0 - c + (g - (g + res.update)) / (steps * lr)  # x - y_K = -update
    torch.testing.assert_close(c_i1[on_b], option_ii[on_b], rtol=1e-4, atol=1e-5)
    assert float((c_i1 - c_i0)[on_b].abs().max()) > 1e-4  # the trained factor's c_i did move
    server = Server(FLConfig(algorithm="scaffold"), torch.zeros(n), _Mean(), num_clients=1)
    server.scaffold_c = c.clone()
    server._update_scaffold_c([res.extra["delta_c"]], torch.ones(1))
    torch.testing.assert_close(server.scaffold_c[frozen], c[frozen], rtol=0, atol=0)
