"""Differential privacy: clipping bounds, noise calibration, the accountant against the libraries, DP-SGD,
and the constrained-update loss terms."""

import math

import pytest
import torch

from fedsafe.defenses.differential_privacy import mechanism as dp
from fedsafe.fl import update_ops
from fedsafe.defenses.constrained_updates.loss_terms import KLToGlobal, ProximalL2


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# --- clipping and noise ----------------------------------------------------------------------------

def test_clipping_bounds_norms_and_keeps_small_updates():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 50, generator=g) * torch.tensor([0.01, 0.1, 1, 2, 5, 10, 0.5, 3])[:, None]
    clipped, norms = update_ops.clip_rows(x, 1.0)
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
    expected = update_ops.clip_rows(x, 1.5)[0].mean(0)  # uniform weights: sample counts do not enter DP-FedAvg
    assert torch.allclose(res.update, expected, atol=1e-6)
    assert res.info["clipped_fraction"] == pytest.approx(float((x.norm(dim=1) > 1.5).float().mean()))


def test_os_gaussian_is_standard_normal():
    x = update_ops.os_gaussian(200_001).double()  # odd size: Box-Muller pairs are cut to length
    assert x.shape == (200_001,) and torch.isfinite(x).all()
    se = 1 / math.sqrt(x.numel())
    assert abs(float(x.mean())) < 6 * se
    assert abs(float(x.std()) - 1) < 6 * se
    assert abs(float((x ** 4).mean()) - 3) < 6 * math.sqrt(96) * se  # Gaussian kurtosis (var of x^4 is 96)
    assert float((x.abs() > 1.96).double().mean()) == pytest.approx(0.05, abs=0.005)


def test_secure_noise_differs_across_runs_while_seeded_noise_repeats():
    from fedsafe.config import ExperimentConfig

    m, d, C, sigma = 3, 100_000, 0.5, 1.3
    args = (torch.zeros(m, d), torch.ones(m), ["a", "b", "c"])
    seeded = [dp.DPFedAvg(C, sigma, seed=7)(*args).update for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])
    cfg = ExperimentConfig.model_validate({"seed": 7, "dp": {"client_level": True, "clip_norm": C,
                                                             "noise_multiplier": sigma, "secure_noise": True}})
    secure = [dp.wrap_aggregator(cfg.dp, None, cfg.aggregator.name, cfg.seed)(*args) for _ in range(2)]
    assert secure[0].info["noise"] == "os"
    assert not torch.equal(secure[0].update, secure[1].update)
    assert not torch.allclose(secure[0].update, seeded[0])
    for res in secure:  # still N(0, (sigma C)^2) on the sum
        assert float((res.update * m).std()) == pytest.approx(sigma * C, rel=0.02)


def test_wrap_aggregator_refuses_robust_rules():
    from fedsafe.config import ExperimentConfig
    from fedsafe.errors import ConfigError

    from fedsafe.config import load_config

    # refused when the config is loaded, before any model exists ...
    with pytest.raises(ConfigError, match="aggregator.name=fedavg"):
        load_config(None, ["dp.client_level=true", "aggregator.name=median"])
    # ... and by the wrapper itself, for a config built around the schema's checks
    with pytest.raises(ConfigError, match="aggregator.name=fedavg"):
        dp.wrap_aggregator(ExperimentConfig().dp.model_copy(update={"client_level": True}), object(), "median")
    ok = ExperimentConfig.model_validate({"dp": {"client_level": True, "clip_norm": 0.3}})
    assert isinstance(dp.wrap_aggregator(ok.dp, object(), ok.aggregator.name), dp.DPFedAvg)


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
    # without replacement (what fedsafe samples), replace-one relation: neighbouring sums differ by 2C, and
    # dp-accounting's multiplier is std / sensitivity, so the event gets sigma / 2
    wor = dp.epsilon(sigma, n, k, rounds, delta, accountant="rdp", sampling="without_replacement")
    acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SampledWithoutReplacementDpEvent(n, k, dpa.GaussianDpEvent(sigma / 2)), rounds)
    assert wor == pytest.approx(acc.get_epsilon(delta), rel=1e-9)


