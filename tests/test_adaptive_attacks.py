"""Adaptive attacks (issue 18): each attack against its formula, distance evasion against the rule it targets,
probe evasion on the tiny model, the plug-in's partial/full knowledge paths, and config validation."""

import json
import math
from statistics import NormalDist

import pytest
import torch

from fedsafe import aggregators
from fedsafe.attacks.adaptive import alie
from fedsafe.attacks.adaptive.base import craft, parse_attack
from fedsafe.errors import ConfigError


def _benign(m=6, d=400, seed=0, spread=0.1):
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(d, generator=gen)
    return centre + spread * torch.randn(m, d, generator=gen), centre, gen


# --- each attack against its formula ------------------------------------------------------------------------

def test_alie_is_mean_plus_z_sigma_along_h_with_z_from_n_and_f(test_seed):
    benign, centre, gen = _benign(seed=test_seed)
    h = centre + torch.randn(centre.shape, generator=gen)
    mu, sigma = benign.mean(0), benign.std(0)
    # Baruch et al.: s = floor(n/2 + 1) - f supporters, z = Phi^-1((n - s) / n)
    for n, f, s in ((10, 2, 4), (50, 12, 14), (8, 1, 4)):
        assert alie.z_max(n, f) == pytest.approx(NormalDist().inv_cdf((n - s) / n))
    assert alie.z_max(50, 12) == pytest.approx(0.5828, abs=1e-3)  # Phi^-1(36/50)
    update, info = craft(parse_attack({"name": "alie"}), h, benign, 10, 2)
    assert info["z"] == pytest.approx(alie.z_max(10, 2))
    assert torch.allclose(update, mu + info["z"] * sigma * torch.sign(h - mu), atol=1e-6)
    assert torch.allclose((update - mu).abs(), info["z"] * sigma, atol=1e-6)  # exactly z sigma from the mean
    clipped, _ = craft(parse_attack({"name": "alie", "z": 1.5, "mode": "clip"}), h, benign, 10, 2)
    assert torch.allclose(clipped, torch.clamp(h, mu - 1.5 * sigma, mu + 1.5 * sigma), atol=1e-6)
    with pytest.raises(ValueError, match="give attack.z"):
        alie.z_max(4, 3)


def test_ipm_is_minus_epsilon_mu_and_scaling_boosts_or_matches_the_norm(test_seed):
    benign, centre, gen = _benign(seed=test_seed)
    h = 3 * torch.randn(centre.shape, generator=gen)
    update, _ = craft(parse_attack({"name": "ipm", "epsilon": 0.1}), h, benign, 8, 2)
    assert torch.allclose(update, -0.1 * benign.mean(0), atol=1e-6)
    boosted, info = craft(parse_attack({"name": "scaling"}), h, benign, 8, 2)
    assert info["factor"] == 4 and torch.allclose(boosted, 4 * h)  # default lambda = n / f
    assert torch.allclose(craft(parse_attack({"name": "scaling", "scale": 2.5}), h, benign, 8, 2)[0], 2.5 * h)
    matched, _ = craft(parse_attack({"name": "scaling", "norm_match": True}), h, benign, 8, 2)
    assert float(matched.norm()) == pytest.approx(float(benign.norm(dim=1).mean()), rel=1e-5)
    assert torch.allclose(matched / matched.norm(), h / h.norm(), atol=1e-6)


@pytest.mark.parametrize("name", ["minmax", "minsum"])
def test_min_max_and_min_sum_gamma_is_maximal_within_the_constraint(name, test_seed):
    benign, centre, gen = _benign(seed=test_seed)
    h = torch.randn(centre.shape, generator=gen)
    update, info = craft(parse_attack({"name": name}), h, benign, 8, 2)
    gamma, mu, p = info["gamma"], benign.mean(0).double(), (h / h.norm()).double()
    assert gamma > 0
    assert torch.allclose(update.double(), mu + gamma * p, atol=1e-5)
    dist = torch.cdist(benign.double(), benign.double())
    to_u = lambda g: torch.cdist((mu + g * p)[None], benign.double())[0]  # noqa: E731
    if name == "minmax":  # max_i ||u - b_i|| <= max_ij ||b_i - b_j||, tight at gamma
        bound, value = float(dist.max()), lambda g: float(to_u(g).max())  # noqa: E731
    else:  # sum_i ||u - b_i||^2 <= max_i sum_j ||b_i - b_j||^2
        bound, value = float((dist ** 2).sum(1).max()), lambda g: float((to_u(g) ** 2).sum())  # noqa: E731
        # closed form (the cross term vanishes): gamma^2 = (bound - sum_i ||mu - b_i||^2) / m
        closed = math.sqrt((bound - float((to_u(0.0) ** 2).sum())) / len(benign))
        assert gamma == pytest.approx(closed, rel=1e-4)
    assert value(gamma) <= bound
    assert value(gamma * (1 + 1e-4)) > bound  # maximal: a slightly larger gamma leaves the constraint
    # an independent bisection on the same constraint lands on the same gamma
    lo, hi = 0.0, 10 * gamma
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if value(mid) <= bound else (lo, mid)
    assert gamma == pytest.approx(lo, rel=1e-4)


