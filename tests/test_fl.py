"""FL algorithms against their papers' update rules; client training; LoRA flat-vector boundary."""

import math

import pytest
import torch

from fedsafe.config import FLConfig
from fedsafe.data.format import tokenize_rows
from fedsafe.fl.client import ClientData, ClientResult, LocalTrainer, RoundConfig
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


def test_scaffold_control_variate_option_two(tiny):
    trainer, tok = _trainer(tiny)
    client = _client(tok)
    g = trainer.flat.get()
    c = torch.full((trainer.flat.numel,), 1e-3)
    rc = RoundConfig(round=1, lr=1e-2, local_steps=4, batch_size=4, algorithm="scaffold", scaffold_c=c)
    state = {"scaffold_c": torch.zeros(trainer.flat.numel)}
    res = trainer.fit(client, g, rc, state)
    local = g + res.update
    expected_c_new = 0 - c + (g - local) / (4 * 1e-2)
    torch.testing.assert_close(state["scaffold_c"], expected_c_new)
    torch.testing.assert_close(res.extra["delta_c"], expected_c_new)


def test_scaffold_server_control_update():
    server = Server(FLConfig(algorithm="scaffold"), torch.zeros(2), _Mean(), num_clients=4)
    res = [ClientResult("a", torch.zeros(2), 1, extra={"delta_c": torch.tensor([1.0, 0.0])}),
           ClientResult("b", torch.zeros(2), 1, extra={"delta_c": torch.tensor([0.0, 1.0])})]
    server.aggregate(res)
    torch.testing.assert_close(server.scaffold_c, torch.tensor([0.25, 0.25]))  # (|S|/N) * mean
