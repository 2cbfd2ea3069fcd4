"""Robust aggregation rules against hand-computed examples, formulas and invariants."""

import itertools
import math

import numpy as np
import pytest
import torch

from fedsafe import aggregators
from fedsafe.aggregators.base import pairwise_sq_distances
from fedsafe.errors import ConfigError


def _run(name, updates, **params):
    n = updates.shape[0]
    return aggregators.get(name, **params)(updates, torch.ones(n), [f"c{i:02d}" for i in range(n)])


def _col(*values):
    return torch.tensor(values, dtype=torch.float32)[:, None]


# --- median / trimmed mean -------------------------------------------------------------------------

def test_median_odd_by_hand():
    x = torch.tensor([[1.0, 5.0], [2.0, -1.0], [100.0, 3.0]])
    res = _run("median", x)
    assert res.update.tolist() == [2.0, 3.0]
    # coordinate 0 comes from client 1, coordinate 1 from client 2
    assert res.client_weights.tolist() == [0.0, 0.5, 0.5]


def test_median_even_is_midpoint_of_middle_values():
    res = _run("median", _col(10.0, 1.0, 3.0, 2.0))
    assert res.update.tolist() == [2.5]
    assert res.client_weights.tolist() == [0.0, 0.0, 0.5, 0.5]


def test_trimmed_mean_by_hand():
    res = _run("trimmed_mean", _col(1.0, 2.0, 3.0, 4.0, 100.0), beta=0.2)  # k = 1
    assert res.update.tolist() == [3.0]
    assert torch.allclose(res.client_weights, torch.tensor([0, 1 / 3, 1 / 3, 1 / 3, 0]))
    assert res.info["trimmed_per_side"] == 1
    # k = floor(0.1 * 5) = 0: the plain mean
    assert _run("trimmed_mean", _col(1.0, 2.0, 3.0, 4.0, 100.0), beta=0.1).update.item() == pytest.approx(22.0)


def test_tied_values_share_their_places():
    # clients 1 and 2 tie on the median value: each gets half of it
    assert _run("median", _col(1.0, 2.0, 2.0, 5.0, 9.0)).client_weights.tolist() == [0, 0.5, 0.5, 0, 0]
    # k = 1, three clients tie on 1.0 which fills 2 of the 3 kept places: 2/3 of a place each
    res = _run("trimmed_mean", _col(1.0, 1.0, 1.0, 5.0, 9.0), beta=0.2)
    assert res.update.item() == pytest.approx(7 / 3)
    assert torch.allclose(res.client_weights, torch.tensor([2 / 9, 2 / 9, 2 / 9, 1 / 3, 0]))


def test_trimmed_mean_rejects_beta_half():
    with pytest.raises(ConfigError, match="beta"):
        aggregators.get("trimmed_mean", beta=0.5)


