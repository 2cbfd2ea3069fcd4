"""Differential privacy: clipping bounds, noise calibration, the accountant against the libraries, DP-SGD,
and the constrained-update loss terms."""

import math

import pytest
import torch

from fedsafe.defenses import dp
from fedsafe.defenses.constrained import KLToGlobal, ProximalL2


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# --- clipping and noise ----------------------------------------------------------------------------

def test_clipping_bounds_norms_and_keeps_small_updates():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 50, generator=g) * torch.tensor([0.01, 0.1, 1, 2, 5, 10, 0.5, 3])[:, None]
    clipped, norms = dp.clip_rows(x, 1.0)
    assert torch.allclose(norms, x.norm(dim=1))
    assert (clipped.norm(dim=1) <= 1.0 + 1e-5).all()
    small = norms <= 1.0
    assert torch.equal(clipped[small], x[small])  # below C: untouched
    big = ~small
    assert torch.allclose(clipped[big].norm(dim=1), torch.ones(int(big.sum())), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(clipped, x, dim=1)
    assert torch.allclose(cos, torch.ones(8), atol=1e-5)  # direction preserved


def test_dp_fedavg_noise_std_is_sigma_times_c_on_the_sum():
    m, d, C, sigma = 4, 200_000, 2.0, 0.7
    agg = dp.DPFedAvg(clip_norm=C, noise_multiplier=sigma, seed=3)
    res = agg(torch.zeros(m, d), torch.ones(m), [f"c{i}" for i in range(m)])
    noise_on_sum = res.update * m
    assert noise_on_sum.std().item() == pytest.approx(sigma * C, rel=0.01)
    assert noise_on_sum.mean().item() == pytest.approx(0.0, abs=5 * sigma * C / math.sqrt(d))
    assert torch.allclose(res.client_weights, torch.full((m,), 1 / m))
    # a new round draws new noise; the same seed and round draw the same
    res2 = agg(torch.zeros(m, d), torch.ones(m), [f"c{i}" for i in range(m)])
    assert not torch.equal(res.update, res2.update)
    again = dp.DPFedAvg(clip_norm=C, noise_multiplier=sigma, seed=3)(torch.zeros(m, d), torch.ones(m), list("abcd"))
    assert torch.equal(again.update, res.update)


def test_dp_fedavg_is_the_clipped_mean_without_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 30, generator=g) * 3
    res = dp.DPFedAvg(clip_norm=1.5, noise_multiplier=0.0)(x, torch.tensor([1.0, 9, 1, 1, 1]), list("abcde"))
    expected = dp.clip_rows(x, 1.5)[0].mean(0)  # uniform weights: sample counts do not enter DP-FedAvg
    assert torch.allclose(res.update, expected, atol=1e-6)
    assert res.info["clipped_fraction"] == pytest.approx(float((x.norm(dim=1) > 1.5).float().mean()))


def test_wrap_aggregator_refuses_robust_rules():
    from fedsafe.config import ExperimentConfig
    from fedsafe.errors import ConfigError

    cfg = ExperimentConfig.model_validate({"dp": {"client_level": True}, "aggregator": {"name": "median"}})
    with pytest.raises(ConfigError, match="aggregator.name=fedavg"):
        dp.wrap_aggregator(cfg, object())
    ok = ExperimentConfig.model_validate({"dp": {"client_level": True, "clip_norm": 0.3}})
    assert isinstance(dp.wrap_aggregator(ok, object()), dp.DPFedAvg)


# --- the accountant --------------------------------------------------------------------------------

def test_accountant_without_sampling_matches_the_analytic_gaussian():
    """T Gaussian mechanisms with multiplier sigma compose to one with sigma/sqrt(T) (exact for PLD)."""
    import dp_accounting

    for sigma, steps in ((1.0, 1), (2.0, 4), (5.0, 25)):
        ours = dp.epsilon(sigma, population=10, sample_size=10, steps=steps, delta=1e-5, accountant="pld")
        exact = dp_accounting.get_epsilon_gaussian(sigma / math.sqrt(steps), 1e-5)
        assert ours == pytest.approx(exact, rel=0.02)
        rdp = dp.epsilon(sigma, 10, 10, steps, 1e-5, accountant="rdp")
        assert rdp >= exact * 0.999  # RDP is an upper bound on the exact epsilon