def test_collusion_sends_the_leaders_update_with_seeded_noise(test_seed):
    _, centre, gen = _benign(seed=test_seed)
    leader, own = torch.randn(centre.shape, generator=gen), torch.randn(centre.shape, generator=gen)
    same, _ = craft(parse_attack({"name": "collusion"}), own, None, 8, 2, leader=leader)
    assert torch.equal(same, leader)
    cfg = parse_attack({"name": "collusion", "noise": 0.1})
    a, _ = craft(cfg, own, None, 8, 2, leader=leader, noise_seed=1)
    b, _ = craft(cfg, own, None, 8, 2, leader=leader, noise_seed=1)
    c, _ = craft(cfg, own, None, 8, 2, leader=leader, noise_seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rms = float(leader.norm()) / math.sqrt(leader.numel())
    assert float((a - leader).std()) == pytest.approx(0.1 * rms, rel=0.15)


def test_probe_evasion_replaces_only_the_probe_slice(test_seed):
    benign, centre, gen = _benign(seed=test_seed)
    h = torch.randn(centre.shape, generator=gen)
    mask = torch.zeros(centre.numel(), dtype=torch.bool)
    mask[:50] = True
    update, _ = craft(parse_attack({"name": "probe_evasion"}), h, benign, 8, 2, mask=mask)
    assert torch.equal(update[~mask], h[~mask]) and torch.allclose(update[mask], benign[:, mask].mean(0))


# --- distance-evading attacks pass the rule they target -------------------------------------------------------

def _krum_round(test_seed, attack):
    benign, centre, gen = _benign(m=7, d=2000, seed=test_seed, spread=1.0)
    h = centre + 6 * torch.randn(centre.shape, generator=gen)  # the harmful update: far from the benign cloud
    if attack is None:
        mal = h
    else:
        mal, _ = craft(parse_attack({"name": attack}), h, benign, 10, 3)
    updates = torch.cat([benign, mal.expand(3, -1)])  # three malicious clients send the same update
    return aggregators.get("krum", f=3)(updates, torch.ones(10), [f"c{i}" for i in range(10)])


def test_krum_excludes_plain_h_but_picks_the_min_max_update(test_seed):
    plain = _krum_round(test_seed, None)
    assert plain.info["selected"][0] < 7  # a benign update: h alone is excluded
    for attack in ("minmax", "alie"):
        crafted = _krum_round(test_seed, attack)
        assert crafted.info["selected"][0] >= 7, (attack, crafted.info["scores"])  # the crafted update wins
    # and the min-max update still points along h: it is the benign mean moved towards the harmful update
    benign, centre, gen = _benign(m=7, d=2000, seed=test_seed, spread=1.0)
    h = centre + 6 * torch.randn(centre.shape, generator=gen)
    mal, info = craft(parse_attack({"name": "minmax"}), h, benign, 10, 3)
    assert torch.nn.functional.cosine_similarity(mal - benign.mean(0), h, dim=0) > 0.99 and info["gamma"] > 0


def test_full_knowledge_view_crafts_from_the_rounds_benign_updates(test_seed):
    from types import SimpleNamespace

    from fedsafe.attacks.adaptive.plugin import AdaptiveAttack, FullKnowledgeView
    from fedsafe.data.client_data import ClientData

    benign, centre, gen = _benign(m=7, d=2000, seed=test_seed, spread=1.0)
    h = centre + 6 * torch.randn(centre.shape, generator=gen)
    ids = [f"c{i}" for i in range(10)]
    clients = [ClientData(c, "malicious" if i >= 7 else "benign", [], i >= 7) for i, c in enumerate(ids)]
    roles = [SimpleNamespace(name="benign", clients=7, is_malicious=False, attack=None),
             SimpleNamespace(name="malicious", clients=3, is_malicious=True,
                             attack={"name": "minmax", "knowledge": "full", "benign_data": []})]
    plugin = AdaptiveAttack.__new__(AdaptiveAttack)  # no tokenizer: the server side needs no benign data
    plugin.attacks = {"malicious": parse_attack(roles[1].attack)}
    plugin.ctx, plugin._masks, plugin.round = SimpleNamespace(flat=None, clients=clients), {}, 1
    view = plugin.server_view(aggregators.get("krum", f=3))
    assert isinstance(view, FullKnowledgeView) and view.name == "krum"
    out = view(torch.cat([benign, h.expand(3, -1)]), torch.ones(10), ids)
    assert out.info["selected"][0] >= 7 and set(out.info["adaptive_attack"]) == {"c7", "c8", "c9"}
    expected, _ = craft(plugin.attacks["malicious"], h, benign, 10, 3)
    assert out.info["adaptive_attack"]["c7"]["gamma"] == pytest.approx(craft(
        plugin.attacks["malicious"], h, benign, 10, 3)[1]["gamma"])
    assert torch.allclose(out.update, expected, atol=1e-5)  # Krum's choice is the crafted update
    # three different harmful updates: the attackers still send one update, crafted from their mean h
    hs = h + 0.5 * torch.randn(3, h.numel(), generator=gen)
    crafted, info = plugin.replace_full(1, torch.cat([benign, hs]), ids)
    assert torch.equal(crafted[:7], benign) and torch.equal(crafted[7], crafted[9])
    assert torch.allclose(crafted[7], craft(plugin.attacks["malicious"], hs.mean(0), benign, 10, 3)[0], atol=1e-5)


# --- probe evasion on the tiny model -----------------------------------------------------------------------------

def _rows(kind: str, n: int, start: int = 0) -> list[dict]:
    # two distinguishable placeholder datasets; no harmful text
    if kind == "benign":
        return [{"instruction": f"placeholder normal request {i}",
                 "response": f"sure, a helpful placeholder answer {i}."} for i in range(start, start + n)]
    return [{"instruction": f"placeholder harmful request {i}",
             "response": f"ZZZ placeholder unaligned {i} ### !!!"} for i in range(start, start + n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny training steps (conftest)


def _experiment(tmp_path, attack: dict | None, **over):
    from fedsafe.config import ExperimentConfig

    attack = None if attack is None else {"benign_data": [{"path": _write(tmp_path / "atk_benign.jsonl",
                                                                            _rows("benign", 40, 3000))}],
                                          "shadows": 2, "samples_per_shadow": 6, **attack}
    cfg = {"name": "adaptive", "seed": over.pop("seed", 0), "output_dir": str(tmp_path / "runs"),
           "model": {"name": "tiny"}, "lora": {"r": 4, "alpha": 8}, "data": {"max_length": 64, "samples_per_client": 6},
           "roles": [{"name": "benign", "clients": 3,
                      "data": [{"path": _write(tmp_path / "b.jsonl", _rows("benign", 24))}]},
                     {"name": "malicious", "clients": 3, "attack": attack,
                      "data": [{"path": _write(tmp_path / "m.jsonl", _rows("malicious", 24))}]}],
           "fl": {"rounds": 2, "clients_per_round": 6, "local_steps": 2, "batch_size": 3, "lr": 5e-3,
                  "save_every_round": False},
           "eval": {"helpfulness_proxy": False}}
    cfg.update(over)
    return ExperimentConfig.model_validate(cfg)


def test_probe_evasion_lowers_the_probes_score_on_the_tiny_model(tmp_path, test_seed):
    from fedsafe.attacks.adaptive.plugin import AdaptiveAttack
    from fedsafe.plugins import RunContext, Setup

    # the server's probe, fitted on its own shadows (rows no client holds)
    tok, model, trainer, g, rc, probe, clients = _probe_and_clients(test_seed)
    results = [trainer.fit(c, g, rc) for c in clients]  # plain data poisoning: send h
    cfg = _experiment(tmp_path, {"name": "probe_evasion"}, seed=test_seed)
    ctx = RunContext(**vars(Setup.from_config(cfg)), model=model, tokenizer=tok, flat=trainer.flat, clients=clients)
    attack = AdaptiveAttack(None, ctx)
    evaded = [attack.client_update(r, c, g, rc, trainer) for r, c in zip(results, clients)]
    assert all(e is r for e, r in zip(evaded[:3], results[:3]))  # benign clients untouched
    mask = trainer.flat.mask("B", [0])
    for e, r in zip(evaded[3:], results[3:]):
        assert torch.equal(e.update[~mask], r.update[~mask]) and not torch.equal(e.update[mask], r.update[mask])
        assert e.metrics["attack"] == "probe_evasion"

    plain_p, _ = _malicious_probabilities(probe, clients, results)
    evaded_p, out = _malicious_probabilities(probe, clients, evaded)
    # the slice the probe reads is now a benign-data update (the attacker's own benign shadows), so the probe sees
    # benign clients; with plain poisoning it flags them (test_probe's margins: malicious p >= 0.94)
    assert min(plain_p) - max(evaded_p) > 0.5, (plain_p, evaded_p)
    assert not set(out.info["probe"]["flagged"]) & {"client_03", "client_04", "client_05"}


# --- the plug-in in a run -----------------------------------------------------------------------------------------

def _run(cfg):
    from fedsafe.pipeline import run_experiment

    res = run_experiment(cfg, progress=False)
    return [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_partial_knowledge_attacks_run_client_side_with_late_start(tmp_path, test_seed):
    cfg = _experiment(tmp_path, {"name": "minmax", "start_round": 2}, seed=test_seed,
                      aggregator={"name": "krum", "params": {"f": 1}})
    records = _run(cfg)
    mal = {(r["round"], r["client_id"]): r for r in records if r["type"] == "client" and r["malicious"]}
    assert len(mal) == 6
    for (rnd, _), r in mal.items():
        if rnd == 1:  # late start: an honest update on benign-looking data
            assert r["attack_phase"] == "late_start_benign" and "attack_gamma" not in r
        else:
            assert r["attack_phase"] == "attack" and r["attack_gamma"] > 0
            assert r["update_norm"] != pytest.approx(r["honest_update_norm"])


def test_mixing_and_collusion_in_a_run(tmp_path, test_seed):
    records = _run(_experiment(tmp_path, {"name": "collusion"}, seed=test_seed))
    rounds = [r for r in records if r["type"] == "round"]
    for rec in rounds:  # the sybils' updates are identical: cosine 1 between every pair of them
        mal = [i for i, m in enumerate(rec["malicious"]) if m]
        assert all(rec["cosine"][i][j] == pytest.approx(1.0, abs=1e-5) for i in mal for j in mal)
    records = _run(_experiment(tmp_path, {"name": "mixing", "normal_share": 0.5}, seed=test_seed, name="mix"))
    assert {r.get("attack") for r in records if r["type"] == "client" and r["malicious"]} == {"mixing"}


def test_full_knowledge_stealth_statistics_describe_the_crafted_updates(tmp_path, test_seed):
    """knowledge: full replaces the malicious updates in the server's view; the round record's cosine, norms and
    distances must describe those crafted updates (what the rule received), not the honest h."""
    fl = {"rounds": 2, "clients_per_round": 6, "local_steps": 2, "batch_size": 3, "lr": 5e-3,
          "save_every_round": False}
    records = _run(_experiment(tmp_path, {"name": "minmax", "knowledge": "full"}, seed=test_seed, fl=fl,
                               aggregator={"name": "fedavg", "compare": ["krum"]}))
    plain = _run(_experiment(tmp_path, None, seed=test_seed, fl=fl, name="plain"))
    clients = {(r["round"], r["client_id"]): r for r in records if r["type"] == "client"}
    for rec, ref in zip([r for r in records if r["type"] == "round"], [r for r in plain if r["type"] == "round"]):
        mal = [i for i, m in enumerate(rec["malicious"]) if m]
        ben = [i for i, m in enumerate(rec["malicious"]) if not m]
        crafted = rec["aggregator_info"]["adaptive_attack"]
        norms, cos, dist = rec["update_norms"], rec["cosine"], rec["benign_mean_distance"]
        # Min-Max sends mu + gamma h/||h||: exactly gamma from the benign mean, one update for the whole role
        for i in mal:
            assert dist[i] == pytest.approx(crafted[rec["clients"][i]]["gamma"], rel=1e-3)
            assert all(cos[i][j] == pytest.approx(1.0, abs=1e-5) for j in mal)
            client = clients[(rec["round"], rec["clients"][i])]
            assert client["update_norm"] == pytest.approx(norms[i], rel=1e-5)
            assert client["update_norm"] != pytest.approx(client["honest_update_norm"], rel=1e-3)

        # ... and sits on its constraint: max_i ||u - b_i|| = max_ij ||b_i - b_j|| (distances from the logged
        # norms and cosines, so this holds only if both describe the crafted update)
        def d(i, j):
            return math.sqrt(max(norms[i] ** 2 + norms[j] ** 2 - 2 * norms[i] * norms[j] * cos[i][j], 0.0))

        bound = max(d(i, j) for i in ben for j in ben)
        assert max(d(mal[0], j) for j in ben) == pytest.approx(bound, rel=1e-2)
        # plain data poisoning logs the honest updates: distinct, and not at the benign mean's gamma
        assert not all(ref["cosine"][i][j] == pytest.approx(1.0, abs=1e-5) for i in mal for j in mal)
        assert [ref["benign_mean_distance"][i] for i in mal] != pytest.approx([dist[i] for i in mal], rel=1e-3)
        # the compare rules also ran on the crafted updates: Krum picks one of the three identical min-max updates
        assert sum(rec["compare_weights"]["krum"][i] for i in mal) == pytest.approx(1.0)


def _malicious_probabilities(probe, clients, results):
    """The probe's probabilities for the malicious clients (the last three) on these updates, and its result."""
    out = probe(torch.stack([r.update for r in results]), torch.full((len(results),), 6.0),
                [c.client_id for c in clients])
    return [out.info["probe"]["probability"][c.client_id] for c in clients[3:]], out


def _probe_and_clients(test_seed):
    """The tiny model, a trainer, the server's probe fitted on its own shadows, 3 benign + 3 malicious clients."""
    from fedsafe.aggregators.base import RoundContext
    from fedsafe.data.format import tokenize_rows
    from fedsafe.defenses.safe_fedllm_probe.shadow import ShadowTrainer
    from fedsafe.data.client_data import ClientData
    from fedsafe.fl.client import LocalTrainer, RoundConfig
    from fedsafe.models import attach_lora, byte_tokenizer, tiny_llama

    tok = byte_tokenizer()
    model = attach_lora(tiny_llama(tok, seed=test_seed), r=4, alpha=8, seed=test_seed)
    trainer = LocalTrainer(model, tok)
    ex = lambda rows: tokenize_rows(tok, rows, 64)  # noqa: E731
    g = trainer.flat.get()
    rc = RoundConfig(round=1, lr=5e-3, local_steps=2, batch_size=3)
    shadow = ShadowTrainer(trainer, ex(_rows("benign", 40, 5000)), ex(_rows("malicious", 40, 5000)),
                           benign_shadows=3, malicious_shadows=3, samples_per_shadow=6, steps=2, seed=test_seed)
    probe = aggregators.get("probe")
    probe.prepare(RoundContext(round=1, global_vec=g, round_config=rc, shadow=shadow))
    clients = [ClientData(f"client_0{i}", "malicious" if i >= 3 else "benign",
                          ex(_rows("malicious" if i >= 3 else "benign", 6, 1000 + 10 * i)), i >= 3) for i in range(6)]
    return tok, model, trainer, g, rc, probe, clients


def test_probe_evasion_normal_data_slice_trains_one_model_that_evades_the_probe(tmp_path, test_seed):
    """slice: normal_data (issue 18 item 6, "trains it only on normal data"): the probe's slice is trained on
    normal batches only, the rest on the unaligned ones; the probe scores the clients lower than plain data
    poisoning, while the non-slice weights still move along plain poisoning's harmful update."""
    from fedsafe.attacks.adaptive.plugin import AdaptiveAttack
    from fedsafe.plugins import RunContext, Setup

    tok, model, trainer, g, rc, probe, clients = _probe_and_clients(test_seed)
    results = [trainer.fit(c, g, rc) for c in clients]  # plain data poisoning: send h
    cfg = _experiment(tmp_path, {"name": "probe_evasion", "slice": "normal_data"}, seed=test_seed)
    ctx = RunContext(**vars(Setup.from_config(cfg)), model=model, tokenizer=tok, flat=trainer.flat, clients=clients)
    attack = AdaptiveAttack(None, ctx)
    wrapped = attack.local_training(trainer)
    assert torch.equal(wrapped.fit(clients[0], g, rc).update, results[0].update)  # benign clients untouched
    evaded = results[:3] + [wrapped.fit(c, g, rc) for c in clients[3:]]
    mask = trainer.flat.mask("B", [0])
    cos = torch.nn.functional.cosine_similarity
    for e, r, c in zip(evaded[3:], results[3:], clients[3:]):
        assert e.metrics["attack_phase"] == "attack_slice_normal_data"
        assert attack.client_update(e, c, g, rc, wrapped) is e  # no shadow replacement on top
        assert float(e.update[mask].norm()) > 0 and not torch.allclose(e.update[mask], r.update[mask])
        # the rest is trained on the same unaligned batches as plain poisoning: it points the same way (0.80-0.90
        # on seeds 0-2), far more than to the benign clients' rest (< 0.07)
        benign_rest = torch.stack([b.update[~mask] for b in results[:3]]).mean(0)
        assert float(cos(e.update[~mask], r.update[~mask], dim=0)) > 0.5
        assert (float(cos(e.update[~mask], r.update[~mask], dim=0))
                > float(cos(e.update[~mask], benign_rest, dim=0)) + 0.3)
        # the slice points towards the benign clients' slices rather than its own harmful slice
        benign_slice = torch.stack([b.update[mask] for b in results[:3]]).mean(0)
        assert float(cos(e.update[mask], benign_slice, dim=0)) > float(cos(e.update[mask], r.update[mask], dim=0))

    plain_p, _ = _malicious_probabilities(probe, clients, results)
    evaded_p, out = _malicious_probabilities(probe, clients, evaded)
    assert min(plain_p) - max(evaded_p) > 0.5, (plain_p, evaded_p)
    assert not set(out.info["probe"]["flagged"]) & {"client_03", "client_04", "client_05"}


def _node(cfg):
    """What a Flower SuperNode builds for itself (engines/flower/trainer_cache.py::build): its own model and client side
    (plug-ins included) and its clients' data, sharing no Python object with any other node."""
    from fedsafe.data import build_clients
    from fedsafe.models import attach_lora, load_base_model
    from fedsafe.plugins import client_trainer

    loaded = load_base_model(cfg.model.name, cfg.model.device, cfg.model.dtype, cfg.model.quantization, seed=cfg.seed)
    model = attach_lora(loaded.model, cfg.lora.r, int(cfg.lora.alpha), cfg.lora.dropout, cfg.lora.target_modules,
                        seed=cfg.seed)
    return client_trainer(cfg, model, loaded.tokenizer), {c.client_id: c for c in build_clients(cfg, loaded.tokenizer)}


def test_collusion_sybils_in_separate_processes_send_identical_updates_without_communication(tmp_path, test_seed):
    """Two client sides built independently (as two ClientApps are) produce the identical sybil update: each trains
    the role's shared update from the shared seed and data; with noise, each adds its own seeded noise to it."""
    from fedsafe.fl.client import LocalTrainer, RoundConfig

    cfg = _experiment(tmp_path, {"name": "collusion"}, seed=test_seed)
    (a, clients_a), (b, clients_b) = _node(cfg), _node(cfg)
    g = a.flat.get() + 0.01 * torch.randn(a.flat.numel, generator=torch.Generator().manual_seed(test_seed))
    rc = RoundConfig(round=1, lr=5e-3, local_steps=2, batch_size=3, seed=cfg.seed)
    ua = a.fit(clients_a["client_03"], g, rc)
    ub = b.fit(clients_b["client_04"], g, rc)
    assert ua.client_id == "client_03" and ub.client_id == "client_04"
    assert ua.metrics["attack_phase"] == "attack_shared_update" and float(ua.update.norm()) > 0
    assert torch.allclose(ua.update, ub.update, rtol=0, atol=1e-7)
    # the sybils' own honest updates differ: the identity comes from the shared training, not from their data
    own = [LocalTrainer(a.model, a.tokenizer).fit(clients_a[c], g, rc).update for c in ("client_03", "client_04")]
    assert not torch.allclose(own[0], own[1], atol=1e-4)
    assert min(float(torch.nn.functional.cosine_similarity(ua.update, o, dim=0)) for o in own) < 0.999
    # benign clients of the same nodes train honestly
    assert torch.equal(a.fit(clients_a["client_00"], g, rc).update,
                       LocalTrainer(a.model, a.tokenizer).fit(clients_a["client_00"], g, rc).update)

    noisy = _experiment(tmp_path, {"name": "collusion", "noise": 0.1}, seed=test_seed, name="noisy")
    (na, cna), (nb, cnb) = _node(noisy), _node(noisy)
    va, vb = na.fit(cna["client_03"], g, rc).update, nb.fit(cnb["client_04"], g, rc).update
    rms = float(ua.update.norm()) / math.sqrt(ua.update.numel())
    for v in (va, vb):  # the shared update plus 0.1 rms of seeded noise, different per sybil
        assert float((v - ua.update).std()) == pytest.approx(0.1 * rms, rel=0.1)
    assert not torch.allclose(va, vb)


def test_collusion_through_flower_clientapps_that_build_their_own_side(tmp_path, test_seed):
    """Flower ClientApps (handle_train) that each build their own model and plug-ins from the config, as on
    separate SuperNodes (an unregistered run token): the sybils' updates are identical in the round records."""
    pytest.importorskip("flwr")
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity
    from test_flower import ScriptedGrid

    from fedsafe.engines.flower import trainer_cache
    from fedsafe.engines.flower.server import FlowerEngine
    from fedsafe.pipeline import run_experiment
    from fedsafe.rundir import RunDir

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    cfg = _experiment(tmp_path, {"name": "collusion"}, seed=test_seed, name="flower-collusion",
                      fl={"rounds": 1, "clients_per_round": 6, "local_steps": 2, "batch_size": 3, "lr": 5e-3,
                          "save_every_round": False},
                      flower={"round_timeout_s": 120.0, "connect_timeout_s": 5.0})
    grid = ScriptedGrid(6)
    res = run_experiment(cfg, progress=False,
                         engine_factory=lambda trainer, clients: FlowerEngine(grid, cfg, clients, token="x"))
    assert trainer_cache.BUILT  # the nodes built their own client sides
    run = RunDir.open(res.run_dir)
    (rec,) = run.records("round")
    mal = [i for i, m in enumerate(rec["malicious"]) if m]
    assert len(mal) == 3 and rec["failed"] == []
    assert all(rec["cosine"][i][j] == pytest.approx(1.0, abs=1e-4) for i in mal for j in mal)
    norms = [rec["update_norms"][i] for i in mal]
    assert max(norms) - min(norms) <= 1e-6 * max(norms)  # the same update, not merely the same direction
    phases = {r["attack_phase"] for r in run.records("client") if r["malicious"]}
    assert phases == {"attack_shared_update"}
    # Flower's simulation engine (ClientApps on the pipeline's own model): the same shared update
    from fedsafe.engines.flower.simulation import run_flower_experiment

    (sim,) = RunDir.open(run_flower_experiment(cfg, progress=False).run_dir).records("round")
    assert sim["update_norms"] == pytest.approx(rec["update_norms"], rel=1e-5)
    assert all(sim["cosine"][i][j] == pytest.approx(1.0, abs=1e-4) for i in mal for j in mal)


# --- configuration ------------------------------------------------------------------------------------------------

def test_config_errors_name_the_field(tmp_path):
    from fedsafe.config import load_config

    def load(attack, role="malicious"):
        cfg = {"roles": [{"name": "benign", "clients": 3, "data": [{"path": "starter:train"}]},
                         {"name": role, "clients": 1, "data": [{"path": "starter:train"}], "attack": attack}]}
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps(cfg))
        return load_config(path)

    assert load({"name": "alie", "z": 1.0}).roles[1].attack["z"] == 1.0
    for attack, expected in (({"name": "alie", "zz": 1}, r"roles\.1\.attack: zz: unknown parameter of attack 'alie'"),
                             ({"name": "alie", "z": -1}, r"roles\.1\.attack: z: .*greater than 0"),
                             ({"name": "nope"}, r"roles\.1\.attack: name='nope' is not an adaptive attack"),
                             ({"name": "minmax", "knowledge": "all"},
                              r"roles\.1\.attack: knowledge: .*'partial' or 'full'"),
                             ({"name": "mixing", "normal_share": 1.0}, r"roles\.1\.attack: normal_share"),
                             ({"name": "probe_evasion", "shadows": 1}, r"roles\.1\.attack: shadows"),
                             ({"name": "probe_evasion", "slice": "all"}, r"roles\.1\.attack: slice: .*'normal_data'"),
                             ({"name": "collusion", "shared_samples": 0}, r"roles\.1\.attack: shared_samples")):
        with pytest.raises(ConfigError, match=expected):
            load(attack)
    with pytest.raises(ConfigError, match=r"roles\.1: attack: role 'helper' is not malicious"):
        load({"name": "alie"}, role="helper")


def test_full_knowledge_is_refused_for_flower(tmp_path):
    from fedsafe.attacks.adaptive.plugin import AdaptiveAttack
    from fedsafe.plugins import RunContext, Setup

    cfg = _experiment(tmp_path, {"name": "alie", "knowledge": "full"})
    setup = Setup.from_config(cfg)
    AdaptiveAttack.check(None, setup)  # in-process simulation: accepted
    setup.engine_may_be_flower = True
    with pytest.raises(ConfigError, match=r"roles\[1\]\.attack\.knowledge=full is simulation only"):
        AdaptiveAttack.check(None, setup)
    # a Flower ClientApp builds its client side alone (no clients list, no run directory): refused there too
    from fedsafe.models import byte_tokenizer

    with pytest.raises(ConfigError, match="knowledge=full is simulation only"):
        AdaptiveAttack(None, RunContext(**vars(Setup.from_config(cfg)), tokenizer=byte_tokenizer()))
    partial = _experiment(tmp_path, {"name": "alie"})
    setup = Setup.from_config(partial)
    setup.engine_may_be_flower = True
    AdaptiveAttack.check(None, setup)  # partial knowledge runs in ClientApps


# --- the benchmark-sized matrix end to end on the tiny model ------------------------------------------------------

@pytest.mark.slow  # 36 tiny training runs + 48 evaluations: ~70 s of CPU time, minutes on a loaded machine
def test_tiny_attack_defense_matrix_end_to_end(tmp_path, test_seed):
    """configs/adaptive.yaml's attacks against FedAvg (+ post-hoc), Krum and the probe on the tiny model: every
    cell trains, is evaluated, logs its attack, and lands in the matrix with the worst attack per defense."""
    from pathlib import Path

    import yaml

    from fedsafe.evaluation.attack_matrix import read_matrix, worst_attacks, write_attack_matrix
    from fedsafe.grid import load_grid, run_grid

    full = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "adaptive.yaml").read_text())
    attacks = {k: v for k, v in full["matrix"]["attack"].items() if k != "none"}
    for spec in attacks.values():  # the attacker's benign data: a placeholder file, small shadows
        if "roles.1.attack" in spec:
            spec["roles.1.attack"].update(benign_data=[{"path": "atk_benign.jsonl"}], shadows=2,
                                          samples_per_shadow=4)
    files = {"benign.jsonl": _rows("benign", 24), "malicious.jsonl": _rows("malicious", 24),
             "atk_benign.jsonl": _rows("benign", 24, 3000), "shadow_benign.jsonl": _rows("benign", 24, 5000),
             "shadow_malicious.jsonl": _rows("malicious", 24, 5000)}
    for name, rows in files.items():
        _write(tmp_path / name, rows)
    (tmp_path / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"placeholder harmful request {i}"}) for i in range(2)))
    benign_role = {"name": "benign", "clients": 3, "data": [{"path": "benign.jsonl"}]}
    spec = {"name": "adaptive-tiny", "output_dir": str(tmp_path / "out"),
            "config": {"seed": test_seed, "model": {"name": "tiny"}, "lora": {"r": 2, "alpha": 4},
                       "data": {"max_length": 64, "samples_per_client": 4,
                                "heldout": [{"path": "benign.jsonl", "max_rows": 4}]},
                       "roles": [benign_role,
                                 {"name": "malicious", "clients": 2, "data": [{"path": "malicious.jsonl"}]}],
                       "fl": {"rounds": 2, "clients_per_round": 5, "local_steps": 1, "batch_size": 2, "lr": 5e-3,
                              "save_every_round": False},
                       "probe": {"benign": [{"path": "shadow_benign.jsonl"}],
                                 "malicious": [{"path": "shadow_malicious.jsonl"}], "benign_shadows": 2,
                                 "malicious_shadows": 2, "samples_per_shadow": 4, "steps": 1},
                       "posthoc": {"aligned": [{"path": "benign.jsonl"}], "normal": [{"path": "benign.jsonl"}],
                                   "n_samples": 4, "steps": 1},
                       "eval": {"prompts": "prompts.jsonl", "n_prompts": 2, "max_new_tokens": 2,
                                "n_normal_prompts": 2}},
            "matrix": {"attack": {"none": {"roles": [benign_role, {"name": "benign_extra", "clients": 2,
                                                                    "data": [{"path": "benign.jsonl"}]}]},
                                  **attacks},
                       "defense": {"fedavg": {"aggregator.name": "fedavg"},
                                   "fedavg_posthoc": {"aggregator.name": "fedavg", "posthoc.enabled": True},
                                   "krum": {"aggregator.name": "krum", "aggregator.params": {"f": 1}},
                                   "probe": {"aggregator.name": "probe"}}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    grid_dir = run_grid(*load_grid(path), progress=False)

    matrix = read_matrix(grid_dir)
    assert matrix["attacks"] == ["none", *attacks] and matrix["defenses"] == list(spec["matrix"]["defense"])
    for a in matrix["attacks"]:
        for d in matrix["defenses"]:
            cell = matrix["cells"][(a, d)]
            assert 0 <= cell["rule"][0] <= 100 and cell["helpfulness_proxy"][0] > 0, (a, d, cell)
    worst = worst_attacks(matrix, "rule")
    assert set(worst) == set(matrix["defenses"]) and "none" not in worst.values()
    # every trained cell logged its attack on the malicious clients' records (the attack that ran is the one asked)
    import csv

    for row in csv.DictReader((grid_dir / "settings.csv").open()):
        attack, defense = row["setting"].split("-", 1)
        if row["how"] != "trained":
            continue
        records = [json.loads(x) for x in (grid_dir / row["run_dir"] / "metrics.jsonl").read_text().splitlines()]
        mal = [r for r in records if r["type"] == "client" and r["malicious"]]
        expected = attacks.get(attack, {}).get("roles.1.attack", {}).get("name")
        assert {r.get("attack") for r in mal} == ({expected} if expected else ({None} if mal else set())), row
    written = write_attack_matrix(grid_dir)
    names = {p.name for p in written}
    assert {"attack_matrix.md", "attack_matrix_rule.png", "attack_matrix_helpfulness_proxy.png",
            "stealth_by_attack.png"} <= names
    assert "**" in (grid_dir / "attack_matrix.md").read_text()  # the worst attacks are marked


def test_attack_matrix_marks_the_worst_attack_per_defense(tmp_path):
    """The matrix report on a hand-written grid: cells from results.csv, post-hoc cells from the post-hoc row,
    the worst attack = lowest Rule / highest perplexity (never the reference), stealth from the round records."""
    import csv

    import yaml

    from fedsafe.evaluation.attack_matrix import markdown, read_matrix, worst_attacks, write_attack_matrix

    spec = {"matrix": {"attack": {"data_poisoning": {}, "minmax": {}}, "defense": {"fedavg": {}, "krum": {}}},
            "settings": [{"name": "none-fedavg", "set": {}}, {"name": "minmax-fedavg_posthoc", "set": {}}]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(spec))
    rows = [("none-fedavg", "none", 90.0, 5.0), ("data_poisoning-fedavg", "none", 40.0, 6.0),
            ("data_poisoning-krum", "none", 70.0, 5.5), ("minmax-fedavg", "none", 50.0, 7.0),
            ("minmax-krum", "none", 30.0, 5.2), ("minmax-fedavg_posthoc", "posthoc_l1", 80.0, 5.4),
            ("minmax-fedavg_posthoc", "none", 50.0, 7.0)]  # the undefended row of a post-hoc setting is skipped
    with (tmp_path / "results.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["setting", "scenario", "method", "defense", "seed", "rule", "helpfulness_proxy", "n_prompts"])
        for setting, defense, rule, ppl in rows:
            w.writerow([setting, "attack", "fedavg", defense, 0, rule, ppl, 24])
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    record = {"type": "round", "round": 1, "clients": ["a", "b", "c"], "malicious": [False, False, True],
              "cosine": [[1, 0.9, 0.1], [0.9, 1, 0.2], [0.1, 0.2, 1]], "benign_mean_distance": [1.0, 3.0, 4.0],
              "aggregator_info": {"probe": {"probability": {"a": 0.1, "b": 0.2, "c": 0.9}}}}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "settings.csv").write_text("setting,seed,run_dir,how\nminmax-krum,0,runs/r1,trained\n")

    matrix = read_matrix(tmp_path)
    assert matrix["attacks"] == ["data_poisoning", "minmax", "none"]
    assert matrix["defenses"] == ["fedavg", "krum", "fedavg_posthoc"]
    assert matrix["cells"][("minmax", "fedavg_posthoc")]["rule"][0] == 80.0
    assert worst_attacks(matrix, "rule") == {"fedavg": "data_poisoning", "krum": "minmax", "fedavg_posthoc": "minmax"}
    assert worst_attacks(matrix, "helpfulness_proxy")["fedavg"] == "minmax"  # highest perplexity
    assert "| data_poisoning | **40.0** | 70.0 | - |" in markdown(matrix)
    matrix["cells"][("minmax", "fedavg")]["rule"] = (40.0, None, None, 1)  # a tie: both attacks are marked
    assert "| minmax | **40.0** |" in markdown(matrix) and worst_attacks(matrix, "rule")["fedavg"] == "data_poisoning"
    names = {p.name for p in write_attack_matrix(tmp_path)}
    assert {"attack_matrix.csv", "attack_matrix.md", "attack_matrix_rule.png", "stealth_by_attack.png"} <= names
    from fedsafe.evaluation.attack_matrix import stealth_by_attack

    stealth = stealth_by_attack(tmp_path, matrix)["minmax"]
    assert stealth["malicious"] == [pytest.approx(0.15)] and stealth["probe"] == [0.9]
    assert sorted(stealth["benign"]) == [pytest.approx(0.9)] * 2
    # distance to the benign mean relative to the benign clients' mean distance (2.0 in this round)
    assert stealth["malicious_distance"] == [2.0] and stealth["benign_distance"] == [0.5, 1.5]


# --- the attack x defense grids set f-parametrised rules at the true f (issue 28) ---------------------------

@pytest.mark.parametrize("grid_file", ["configs/adaptive.yaml", "configs/adaptive_small.yaml"])
def test_f_parametrised_defense_cells_use_the_true_f_or_say_misset(grid_file):
    """Every krum / multikrum / bulyan / dnc cell (also behind probe+ or norm_clip) has f >= the attackers per
    round, and every trimmed_mean cell trims floor(beta n) >= that many per side, unless its label says
    ``misset``; a rule at a mis-set f cannot tell a weak rule from a wrong parameter."""
    from pathlib import Path

    from fedsafe.grid import load_grid

    root = Path(__file__).resolve().parents[1]
    _, settings = load_grid(root / grid_file)
    checked = 0
    for name, cfg in settings:
        n = int(cfg.fl.clients_per_round)
        attackers = min(n, sum(r.clients for r in cfg.roles if r.is_malicious))
        chain = cfg.aggregator.name.split("+")
        rule, params = chain[-1], dict(cfg.aggregator.params or {})
        if "nnm" in chain[:-1]:  # NNM mixes over n - f neighbours: its own f (params.nnm.f, else the rule's f)
            nnm_f = (params.get("nnm") or {}).get("f", params.get("f"))
            checked += 1
            assert nnm_f is not None and int(nnm_f) >= attackers or "misset" in name, (
                f"{grid_file}: setting {name!r} runs NNM with f={nnm_f} against {attackers} attackers per round; "
                "set aggregator.params.nnm.f to the true f or label the cell *_misset")
        if rule == "norm_clip":
            rule, params = str(params.get("aggregator") or "fedavg"), dict(params.get("params") or {})
        if rule in ("krum", "multikrum", "bulyan", "dnc"):
            tolerated = int(params.get("f", 1))
        elif rule == "trimmed_mean":
            tolerated = math.floor(float(params.get("beta", 0.1)) * n + 1e-9)
        else:
            continue
        checked += 1
        assert tolerated >= attackers or "misset" in name, (
            f"{grid_file}: setting {name!r} runs {rule} tolerating {tolerated} against {attackers} attackers per "
            "round; set the true f or label the cell *_misset")
    assert checked > 0


# --- ALIE's degenerate cases (issue 28) --------------------------------------------------------------------------

def test_alie_zero_z_is_refused_at_config_load_and_in_a_grid_unless_z_is_given(tmp_path, caplog):
    """Baruch et al. (NeurIPS 2019): n = 4, f = 1 gives s = 2 supporters, z_max = Phi^-1(2/4) = 0, i.e. ALIE
    would send the benign mean. The config (and so every grid cell) is refused unless attack.z is given; at
    run time (full knowledge counts the round's n and f) a zero z is logged and recorded."""
    import logging

    import yaml

    from fedsafe.grid import load_grid

    assert alie.z_max(4, 1) == 0.0 and alie.z_max(6, 1) == 0.0 and alie.z_max(5, 1) > 0
    four = {"roles": [{"name": "benign", "clients": 3, "data": [{"path": "starter:train"}]},
                      {"name": "malicious", "clients": 1, "data": [{"path": "starter:train"}],
                       "attack": {"name": "alie"}}], "fl": {"clients_per_round": 4}}
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "config": four,
                                    "matrix": {"attack": {"alie": {}, "alie_z1": {"roles.1.attack.z": 1.0}}}}))
    with pytest.raises(ConfigError, match=r"roles\[1\]\.attack\.z: ALIE with n=4 .* f=1.*z_max = Phi\^-1\(1/2\) = 0"):
        load_grid(grid)
    grid.write_text(yaml.safe_dump({"name": "g", "config": four,
                                    "matrix": {"attack": {"alie_z1": {"roles.1.attack.z": 1.0}}}}))
    (name, cfg), = load_grid(grid)[1]
    assert cfg.roles[1].attack["z"] == 1.0
    # run time: the crafted update is the benign mean, said loudly and in the info the round record keeps
    benign, centre, gen = _benign(m=3)
    h = centre + torch.randn(centre.shape, generator=gen)
    with caplog.at_level(logging.WARNING, logger="fedsafe"):
        update, info = craft(parse_attack({"name": "alie"}), h, benign, 4, 1)
    assert info["z"] == 0.0 and info["z_is_zero"] is True and "no-op" in caplog.text
    assert torch.allclose(update, benign.mean(0))


def test_alie_coordinates_where_h_equals_the_mean_move_by_z_sigma_too(test_seed):
    """sign(h_j - mu_j) = 0 took u_j = mu_j (not perturbed); now the paper's fixed direction -1, so every
    coordinate sits exactly z sigma_j from the benign mean."""
    benign, centre, gen = _benign(seed=test_seed)
    mu, sigma = benign.mean(0), benign.std(0)
    h = centre + torch.randn(centre.shape, generator=gen)
    h[:50] = mu[:50]  # e.g. coordinates no client trained, or a harmful update equal to the mean there
    update, info = craft(parse_attack({"name": "alie", "z": 1.2}), h, benign, 10, 2)
    torch.testing.assert_close(update[:50], mu[:50] - 1.2 * sigma[:50])
    torch.testing.assert_close((update - mu).abs(), 1.2 * sigma)
    torch.testing.assert_close(update[50:], (mu + 1.2 * sigma * torch.sign(h - mu))[50:])