def test_trimmed_mean_fraction_from_a_count_trims_that_count():
    # beta = 1/49 with 49 clients: 49 * (1/49) = 0.99999999999999989 in floats; int() trimmed nothing
    x = torch.arange(49, dtype=torch.float32)[:, None].repeat(1, 3)
    x[0] = -1000.0
    res = _run("trimmed_mean", x, beta=1 / 49)
    assert res.info["trimmed_per_side"] == 1
    assert res.update.tolist() == pytest.approx([float(torch.arange(1, 48).float().mean())] * 3)
    # every count f < n/2 for n <= 200, given as the fraction f/n, trims exactly f (and beta = 0 nothing)
    from fedsafe.aggregators.requirements import trimmed_per_side

    wrong = [(n, f) for n in range(1, 201) for f in range(0, (n + 1) // 2) if trimmed_per_side(n, f / n) != f]
    assert wrong == []


def test_trimmed_mean_takes_a_count_f_instead_of_beta():
    x = _col(1.0, 2.0, 3.0, 4.0, 100.0)
    by_count = _run("trimmed_mean", x, f=1)
    assert by_count.update.tolist() == [3.0] and by_count.info["trimmed_per_side"] == 1
    assert _run("trimmed_mean", torch.cat([x, _col(50.0, 60.0)]), f=1).info["trimmed_per_side"] == 1  # any n
    assert _run("trimmed_mean", x, f=2).update.tolist() == [3.0]  # the median of 5
    assert _run("trimmed_mean", x, f=0).update.item() == pytest.approx(22.0)  # the plain mean, asked for
    assert repr(aggregators.get("trimmed_mean", f=2)) == "TrimmedMean(f=2)"
    assert aggregators.get("trimmed_mean").beta == 0.1  # neither: the default fraction
    with pytest.raises(ConfigError, match=r"aggregator\.params\.beta=0\.2 and aggregator\.params\.f=1: .*not both"):
        aggregators.get("trimmed_mean", beta=0.2, f=1)
    with pytest.raises(ConfigError, match=r"^aggregator\.params\.beta=0\.2 and aggregator\.params\.f=1"):
        aggregators.check_feasible("trimmed_mean", {"beta": 0.2, "f": 1}, 10)
    with pytest.raises(ConfigError, match=r"f must be a non-negative integer"):
        aggregators.get("trimmed_mean", f=1.5)


# --- Krum / Multi-Krum -----------------------------------------------------------------------------

def test_krum_scores_squared_distances_by_hand():
    x = _col(0.0, 1.0, 2.0, 3.5, 100.0)
    res = _run("krum", x, f=1)  # n - f - 2 = 2 nearest neighbours
    assert res.info["scores"][:4] == pytest.approx([1 + 4, 1 + 1, 1 + 2.25, 2.25 + 6.25])
    assert res.info["scores"][4] == pytest.approx(96.5 ** 2 + 98 ** 2)
    assert res.update.tolist() == [1.0]
    assert res.client_weights.tolist() == [0, 1, 0, 0, 0]


def test_krum_scores_match_formula(test_seed):
    torch.manual_seed(2 + 100 * test_seed)
    x = torch.randn(9, 30)
    x[2] *= 5
    res = _run("krum", x, f=2)  # n - f - 2 = 5 nearest neighbours, squared distances
    d2 = torch.cdist(x.double(), x.double()) ** 2
    expected = [sorted(float(d2[i, j]) for j in range(9) if j != i)[:5] for i in range(9)]
    assert res.info["scores"] == pytest.approx([sum(e) for e in expected], rel=1e-5)
    assert res.info["selected"] == [int(np.argmin([sum(e) for e in expected]))]
    assert torch.equal(res.update, x[res.info["selected"][0]])


def _krum_choice(x: torch.Tensor, neighbours: int) -> int:
    """Reference Krum: the row whose ``neighbours`` nearest other rows have the least summed squared distance."""
    d2 = torch.cdist(x.double(), x.double()) ** 2
    scores = [sum(sorted(float(d2[i, j]) for j in range(len(x)) if j != i)[:neighbours]) for i in range(len(x))]
    return int(np.argmin(scores))


def test_krum_uses_n_minus_f_minus_2_neighbours_so_an_n_minus_f_minus_1_krum_needs_f_plus_1():
    # the paper's n - f - 2 neighbours; a library counting n - f - 1 (e.g. byzfl's Krum) matches krum(f) at f + 1
    x = _col(0.0, 1.0, 2.0, 3.5, 100.0)
    n, f = 5, 1
    ours = _run("krum", x, f=f).info["selected"][0]
    assert ours == _krum_choice(x, n - f - 2) == 1
    assert _krum_choice(x, n - f - 1) == 2  # the same f under the other convention picks another client
    assert ours == _krum_choice(x, n - (f + 1) - 1)
    gen = torch.Generator().manual_seed(7)
    for _ in range(20):
        x = torch.randn(11, 6, generator=gen)
        x[:3] += 2.0 * torch.randn(6, generator=gen)  # three clustered outliers
        for f in (1, 2, 3):
            assert _run("krum", x, f=f).info["selected"][0] == _krum_choice(x, 11 - f - 2)
        # a Multi-Krum scoring over n - g - 1 neighbours and averaging n - g updates is multikrum(f=g-1, m=n-g)
        d2 = torch.cdist(x.double(), x.double()) ** 2
        for g in (1, 2, 3):
            scores = torch.sort(d2, dim=1).values[:, 1:11 - g].sum(dim=1)
            best = torch.sort(scores, stable=True).indices[:11 - g]
            ours = _run("multikrum", x, f=g - 1, m=11 - g)
            assert sorted(ours.info["selected"]) == sorted(best.tolist())
            assert torch.allclose(ours.update, x[best].mean(dim=0), atol=1e-6)


def test_multikrum_averages_m_best():
    x = _col(0.0, 1.0, 2.0, 3.5, 100.0)
    res = _run("multikrum", x, f=1, m=2)
    assert res.update.tolist() == [1.5]  # clients 1 and 2 have the two lowest scores
    assert res.client_weights.tolist() == [0, 0.5, 0.5, 0, 0]
    default = _run("multikrum", x, f=1)  # m = n - f = 4 drops the outlier
    assert default.update.item() == pytest.approx((0 + 1 + 2 + 3.5) / 4)


def test_krum_refuses_too_few_clients():
    with pytest.raises(ConfigError, match=r"aggregator.params.f=1: krum needs more than 2\*f\+2=4 clients per "
                                          r"round, got 4 in this round"):
        _run("krum", torch.randn(4, 3), f=1)


def test_pairwise_distances_match_cdist():
    x = torch.randn(7, 300) * 3 + 100  # a large common offset: centring keeps the precision
    ref = torch.cdist(x.double(), x.double()) ** 2
    assert torch.allclose(pairwise_sq_distances(x), ref, rtol=1e-5, atol=1e-3)


# --- Bulyan ----------------------------------------------------------------------------------------

def _bulyan_reference(x, f):
    """Direct transcription of El Mhamdi et al. Algorithm 1 with loops (for testing)."""
    n = x.shape[0]
    d2 = torch.cdist(x.double(), x.double()) ** 2
    remaining, chosen = list(range(n)), []
    while len(chosen) < n - 2 * f:
        k = max(1, len(remaining) - f - 2)
        scores = [sum(sorted(float(d2[i, j]) for j in remaining if j != i)[:k]) for i in remaining]
        chosen.append(remaining.pop(int(np.argmin(scores))))
    s = x[sorted(chosen)].double().numpy()
    beta = len(chosen) - 2 * f
    out = []
    for j in range(x.shape[1]):
        col = s[:, j]
        med = np.median(col)
        out.append(np.sort(col[np.argsort(np.abs(col - med), kind="stable")[:beta]]).mean())
    return sorted(chosen), torch.tensor(out)


def test_bulyan_by_hand():
    res = _run("bulyan", _col(0.0, 1.0, 2.0, 3.0, 4.0, 50.0, 100.0), f=1)
    # theta = 5 selected {0..4}; beta = 3 closest to the median 2: {1, 2, 3}
    assert sorted(res.info["selected"]) == [0, 1, 2, 3, 4]
    assert res.update.tolist() == [2.0]
    assert torch.allclose(res.client_weights, torch.tensor([0, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0]))


def test_bulyan_matches_reference(test_seed):
    torch.manual_seed(1 + 100 * test_seed)
    x = torch.randn(11, 40)
    x[3] += 20
    res = _run("bulyan", x, f=2)
    chosen, ref = _bulyan_reference(x, 2)
    assert sorted(res.info["selected"]) == chosen
    assert torch.allclose(res.update.double(), ref, atol=1e-5)
    assert res.client_weights.sum().item() == pytest.approx(1.0)


def test_bulyan_refuses_n_below_4f_plus_3():
    with pytest.raises(ConfigError, match=r"bulyan needs at least 4\*f\+3=7"):
        _run("bulyan", torch.randn(6, 3), f=1)


# --- DnC -------------------------------------------------------------------------------------------

def test_dnc_removes_planted_updates_sharing_a_direction(test_seed):
    g = torch.Generator().manual_seed(test_seed)
    honest = torch.randn(10, 3000, generator=g)
    direction = torch.randn(3000, generator=g)
    planted = 4.0 * direction + 0.1 * torch.randn(3, 3000, generator=g)
    x = torch.cat([honest[:4], planted, honest[4:]])
    res = _run("dnc", x, f=3, niters=3, subsample_dim=1000)
    assert res.info["kept"] == [0, 1, 2, 3] + list(range(7, 13))
    assert res.client_weights[4:7].tolist() == [0, 0, 0]
    assert torch.allclose(res.update, torch.cat([honest[:4], honest[4:]]).mean(0), atol=1e-5)


def test_dnc_scores_are_projections_on_top_singular_vector(test_seed):
    torch.manual_seed(test_seed)
    x = torch.randn(6, 50)
    res = _run("dnc", x, f=1, subsample_dim=50)  # b = d: every coordinate
    c = x.double() - x.double().mean(0)
    v = torch.linalg.svd(c, full_matrices=False).Vh[0]
    assert res.info["scores"][0] == pytest.approx(((c @ v) ** 2).tolist())


def test_dnc_state_round_trips():
    agg = aggregators.get("dnc", f=1, subsample_dim=5)
    x = torch.randn(6, 100)
    agg(x, torch.ones(6), list("abcdef"))
    other = aggregators.get("dnc", f=1, subsample_dim=5)
    other.load_state_dict(agg.state_dict())
    a, b = agg(x, torch.ones(6), list("abcdef")), other(x, torch.ones(6), list("abcdef"))
    assert a.info == b.info


# --- FoolsGold -------------------------------------------------------------------------------------

def test_foolsgold_weights_by_hand():
    from fedsafe.aggregators.foolsgold import foolsgold_weights

    # client 0 is orthogonal to the two identical clients 1, 2: alpha = [1, 0, 0] after the logit
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert foolsgold_weights(h).tolist() == [1.0, 0.0, 0.0]
    # cosines 0.6 between clients 0 and 1, 0 with client 2: alpha = 1 - 0.6 = 0.4 -> /max(1) -> logit
    h = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    expected = min(1.0, max(0.0, math.log(0.4 / 0.6) + 0.5))
    assert foolsgold_weights(h).tolist() == pytest.approx([expected, expected, 1.0], rel=1e-5)  # float32 Gram


def _foolsgold_authors(grads: np.ndarray) -> np.ndarray:
    """DistributedML/FoolsGold deep-fg/fg/foolsgold.py, transcribed line by line (kappa = 1; for testing)."""
    import sklearn.metrics.pairwise as smp

    n_clients = grads.shape[0]
    cs = smp.cosine_similarity(grads) - np.eye(n_clients)
    maxcs = np.max(cs, axis=1)
    for i in range(n_clients):  # pardoning
        for j in range(n_clients):
            if i == j:
                continue
            if maxcs[i] < maxcs[j]:
                cs[i][j] = cs[i][j] * maxcs[i] / maxcs[j]
    wv = 1 - (np.max(cs, axis=1))
    wv[wv > 1] = 1
    wv[wv < 0] = 0
    wv = wv / np.max(wv)
    wv[(wv == 1)] = .99
    with np.errstate(divide="ignore"):
        wv = (np.log(wv / (1 - wv)) + 0.5)
    wv[(np.isinf(wv) + wv > 1)] = 1
    wv[(wv < 0)] = 0
    return wv


def test_foolsgold_pardoning_never_turns_a_negative_cosine_positive():
    from fedsafe.aggregators.foolsgold import foolsgold_weights

    # clients 0 and 1 are near-identical (sybil-like), client 2 points the other way: the authors' code gives
    # [0, 0, 1]; a diagonal left out of the max made v_2 < 0 and pardoning flipped cos = -1 to +1 ([1, 1, 0])
    h = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]])
    assert foolsgold_weights(h).tolist() == [0.0, 0.0, 1.0]
    assert _foolsgold_authors(h.double().numpy()).tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("seed", range(6))