# an independent implementation of the RDP bound fedsafe relies on, in numpy/scipy only
def _wor_gaussian_rdp(q: float, z: float, alpha: int) -> float:
    """Theorem 27 of Wang, Balle & Kasiviswanathan (AISTATS 2019) for a Gaussian base mechanism with RDP
    alpha / (2 z^2) (z = noise std / replace-one sensitivity, eps(inf) = inf), integer alpha >= 2."""
    from scipy.special import gammaln, logsumexp

    def log_binom(n, k):
        return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)

    def base(a):
        return a / (2 * z * z)

    terms = [0.0, 2 * math.log(q) + log_binom(alpha, 2) + min(math.log(4) + math.log(math.expm1(base(2))),
                                                             base(2) + math.log(2))]
    terms += [math.log(2) + j * math.log(q) + log_binom(alpha, j) + (j - 1) * base(j) for j in range(3, alpha + 1)]
    return float(logsumexp(terms)) / (alpha - 1)


def _epsilon_from_rdp(rdp_by_order: dict, delta: float) -> float:
    """RDP -> (eps, delta) (Canonne, Kamath & Steinke 2020, Prop. 12; Asoodeh et al. 2021), min over orders."""
    return min(r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1) for a, r in rdp_by_order.items())


def _independent_wor_epsilon(n, m, sigma, rounds, delta, orders=range(2, 257)):
    z = sigma / 2  # replace-one: the clipped sums of neighbouring datasets differ by 2C
    return _epsilon_from_rdp({a: rounds * _wor_gaussian_rdp(m / n, z, a) for a in orders}, delta)


@pytest.mark.parametrize("n, m, sigma, rounds, delta, reference", [
    (20, 5, 1.0, 10, 1 / 20 ** 1.1, 22.48),   # the audit's figures (at the old default delta = 1/N^1.1)
    (100, 10, 1.0, 50, 1 / 100 ** 1.1, 40.58),
    (20, 5, 1.0, 10, 1e-5, 30.70),            # the same at the new default delta
    (100, 10, 1.0, 50, 1e-5, 47.03),
    (100, 10, 3.0, 200, 1e-5, None),
])
def test_client_level_epsilon_matches_an_independent_rdp_bound(n, m, sigma, rounds, delta, reference):
    """fedsafe's replace-one epsilon equals Theorem 27 with sensitivity 2C, computed here from scratch (the old
    accounting with sensitivity C gave 4.83 and 6.20 for the first two rows)."""
    ours = dp.epsilon(sigma, n, m, rounds, delta, accountant="rdp", sampling="without_replacement")
    independent = _independent_wor_epsilon(n, m, sigma, rounds, delta)
    # dp-accounting also uses fractional orders and a tighter forward-difference term: never above ours-by-hand
    assert independent * 0.97 <= ours <= independent * (1 + 1e-6)
    if reference is not None:
        assert ours == pytest.approx(reference, abs=0.01)


def _pair_hockey_stick(eps: float, p, q, lo: float, hi: float, points: int = 400_001) -> float:
    """sup-side of the DP inequality for one pair of output densities: integral of max(0, p - e^eps q)."""
    import numpy as np

    x = np.linspace(lo, hi, points)
    return float(np.clip(p(x) - math.exp(eps) * q(x), 0, None).sum() * (x[1] - x[0]))


@pytest.mark.parametrize("n, m, sigma", [(20, 19, 1.0), (20, 18, 1.0), (10, 9, 0.8), (20, 19, 2.0)])
def test_client_level_epsilon_holds_on_a_concrete_pair_of_neighbours(n, m, sigma):
    """The definition of DP on one replace-one pair, by numerical integration (no accountant involved).

    Client k's clipped update is +C e_1 in D and -C e_1 in D' (every other client sends 0). Along e_1 the
    noisy sum (in units of C) is N(0, sigma^2) when k is not sampled and N(+-1, sigma^2) when it is (prob. m/n),
    so Pr[M(D) in S] <= e^eps Pr[M(D') in S] + delta requires the hockey-stick divergence <= delta. With the old
    sensitivity C the reported eps breaks it on this very pair (delta of 1e-3..1e-2 instead of 1e-5).
    """
    from scipy import stats

    delta, q = 1e-5, m / n
    eps = dp.epsilon(sigma, n, m, 1, delta, accountant="rdp", sampling="without_replacement")

    def with_plus(x):
        return (1 - q) * stats.norm.pdf(x, 0, sigma) + q * stats.norm.pdf(x, 1, sigma)

    def with_minus(x):
        return (1 - q) * stats.norm.pdf(x, 0, sigma) + q * stats.norm.pdf(x, -1, sigma)

    span = 14 * sigma + 1  # the mass beyond is far below delta
    assert _pair_hockey_stick(eps, with_plus, with_minus, -span, span) <= delta
    assert _pair_hockey_stick(eps, with_minus, with_plus, -span, span) <= delta