def test_accountant_matches_the_libraries_own_figures():
    import dp_accounting as dpa
    from dp_accounting import rdp
    from opacus.accountants import RDPAccountant

    sigma, n, k, rounds, delta = 1.1, 100, 10, 50, 1e-5
    ours = dp.epsilon(sigma, n, k, rounds, delta, accountant="rdp", sampling="poisson")
    acc = rdp.RdpAccountant()
    acc.compose(dpa.PoissonSampledDpEvent(k / n, dpa.GaussianDpEvent(sigma)), rounds)
    assert ours == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    # a second implementation of the same analysis (Opacus, its own RDP orders)
    op = RDPAccountant()
    op.history = [(sigma, k / n, rounds)]
    assert ours == pytest.approx(op.get_epsilon(delta), rel=0.05)
    # without replacement (what fedsafe samples), replace-one relation
    wor = dp.epsilon(sigma, n, k, rounds, delta, accountant="rdp", sampling="without_replacement")
    acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SampledWithoutReplacementDpEvent(n, k, dpa.GaussianDpEvent(sigma)), rounds)
    assert wor == pytest.approx(acc.get_epsilon(delta), rel=1e-9)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    eps = [dp.epsilon(1.0, 20, 5, t, 1e-5) for t in (1, 5, 20)]
    assert eps[0] < eps[1] < eps[2]
    assert dp.epsilon(2.0, 20, 5, 20, 1e-5) < eps[2]
    assert dp.epsilon(0.0, 20, 5, 1, 1e-5) == math.inf
    assert dp.epsilon(1.0, 20, 5, 0, 1e-5) == 0.0


def test_client_accountant_record_per_round():
    from fedsafe.config import ExperimentConfig

    cfg = ExperimentConfig.model_validate({
        "roles": [{"name": "benign", "clients": 10, "data": [{"path": "x.jsonl"}]}],
        "fl": {"clients_per_round": 3}, "dp": {"client_level": True, "noise_multiplier": 1.2, "delta": 1e-4}})
    acc = dp.client_accountant(cfg)
    r1, r2 = acc.record(1), acc.record(2)
    assert r1["type"] == "dp" and r1["delta"] == 1e-4 and r1["sampling_rate"] == pytest.approx(0.3)
    assert r1["epsilon"] < r2["epsilon"]
    assert r2["epsilon"] == pytest.approx(dp.epsilon(1.2, 10, 3, 2, 1e-4, "rdp", "without_replacement"))


# --- local DP-SGD ----------------------------------------------------------------------------------

def _tiny_peft(r=4):
    from fedsafe.models import attach_lora, byte_tokenizer, tiny_llama

    tok = byte_tokenizer()
    return attach_lora(tiny_llama(tok, seed=0), r=r, alpha=8, seed=0), tok


def _examples(tok, n=4):
    from fedsafe.data.format import format_example

    return [format_example(tok, f"question {i}", f"answer number {i} is fine", 64) for i in range(n)]


def test_dp_sgd_per_sample_gradients_are_exact_and_clipped():
    from opacus import GradSampleModule

    from fedsafe.data.format import collate

    peft, tok = _tiny_peft()
    # make B non-zero so both LoRA factors get gradients
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    exs = _examples(tok)
    trainer = dp.DPLocalTrainer(peft, tok, clip_norm=1e9, noise_multiplier=0.0)
    gsm = GradSampleModule(peft, batch_first=True, loss_reduction="sum", strict=False)
    try:
        grad, per_example, norms = trainer.private_gradient(gsm, exs, torch.Generator().manual_seed(0))
    finally:
        gsm._close()
    # reference: each example's gradient on its own, averaged
    manual = []
    for e in exs:
        peft.zero_grad()
        b = collate([e], tok.pad_token_id)
        peft(**b).loss.backward()
        manual.append(torch.cat([p.grad.reshape(-1) for p in trainer.flat.params]))
    manual = torch.stack(manual)
    assert torch.allclose(norms, manual.norm(dim=1), rtol=1e-3)
    assert torch.allclose(grad, manual.mean(0), atol=1e-5)
    # clipped: the noiseless gradient is the mean of clipped per-example gradients
    trainer.clip_norm = float(manual.norm(dim=1).min()) / 2
    gsm = GradSampleModule(peft, batch_first=True, loss_reduction="sum", strict=False)
    try:
        grad_c, _, _ = trainer.private_gradient(gsm, exs, torch.Generator().manual_seed(0))
    finally:
        gsm._close()
    assert torch.allclose(grad_c, dp.clip_rows(manual, trainer.clip_norm)[0].mean(0), atol=1e-5)
    assert grad_c.norm() <= trainer.clip_norm + 1e-6