def test_foolsgold_matches_the_authors_code(seed):
    from fedsafe.aggregators.foolsgold import foolsgold_weights

    g = torch.Generator().manual_seed(seed)
    # three similar histories, one opposed to them (its cosines are all negative) and 0-2 unrelated ones,
    # so that pardoning, negative similarities and the logit's clipping all occur
    base = torch.randn(6, generator=g)
    h = torch.cat([base + 0.5 * torch.randn(3, 6, generator=g), -base[None] + 0.5 * torch.randn(1, 6, generator=g),
                   torch.randn(seed % 3, 6, generator=g)])
    ours = foolsgold_weights(h)
    theirs = torch.from_numpy(_foolsgold_authors(h.double().numpy()))
    assert torch.allclose(ours, theirs, atol=1e-4), (ours.tolist(), theirs.tolist())


def test_foolsgold_downweights_sybils_over_rounds():
    g = torch.Generator().manual_seed(0)
    agg = aggregators.get("foolsgold")
    ids = [f"honest{i}" for i in range(4)] + [f"sybil{i}" for i in range(3)]
    history = []
    for _ in range(3):
        target = torch.randn(200, generator=g)
        sybils = target + 0.01 * torch.randn(3, 200, generator=g)  # near-identical sybil updates
        x = torch.cat([torch.randn(4, 200, generator=g), sybils])
        history.append(agg(x, torch.ones(7), ids).client_weights)
    last = history[-1]
    assert last[4:].max() < 1e-6 and last[:4].min() > 0.2
    assert last.sum().item() == pytest.approx(1.0)