def test_add_remove_epsilon_holds_on_a_concrete_pair_of_neighbours():
    """The Poisson / add-or-remove option: removing client k (update +C e_1) from a Poisson-sampled round."""
    from scipy import stats

    delta, sigma, q = 1e-5, 1.0, 0.9
    eps = dp.epsilon(sigma, 10, 9, 1, delta, accountant="rdp", sampling="poisson")

    def with_k(x):
        return (1 - q) * stats.norm.pdf(x, 0, sigma) + q * stats.norm.pdf(x, 1, sigma)

    def without_k(x):
        return stats.norm.pdf(x, 0, sigma)

    assert _pair_hockey_stick(eps, with_k, without_k, -15, 15) <= delta
    assert _pair_hockey_stick(eps, without_k, with_k, -15, 15) <= delta


def _analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with (sensitivity / std) = mu (Balle & Wang, ICML 2018, Thm 8)."""
    from scipy import optimize, stats

    def excess(eps):
        return stats.norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * stats.norm.cdf(-mu / 2 - eps / mu) - delta

    return optimize.brentq(excess, 0.0, 500.0)


@pytest.mark.parametrize("sigma, rounds", [(1.0, 1), (2.0, 10), (4.0, 50)])
def test_full_participation_is_the_gaussian_with_sensitivity_2c(sigma, rounds):
    """m = N under replace-one: T Gaussians with sensitivity 2C compose to one with mu = 2 sqrt(T) / sigma."""
    delta = 1e-5
    exact = _analytic_gaussian_epsilon(2 * math.sqrt(rounds) / sigma, delta)
    ours = dp.epsilon(sigma, 10, 10, rounds, delta, accountant="rdp", sampling="without_replacement")
    assert exact * 0.999 <= ours <= exact * 1.25  # RDP is an upper bound, and not a loose one here
    # add/remove-one (sensitivity C): mu = sqrt(T) / sigma, exact with PLD
    pld = dp.epsilon(sigma, 10, 10, rounds, delta, accountant="pld", sampling="poisson")
    assert pld == pytest.approx(_analytic_gaussian_epsilon(math.sqrt(rounds) / sigma, delta), rel=0.02)


def test_dp_accounting_version_and_convention_are_checked(monkeypatch):
    """An untested dp-accounting, or one that applies the replace-one factor 2 itself, is refused."""
    import importlib.metadata

    from dp_accounting.rdp import rdp_privacy_accountant as rpa

    assert dp.check_dp_accounting()  # the installed one passes
    try:
        dp.check_dp_accounting.cache_clear()
        monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.7.1")
        with pytest.raises(RuntimeError, match="dp-accounting 0.7.1"):
            dp.check_dp_accounting()
        monkeypatch.undo()
        dp.check_dp_accounting.cache_clear()
        original = rpa._compute_rdp_sample_wor_gaussian
        monkeypatch.setattr(rpa, "_compute_rdp_sample_wor_gaussian",
                            lambda q, noise_multiplier, orders: original(q, noise_multiplier / 2, orders))
        with pytest.raises(RuntimeError, match="std / sensitivity"):
            dp.check_dp_accounting()
    finally:
        monkeypatch.undo()
        dp.check_dp_accounting.cache_clear()


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    eps = [dp.epsilon(1.0, 20, 5, t, 1e-5) for t in (1, 5, 20)]
    assert eps[0] < eps[1] < eps[2]
    assert dp.epsilon(2.0, 20, 5, 20, 1e-5) < eps[2]
    assert dp.epsilon(0.0, 20, 5, 1, 1e-5) == math.inf
    assert dp.epsilon(1.0, 20, 5, 0, 1e-5) == 0.0


def _client_dp_cfg(clients=10, per_round=3, **dp_fields):
    from fedsafe.config import ExperimentConfig

    return ExperimentConfig.model_validate({
        "roles": [{"name": "benign", "clients": clients, "data": [{"path": "x.jsonl"}]}],
        "fl": {"clients_per_round": per_round}, "dp": {"client_level": True, **dp_fields}})


def _accountant(cfg):
    """The accountant the differential_privacy plug-in builds for a config (its own section + the counts)."""
    return dp.ClientDPAccountant(cfg.dp, cfg.num_clients, cfg.clients_per_round)


def test_client_accountant_record_per_round():
    acc = _accountant(_client_dp_cfg(noise_multiplier=1.2, delta=1e-4, clip_norm=0.5))
    r1, r2 = acc.record(1), acc.record(2)
    assert r1["type"] == "dp" and r1["delta"] == 1e-4 and r1["sampling_rate"] == pytest.approx(0.3)
    assert r1["epsilon"] < r2["epsilon"]
    assert r2["epsilon"] == pytest.approx(dp.epsilon(1.2, 10, 3, 2, 1e-4, "rdp", "without_replacement"))
    # the record says which neighbours, which sensitivity, and against whom the epsilon holds
    assert r1["neighbouring"] == "replace-one" and r1["sensitivity"] == pytest.approx(1.0)  # 2C
    assert r1["accounted_noise_multiplier"] == pytest.approx(0.6)
    assert r1["noise"] == "seeded" and "without the experiment seed" in r1["guarantee"]
    poisson = _accountant(_client_dp_cfg(noise_multiplier=1.2, sampling="poisson", clip_norm=0.5)).record(1)
    assert poisson["neighbouring"] == "add-or-remove-one" and poisson["sensitivity"] == pytest.approx(0.5)
    assert "approximation" in poisson["guarantee"]


def test_default_delta_is_small_and_absolute(caplog):
    """delta no longer depends on N (1/N^1.1 gave 0.30 for N = 3); a delta >= 1/N is warned about."""
    import logging

    from fedsafe.defenses.differential_privacy.config import DPConfig

    assert DPConfig().delta == 1e-5
    acc = _accountant(_client_dp_cfg(clients=3, per_round=2))
    assert acc.record(1)["delta"] == 1e-5
    with caplog.at_level(logging.WARNING, logger="fedsafe"):
        _accountant(_client_dp_cfg(clients=3, per_round=2, delta=0.4))
    assert "not below 1/3" in caplog.text


def test_secure_noise_claims_no_amplification_from_seeded_client_sampling():
    """With OS noise the adversary may hold the seed, hence know who was sampled: every round counts fully."""
    seeded = _accountant(_client_dp_cfg(clients=10, per_round=3, noise_multiplier=2.0)).record(5)
    secure = _accountant(_client_dp_cfg(clients=10, per_round=3, noise_multiplier=2.0,
                                                 secure_noise=True)).record(5)
    assert secure["noise"] == "os" and secure["sampling_rate"] == 1.0 and "no amplification" in secure["guarantee"]
    exact = _analytic_gaussian_epsilon(2 * math.sqrt(5) / 2.0, 1e-5)  # 5 Gaussians, sensitivity 2C
    assert exact * 0.999 <= secure["epsilon"] <= exact * 1.25
    assert seeded["epsilon"] < secure["epsilon"]


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
    assert torch.allclose(grad_c, update_ops.clip_rows(manual, trainer.clip_norm)[0].mean(0), atol=1e-5)
    assert grad_c.norm() <= trainer.clip_norm + 1e-6


def test_local_dp_sgd_fit_reports_epsilon_and_noise_changes_the_update():
    from fedsafe.data.client_data import ClientData
    from fedsafe.fl.client import RoundConfig

    peft, tok = _tiny_peft()
    client = ClientData("c0", "benign", _examples(tok, 8))
    rc = RoundConfig(round=1, lr=1e-2, local_steps=3, batch_size=4)
    noisy = dp.DPLocalTrainer(peft, tok, clip_norm=0.5, noise_multiplier=1.0, delta=1e-3)
    g0 = noisy.flat.get()
    state: dict = {}
    res = noisy.fit(client, g0, rc, state)
    assert res.metrics["dp_epsilon"] == pytest.approx(dp.epsilon(1.0, 8, 4, 3, 1e-3, "rdp", "poisson"))
    assert state["dp_steps"] == 3
    assert res.metrics["dp_delta"] == 1e-3 and res.metrics["dp_sampling"] == "poisson"
    res_again = noisy.fit(client, g0, rc, {})
    assert torch.equal(res.update, res_again.update)  # seeded noise
    quiet = dp.DPLocalTrainer(peft, tok, clip_norm=0.5, noise_multiplier=0.0, delta=1e-3)
    assert not torch.allclose(quiet.fit(client, g0, rc, {}).update, res.update)
    assert not any(hasattr(p, "grad_sample") for p in noisy.flat.params)  # hooks and buffers removed
    # secure noise: the same seed and round give different updates
    secure = dp.DPLocalTrainer(peft, tok, clip_norm=0.5, noise_multiplier=1.0, delta=1e-3, secure_noise=True)
    first, second = secure.fit(client, g0, rc, {}), secure.fit(client, g0, rc, {})
    assert first.metrics["dp_noise"] == "os"
    assert not torch.equal(first.update, second.update)
    assert not torch.equal(first.update, res.update)


def test_local_dp_sgd_draws_poisson_batches(monkeypatch):
    """Each step includes every example independently with q = b/n and divides by the expected size b (what the
    accountant's Poisson subsampled Gaussian assumes); the old fixed-size shuffled batches always had b."""
    from fedsafe.data.client_data import ClientData
    from fedsafe.fl.client import RoundConfig

    peft, tok = _tiny_peft()
    trainer = dp.DPLocalTrainer(peft, tok, clip_norm=1.0, noise_multiplier=1.0)
    numel = trainer.flat.numel
    seen = []

    def spy(gsm, examples, gen, expected_batch_size=None):
        seen.append((len(examples), len({id(e) for e in examples}), expected_batch_size))
        return torch.zeros(numel), torch.zeros(len(examples)), torch.zeros(len(examples))

    monkeypatch.setattr(trainer, "private_gradient", spy)
    client = ClientData("c0", "benign", _examples(tok, 8))
    res = trainer.fit(client, trainer.flat.get(), RoundConfig(round=1, lr=1e-3, local_steps=400, batch_size=2,
                                                              grad_accum=2), {})
    sizes = [k for k, _, _ in seen]
    assert len(sizes) == 400 and all(b == 4 for _, _, b in seen)  # expected batch size b = 2 * 2
    assert all(k == unique for k, unique, _ in seen)  # no example twice in a batch
    assert len(set(sizes)) >= 5 and min(sizes) <= 1  # Binomial(8, 1/2) sizes, not a fixed 4
    assert sum(sizes) / len(sizes) == pytest.approx(4, abs=0.5)  # mean 4, std of the mean 0.07
    assert res.metrics["dp_sampling_rate"] == 0.5
    assert res.metrics["dp_epsilon"] == pytest.approx(dp.epsilon(1.0, 8, 4, 400, 1e-5, "rdp", "poisson"))


def test_dp_sgd_gradient_of_an_empty_poisson_batch_is_noise_over_b():
    peft, tok = _tiny_peft()
    trainer = dp.DPLocalTrainer(peft, tok, clip_norm=0.5, noise_multiplier=2.0)
    grad, losses, norms = trainer.private_gradient(None, [], torch.Generator().manual_seed(3), expected_batch_size=4)
    expected = torch.randn(trainer.flat.numel, generator=torch.Generator().manual_seed(3)) * (2.0 * 0.5) / 4
    assert torch.allclose(grad, expected) and losses.numel() == 0 and norms.numel() == 0


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
    lg, ll = torch.log_softmax(zg, -1), torch.log_softmax(zl, -1)
    per_token = (lg.exp() * (lg - ll)).sum(-1)
    expected = 2.0 * torch.stack([per_token[i][mask[i]].mean() for i in range(len(mask))]).mean()
    assert kl.item() == pytest.approx(expected.item(), rel=1e-4)
    assert kl.item() > 0


def _moved_model_with_kl(beta=1.0):
    """A tiny PEFT model moved away from its 'global' LoRA state, and a KL term started at that state."""
    from fedsafe.fl.params import FlatLoRA

    peft, tok = _tiny_peft()
    flat = FlatLoRA(peft)
    term = KLToGlobal(beta=beta)
    term.start(peft, flat.get())
    with torch.no_grad():
        for p in flat.params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return peft, tok, term


def _response_examples(tok):
    from fedsafe.data.format import format_example

    texts = ["short", "a much longer answer with many more response tokens than the first one has"]
    return [format_example(tok, "the same question", "answer number one", 96)] + \
        [format_example(tok, "another question", t, 96) for t in texts]


def test_kl_term_is_a_per_example_mean():
    """Each example's KL is the mean over its own response tokens, whatever else is in the batch."""
    from fedsafe.data.format import collate

    peft, tok, term = _moved_model_with_kl()
    e0, short, long_ = _response_examples(tok)
    with torch.no_grad():
        alone = term.per_example(peft, b := collate([e0], tok.pad_token_id), peft(**b))
        pair = term.per_example(peft, b := collate([e0, long_], tok.pad_token_id), peft(**b))
        other = term.per_example(peft, b := collate([e0, short], tok.pad_token_id), peft(**b))
        mean = term(peft, b, peft(**b))
    assert alone.shape == (1,) and pair.shape == (2,)
    assert pair[0].item() == pytest.approx(alone[0].item(), rel=1e-4)
    assert other[0].item() == pytest.approx(alone[0].item(), rel=1e-4)
    assert mean.item() == pytest.approx(other.mean().item(), rel=1e-6)


def test_dp_sgd_per_example_gradient_with_kl_does_not_depend_on_other_examples():
    """Example 0's per-sample gradient (its norm) is the same next to a short or a long example, and the
    noiseless unclipped DP-SGD gradient of a batch is the mean of the single-example ones: the loss decomposes
    per example, as per-sample clipping needs. A KL averaged over all of the batch's tokens fails both."""
    from opacus import GradSampleModule

    peft, tok, term = _moved_model_with_kl(beta=5.0)
    trainer = dp.DPLocalTrainer(peft, tok, clip_norm=1e9, noise_multiplier=0.0, loss_terms=[term])
    e0, short, long_ = _response_examples(tok)

    def private(examples):
        gsm = GradSampleModule(peft, batch_first=True, loss_reduction="sum", strict=False)
        try:
            return trainer.private_gradient(gsm, examples, torch.Generator().manual_seed(0))
        finally:
            gsm._close()

    g_alone, _, n_alone = private([e0])
    g_short_alone, _, _ = private([short])
    g_pair_short, _, n_pair_short = private([e0, short])
    _, _, n_pair_long = private([e0, long_])
    assert n_pair_short[0].item() == pytest.approx(n_alone[0].item(), rel=1e-3)
    assert n_pair_long[0].item() == pytest.approx(n_alone[0].item(), rel=1e-3)
    assert torch.allclose(g_pair_short, (g_alone + g_short_alone) / 2, atol=1e-5, rtol=1e-3)
    assert term.extra_forwards > 0  # the KL was really computed (the model differs from the global one)


def test_dp_sgd_refuses_batch_level_loss_terms():
    from fedsafe.errors import ConfigError

    peft, tok = _tiny_peft()

    def batch_term(model, batch, out):
        return out.logits.mean()

    with pytest.raises(ConfigError, match="per_example"):
        dp.DPLocalTrainer(peft, tok, clip_norm=1.0, noise_multiplier=1.0, loss_terms=[batch_term])


def test_trainer_runs_loss_terms_from_config():
    from fedsafe.config import ExperimentConfig
    from fedsafe.pipeline import build_trainer  # the local_training hooks of the constrained and DP plug-ins
    from fedsafe.data.client_data import ClientData
    from fedsafe.fl.client import LocalTrainer, RoundConfig

    peft, tok = _tiny_peft()
    cfg = ExperimentConfig.model_validate({"constrained": {"l2_mu": 0.5, "kl_beta": 0.1}})
    trainer = build_trainer(cfg, peft, tok)
    assert type(trainer) is LocalTrainer and len(trainer.loss_terms) == 2
    g = trainer.flat.get()
    res = trainer.fit(ClientData("c", "benign", _examples(tok)), g, RoundConfig(round=1, lr=1e-2, local_steps=3,
                                                                                 batch_size=2))
    assert trainer.loss_terms[1].extra_forwards == 2  # steps 2 and 3 (step 1 starts at the global model)
    assert res.update.norm() > 0
    cfg_dp = ExperimentConfig.model_validate({"dp": {"local": True}})
    assert isinstance(build_trainer(cfg_dp, peft, tok), dp.DPLocalTrainer)