def test_local_dp_sgd_fit_reports_epsilon_and_noise_changes_the_update():
    from fedsafe.fl.client import ClientData, RoundConfig

    peft, tok = _tiny_peft()
    client = ClientData("c0", "benign", _examples(tok, 8))
    rc = RoundConfig(round=1, lr=1e-2, local_steps=3, batch_size=4)
    noisy = dp.DPLocalTrainer(peft, tok, clip_norm=0.5, noise_multiplier=1.0, delta=1e-3)
    g0 = noisy.flat.get()
    state: dict = {}
    res = noisy.fit(client, g0, rc, state)
    assert res.metrics["dp_epsilon"] == pytest.approx(dp.epsilon(1.0, 8, 4, 3, 1e-3, "rdp", "poisson"))
    assert state["dp_steps"] == 3
    res_again = noisy.fit(client, g0, rc, {})
    assert torch.equal(res.update, res_again.update)  # seeded noise
    quiet = dp.DPLocalTrainer(peft, tok, clip_norm=0.5, noise_multiplier=0.0, delta=1e-3)
    assert not torch.allclose(quiet.fit(client, g0, rc, {}).update, res.update)
    assert not any(hasattr(p, "grad_sample") for p in noisy.flat.params)  # hooks and buffers removed


# --- constrained updates ---------------------------------------------------------------------------

def test_proximal_term_equals_formula():
    peft, tok = _tiny_peft()
    from fedsafe.fl.params import FlatLoRA

    flat = FlatLoRA(peft)
    g = flat.get()
    term = ProximalL2(mu=0.3)
    term.start(peft, g)
    assert term(peft, None, None).item() == 0.0
    shift = torch.randn(flat.numel, generator=torch.Generator().manual_seed(0)) * 0.01
    flat.set(g + shift)
    assert term(peft, None, None).item() == pytest.approx(0.15 * float((shift ** 2).sum()), rel=1e-4)


def test_kl_term_matches_swapped_adapter_and_skips_the_first_step():
    from fedsafe.data.format import IGNORE_INDEX, collate
    from fedsafe.fl.params import FlatLoRA

    peft, tok = _tiny_peft()
    flat = FlatLoRA(peft)
    g = flat.get()
    batch = collate(_examples(tok), tok.pad_token_id)
    term = KLToGlobal(beta=2.0, temperature=1.5)
    term.start(peft, g)
    out = peft(**batch)
    assert term(peft, batch, out).item() == 0.0 and term.extra_forwards == 0  # theta == theta_global
    # an optimizer step (in place) moves the local model away from the global one
    with torch.no_grad():
        for p in flat.params:
            p.add_(torch.randn_like(p) * 0.05)
    local = flat.get()
    out = peft(**batch)
    kl = term(peft, batch, out)
    assert term.extra_forwards == 1
    kl.backward()  # autograd stays valid: the global pass never modified parameters in place
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flat.params)
    # reference: global logits by loading the global vector
    with torch.no_grad():
        flat.set(g)
        zg = peft(**batch).logits[:, :-1] / 1.5
        flat.set(local)
        zl = peft(**batch).logits[:, :-1] / 1.5
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    lg, ll = torch.log_softmax(zg[mask], -1), torch.log_softmax(zl[mask], -1)
    expected = 2.0 * (lg.exp() * (lg - ll)).sum(-1).mean()
    assert kl.item() == pytest.approx(expected.item(), rel=1e-4)
    assert kl.item() > 0


def test_trainer_runs_loss_terms_from_config():
    from fedsafe.config import ExperimentConfig
    from fedsafe.fl.client import ClientData, LocalTrainer, RoundConfig

    peft, tok = _tiny_peft()
    cfg = ExperimentConfig.model_validate({"constrained": {"l2_mu": 0.5, "kl_beta": 0.1}})
    trainer = dp.build_trainer(cfg, peft, tok)
    assert type(trainer) is LocalTrainer and len(trainer.loss_terms) == 2
    g = trainer.flat.get()
    res = trainer.fit(ClientData("c", "benign", _examples(tok)), g, RoundConfig(round=1, lr=1e-2, local_steps=3,
                                                                                 batch_size=2))
    assert trainer.loss_terms[1].extra_forwards == 2  # steps 2 and 3 (step 1 starts at the global model)
    assert res.update.norm() > 0
    cfg_dp = ExperimentConfig.model_validate({"dp": {"local": True}})
    assert isinstance(dp.build_trainer(cfg_dp, peft, tok), dp.DPLocalTrainer)