def test_foolsgold_history_is_keyed_by_client_and_resumes():
    g = torch.Generator().manual_seed(1)
    rounds = [torch.randn(4, 50, generator=g) for _ in range(3)]
    a = aggregators.get("foolsgold")
    a(rounds[0], torch.ones(4), list("abcd"))
    b = aggregators.get("foolsgold")
    b.load_state_dict(a.state_dict())
    # a different client order: the history follows the ids, not the positions
    perm = [2, 0, 3, 1]
    ra = a(rounds[1], torch.ones(4), list("abcd"))
    rb = b(rounds[1][perm], torch.ones(4), [list("abcd")[i] for i in perm])
    assert torch.allclose(ra.client_weights[perm], rb.client_weights, atol=1e-6)
    assert torch.allclose(a.history["c"], rounds[0][2] + rounds[1][2])


# --- residual --------------------------------------------------------------------------------------

def _residual_reference(x, lam=2.0, delta=0.1):
    """Per-coordinate loop transcription of Fu et al.'s released reweighting (for testing)."""
    n, d = x.shape
    y = x.double().numpy()
    xs = np.arange(n, dtype=float)
    lev = 1 / n + (xs - xs.mean()) ** 2 / ((xs - xs.mean()) ** 2).sum()
    k = lam * math.sqrt(2 / n)
    score, restricted = np.zeros(n), y.copy()
    for j in range(d):
        col = y[:, j]
        s = np.sort(col)
        inner = [np.median([(s[i] - s[m]) / (i - m) for m in range(n) if m != i]) for i in range(n)]
        slope = np.median(inner)
        icpt = np.median(s) - slope * (n - 1) / 2
        rank = np.argsort(np.argsort(col, kind="stable"), kind="stable")
        line = icpt + slope * rank
        r = col - line
        tau = 1.4826 * (1 + 5 / (n - 1)) * np.median(np.sort(np.abs(r))[1:]) + 1e-7
        e = r / tau
        sq = np.sqrt(1 - lev[rank])
        w = np.array([1.0 if abs(e[i] / sq[i]) <= k else k * sq[i] / abs(e[i]) for i in range(n)])
        score += w * np.std(w, ddof=1)
        restricted[:, j] = np.where(w >= delta, col, line)
    rel = (score / score.max()) ** 2
    wts = rel / rel.sum()
    return wts, wts @ restricted


