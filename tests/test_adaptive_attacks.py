"""Adaptive attacks (issue 18): each attack against its formula, distance evasion against the rule it targets,
probe evasion on the tiny model, the plug-in's partial/full knowledge paths, and config validation."""

import json
import math
import os
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
    from fedsafe.fl.client import ClientData

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


@pytest.fixture(autouse=True)
def _one_thread():
    # many tiny training steps: on a shared, oversubscribed CPU one thread is faster (as in test_probe)
    if os.environ.get("FEDSAFE_TEST_THREADS"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    from fedsafe.aggregators.base import RoundContext
    from fedsafe.attacks.adaptive.plugin import AdaptiveAttack
    from fedsafe.data.format import tokenize_rows
    from fedsafe.defenses.shadow import ShadowTrainer
    from fedsafe.fl.client import ClientData, LocalTrainer, RoundConfig
    from fedsafe.models import attach_lora, byte_tokenizer, tiny_llama
    from fedsafe.plugins import RunContext, Setup

    tok = byte_tokenizer()
    model = attach_lora(tiny_llama(tok, seed=test_seed), r=4, alpha=8, seed=test_seed)
    trainer = LocalTrainer(model, tok)
    ex = lambda rows: tokenize_rows(tok, rows, 64)  # noqa: E731
    g = trainer.flat.get()
    rc = RoundConfig(round=1, lr=5e-3, local_steps=2, batch_size=3)
    # the server's probe, fitted on its own shadows (rows no client holds)
    shadow = ShadowTrainer(trainer, ex(_rows("benign", 40, 5000)), ex(_rows("malicious", 40, 5000)),
                           benign_shadows=3, malicious_shadows=3, samples_per_shadow=6, steps=2, seed=test_seed)
    probe = aggregators.get("probe")
    probe.prepare(RoundContext(round=1, global_vec=g, round_config=rc, shadow=shadow))
    clients = [ClientData(f"client_0{i}", "malicious" if i >= 3 else "benign",
                          ex(_rows("malicious" if i >= 3 else "benign", 6, 1000 + 10 * i)), i >= 3) for i in range(6)]
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

    def probability(res):
        out = probe(torch.stack([r.update for r in res]), torch.full((6,), 6.0), [c.client_id for c in clients])
        return [out.info["probe"]["probability"][c.client_id] for c in clients[3:]], out

    plain_p, _ = probability(results)
    evaded_p, out = probability(evaded)
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
                             ({"name": "probe_evasion", "shadows": 1}, r"roles\.1\.attack: shadows")):
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
              "cosine": [[1, 0.9, 0.1], [0.9, 1, 0.2], [0.1, 0.2, 1]],
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