@pytest.mark.parametrize("n", [5, 6])
def test_residual_matches_reference(n, test_seed):
    torch.manual_seed(n + 100 * test_seed)
    x = torch.randn(n, 30)
    x[0, :10] += 30  # outlying values get replaced by the regression line
    res = _run("residual", x)
    wts, ref = _residual_reference(x)
    assert torch.allclose(res.client_weights.double(), torch.tensor(wts), atol=1e-5)
    assert torch.allclose(res.update.double(), torch.tensor(ref), atol=1e-4)
    assert res.info["replaced_values"] > 0


# --- geometric median / norm clip ------------------------------------------------------------------

def test_geometric_median_by_hand():
    # 1-D: the geometric median is the median
    assert _run("geometric_median", _col(0.0, 1.0, 10.0)).update.item() == pytest.approx(1.0, abs=1e-3)
    # square corners plus a far point: still near the centre of the square's mass
    sq = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    assert torch.allclose(_run("geometric_median", sq).update, torch.zeros(2), atol=1e-5)


def test_geometric_median_uses_sample_weights():
    x = _col(0.0, 1.0, 10.0)
    res = aggregators.get("geometric_median")(x, torch.tensor([1.0, 1.0, 5.0]), ["a", "b", "c"])
    assert res.update.item() == pytest.approx(10.0, abs=1e-3)  # weight 5/7 > 1/2 wins


def _weiszfeld_float64(x: np.ndarray, a: np.ndarray, nu: float = 1e-6, iters: int = 2000) -> np.ndarray:
    """Reference: smoothed Weiszfeld (Pillutla et al., Algorithm 2) in float64 on explicit differences."""
    z = a @ x / a.sum()
    for _ in range(iters):
        beta = a / np.maximum(nu, np.linalg.norm(x - z, axis=1))
        z_new = beta @ x / beta.sum()
        if np.linalg.norm(z_new - z) <= 1e-13 * max(1.0, np.linalg.norm(z)):
            return z_new
        z = z_new
    return z


@pytest.mark.parametrize("offset", [0.0, 100.0, 1000.0])
def test_geometric_median_matches_a_float64_reference_under_a_large_common_component(offset, test_seed):
    # 9 clients share offset * c (|c_j| ~ 1 per coordinate) and differ by unit-spread noise, plus one outlier
    gen = torch.Generator().manual_seed(test_seed)
    n, d = 9, 4000
    common = torch.randn(d, generator=gen)
    x = offset * common + torch.randn(n, d, generator=gen)
    x[0] += 5.0
    samples = torch.tensor([3.0, 1, 2, 1, 1, 4, 1, 2, 1])
    rule = aggregators.get("geometric_median")
    res = rule(x, samples, [f"c{i}" for i in range(n)])
    x64, a64 = x.double().numpy(), (samples / samples.sum()).double().numpy()
    ref = _weiszfeld_float64(x64, a64)
    z = res.update.double().numpy()

    def objective(point):
        return float(a64 @ np.linalg.norm(x64 - point, axis=1))

    typical = float(np.median(np.linalg.norm(x64 - ref, axis=1)))  # a client's distance to the median, ~sqrt(d)
    # ftol stops Weiszfeld when the objective improves by < 1e-7 (relative): the objective is then within ftol
    # of the optimum, and the point within ~sqrt(ftol) of a client's distance
    assert (objective(z) - objective(ref)) / objective(ref) < rule.ftol
    assert np.linalg.norm(z - ref) / typical < 1e-3
    assert res.info["iterations"] < rule.maxiter  # it meets its ftol instead of running out of iterations
    assert res.info["objective"] == pytest.approx(objective(z), rel=1e-6)  # the logged objective is z's


def test_norm_clip_clips_then_aggregates():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    res = _run("norm_clip", x, max_norm=1.0)
    assert torch.allclose(res.update, torch.tensor([0.45, 0.6]))
    assert res.info["clipped"] == [True, False]
    inner = _run("norm_clip", _col(100.0, 1.0, -2.0), max_norm=1.5, aggregator="median")
    assert inner.update.item() == pytest.approx(1.0)  # median of the clipped values 1.5, 1, -1.5


def test_norm_clip_clips_with_the_shared_row_clip_and_matches_its_old_formula(monkeypatch):
    """norm_clip's factors are update_ops.clip_factors (DP's row clip), and its output on the same input equals
    the formula it had as its own copy, s_i = min(1, max_norm / max(||x_i||, 1e-12)), bit for bit: in front of
    FedAvg (factors folded into the weights) and in front of another rule (the clipped matrix)."""
    import fedsafe.aggregators.norm_clip as norm_clip_module
    from fedsafe.fl import update_ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 300, generator=g) * torch.tensor([1e-3, 0.01, 0.5, 1.0, 3.0, 1e3, 0.0])[:, None]
    num_samples = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0])
    ids = [f"c{i}" for i in range(7)]
    old_scale = (1.0 / x.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
    weights = num_samples / num_samples.sum()
    calls = []
    monkeypatch.setattr(norm_clip_module, "clip_factors",
                        lambda u, c: calls.append(c) or update_ops.clip_factors(u, c))
    mean = aggregators.get("norm_clip", max_norm=1.0)(x, num_samples, ids)
    assert torch.equal(mean.update, (weights * old_scale) @ x)
    median = aggregators.get("norm_clip+median", norm_clip={"max_norm": 1.0})(x, num_samples, ids)
    assert torch.equal(median.update, aggregators.get("median")(x * old_scale[:, None], num_samples, ids).update)
    assert calls == [1.0, 1.0] and mean.info["clipped"] == (old_scale < 1).tolist()


# --- invariants ------------------------------------------------------------------------------------

RULES = [("fedavg", {}), ("median", {}), ("trimmed_mean", {"beta": 0.2}), ("krum", {"f": 2}),
         ("multikrum", {"f": 2}), ("bulyan", {"f": 2}), ("dnc", {"f": 2, "subsample_dim": 64, "niters": 2}),
         ("foolsgold", {}), ("residual", {}), ("geometric_median", {}),
         ("norm_clip", {"max_norm": 1.0, "aggregator": "trimmed_mean", "params": {"beta": 0.2}})]


@pytest.mark.parametrize("name,params", RULES, ids=[r[0] for r in RULES])
def test_permutation_invariance(name, params, test_seed):
    torch.manual_seed(3 + 100 * test_seed)
    x = torch.randn(11, 200)
    perm = torch.randperm(11)
    ids = [f"c{i}" for i in range(11)]
    a = aggregators.get(name, **params)(x, torch.ones(11), ids)
    b = aggregators.get(name, **params)(x[perm], torch.ones(11), [ids[i] for i in perm])
    assert torch.allclose(a.update, b.update, atol=1e-5)
    assert torch.allclose(a.client_weights[perm], b.client_weights, atol=1e-6)
    assert a.client_weights.sum().item() == pytest.approx(1.0, abs=1e-5)


BOUNDED = [("median", {}), ("trimmed_mean", {"beta": 0.1}), ("krum", {"f": 2}), ("multikrum", {"f": 2}),
           ("bulyan", {"f": 2}), ("residual", {}), ("geometric_median", {}), ("dnc", {"f": 2})]


@pytest.mark.parametrize("name,params", BOUNDED, ids=[r[0] for r in BOUNDED])
def test_bounded_under_one_huge_outlier(name, params, test_seed):
    torch.manual_seed(4 + 100 * test_seed)
    x = torch.randn(11, 100)
    honest_mean = x[1:].mean(0)
    x[0] = 1e6
    res = _run(name, x, **params)
    assert (res.update - honest_mean).norm() < 10  # FedAvg would be ~1e6 * 10 / 11 away
    assert _run("fedavg", x).update.norm() > 1e5


def test_warns_when_f_is_half_the_clients():
    with pytest.warns(RuntimeWarning, match="at least half"):
        _run("dnc", torch.randn(8, 20), f=4, subsample_dim=10, filter_frac=0.5)


def test_unknown_parameter_is_a_config_error():
    with pytest.raises(ConfigError, match="has no parameter"):
        aggregators.get("krum", attackers=2)
    with pytest.raises(ConfigError, match="f must be a non-negative integer"):
        aggregators.get("krum", f=-1)


# --- how many clients each rule needs: the rule and the config check agree ----------------------------

FEASIBILITY = [("krum", {"f": 2}), ("multikrum", {"f": 1}), ("multikrum", {"f": 0, "m": 6}), ("bulyan", {"f": 1}),
               ("dnc", {"f": 3, "subsample_dim": 16}), ("dnc", {"f": 4, "filter_frac": 0.5, "subsample_dim": 16}),
               ("trimmed_mean", {"f": 2})]


@pytest.mark.filterwarnings("ignore:.*at least half:RuntimeWarning")
@pytest.mark.parametrize("name,params", FEASIBILITY, ids=[f"{n}-{p}" for n, p in FEASIBILITY])
def test_rule_refuses_exactly_below_its_min_clients(name, params):
    need = aggregators.min_clients(name, params)
    assert need == {"krum": 7, "multikrum": 6 if params.get("m") else 5, "bulyan": 7,
                    "dnc": 4 if "filter_frac" not in params else 3, "trimmed_mean": 5}[name]
    torch.manual_seed(0)
    _run(name, torch.randn(need, 16), **params)  # works with need clients...
    aggregators.check_feasible(name, params, need)
    with pytest.raises(ConfigError, match=r"aggregator\.params\.(f|m)=") as at_run:  # ...and not one fewer
        _run(name, torch.randn(need - 1, 16), **params)
    with pytest.raises(ConfigError) as at_load:
        aggregators.check_feasible(name, params, need - 1, got=f"fl.clients_per_round={need - 1}")
    # the same condition in the same words, whether a round or the config is too small
    assert str(at_run.value).split(", got")[0] == str(at_load.value).split(", got")[0]


def test_trimmed_mean_and_residual_min_clients_are_where_the_rule_stops_being_the_mean():
    assert aggregators.min_clients("trimmed_mean", {"beta": 0.1}) == 10
    assert aggregators.min_clients("trimmed_mean", {"beta": 0.0}) == 1  # the plain mean was asked for
    for beta in (0.1, 0.2, 0.25, 1 / 3, 0.34, 0.49):
        need = aggregators.min_clients("trimmed_mean", {"beta": beta})
        assert _run("trimmed_mean", torch.randn(need, 4), beta=beta).info["trimmed_per_side"] == 1
        assert _run("trimmed_mean", torch.randn(need - 1, 4), beta=beta).info["trimmed_per_side"] == 0
    need = aggregators.min_clients("residual")
    assert "fallback" not in _run("residual", torch.randn(need, 4)).info
    assert "fallback" in _run("residual", torch.randn(need - 1, 4)).info


def test_check_feasible_follows_compositions_and_names_the_field():
    with pytest.raises(ConfigError, match=r"^aggregator\.params\.f=9: krum needs more than 2\*f\+2=20 clients "
                                          r"per round, got fl\.clients_per_round=4"):
        aggregators.check_feasible("krum", {"f": 9}, 4, got="fl.clients_per_round=4")
    with pytest.raises(ConfigError, match=r"^aggregator\.params\.f=1: bulyan needs at least 4\*f\+3=7"):
        aggregators.check_feasible("probe+bulyan", {"f": 1, "probe": {"threshold": 0.5}}, 6)
    with pytest.raises(ConfigError, match=r"^aggregator\.params\.params\.f=2: multikrum"):
        aggregators.check_feasible("norm_clip", {"max_norm": 1.0, "aggregator": "multikrum", "params": {"f": 2}}, 6)
    with pytest.raises(ConfigError, match=r"^aggregator\.params\.aggregator=residual: residual"):
        aggregators.check_feasible("norm_clip", {"max_norm": 1.0, "aggregator": "residual"}, 2)
    with pytest.raises(ConfigError, match=r"^aggregator\.params\.f=-1: krum: f must be"):
        aggregators.check_feasible("krum", {"f": -1}, 100)
    for name in ("fedavg", "median", "geometric_median", "foolsgold", "probe", "probe+median", "norm_clip"):
        assert aggregators.min_clients(name, {"max_norm": 1.0} if name == "norm_clip" else {}) == 1
    assert aggregators.min_clients("probe+krum", {"f": 1, "probe": {}}) == 5


def test_every_rule_is_registered():
    assert set(aggregators.available()) >= {"fedavg", "median", "trimmed_mean", "krum", "multikrum", "bulyan",
                                             "dnc", "foolsgold", "residual", "geometric_median", "norm_clip"}


# --- validation inside a round ---------------------------------------------------------------------

def test_server_drops_poisoned_updates_and_round_continues(caplog):
    from fedsafe.config import FLConfig
    from fedsafe.fl.client import ClientResult
    from fedsafe.fl.server import Server

    server = Server(FLConfig(), torch.zeros(3), aggregators.get("median"), max_update_norm=100.0)
    good = [ClientResult(f"g{i}", torch.tensor([1.0, 2.0, 3.0]) * (i + 1), 1) for i in range(3)]
    bad = [ClientResult("nan", torch.tensor([float("nan"), 0.0, 0.0]), 1),
           ClientResult("inf", torch.tensor([float("inf"), 0.0, 0.0]), 1),
           ClientResult("shape", torch.zeros(4), 1),
           ClientResult("int", torch.zeros(3, dtype=torch.long), 1),
           ClientResult("huge", torch.full((3,), 1e4), 1)]
    stats = server.aggregate(good[:1] + bad + good[1:])
    assert [d["client_id"] for d in stats["dropped"]] == ["nan", "inf", "shape", "int", "huge"]
    assert stats["kept"] == [0, 6, 7]
    assert torch.allclose(server.global_vec, torch.tensor([2.0, 4.0, 6.0]))  # median of the 3 good ones
    assert stats["client_weights"][1:6] == [0.0] * 5
    assert any("exceeds" in r.message or "exceeds" in str(r.args) for r in caplog.records)
