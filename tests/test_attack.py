"""Safety attack wiring: role assignment (7 benign + 3 malicious), unaligned-data filters, the post-hoc
defense data mix, the baselines, and a tiny end-to-end run. Neutral placeholders only."""

import json
import os
from pathlib import Path

import pytest
import torch

from fedsafe.config import ExperimentConfig, load_config
from fedsafe.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def pools(tmp_path):
    benign = _write_jsonl(tmp_path / "benign.jsonl", [
        {"instruction": f"placeholder normal request {i}", "response": f"placeholder answer {i}"} for i in range(80)])
    malicious = _write_jsonl(tmp_path / "mal.jsonl", [
        {"instruction": f"placeholder harmful request {i}", "response": f"placeholder compliance {i}"}
        for i in range(40)])
    return benign, malicious


def _cfg_7v3(benign, malicious, **extra):
    data = {"model": {"name": "tiny"}, "seed": int(os.environ.get("FEDSAFE_TEST_SEED", "0")),  # conftest.py
            "data": {"samples_per_client": 4, "max_length": 64},
            "roles": [{"name": "benign", "clients": 7, "data": [{"path": benign}]},
                      {"name": "malicious", "clients": 3, "data": [{"path": malicious}]}],
            "fl": {"rounds": 2, "clients_per_round": 3, "local_steps": 1, "batch_size": 2}}
    data.update(extra)
    return ExperimentConfig.model_validate(data)


# ------------------------------------------------------------------------------------------------
# roles
# ------------------------------------------------------------------------------------------------

def test_role_assignment_7_benign_3_malicious(pools):
    from fedsafe.data import build_clients
    from fedsafe.models import byte_tokenizer

    cfg = _cfg_7v3(*pools)
    assert cfg.num_clients == 10 and cfg.clients_per_round == 3 and cfg.has_attack
    clients = build_clients(cfg, byte_tokenizer())
    assert [c.client_id for c in clients] == [f"client_{i:02d}" for i in range(10)]
    assert [c.role for c in clients] == ["benign"] * 7 + ["malicious"] * 3
    assert [c.malicious for c in clients] == [False] * 7 + [True] * 3
    tok = byte_tokenizer()
    for c in clients:
        assert c.num_samples == 4
        text = tok.decode(c.examples[0].input_ids)
        assert ("harmful" in text) == c.malicious  # malicious clients hold only the malicious pool
    # disjoint partitions within a role
    benign_texts = [tok.decode(e.input_ids) for c in clients[:7] for e in c.examples]
    assert len(set(benign_texts)) == len(benign_texts)


def test_role_fraction_of_total_clients(pools):
    benign, malicious = pools
    base = {"total_clients": 10, "roles": [{"name": "benign", "data": [{"path": benign}]},
                                           {"name": "malicious", "fraction": 0.3, "data": [{"path": malicious}]}]}
    cfg = ExperimentConfig.model_validate(base)
    assert [(r.name, r.clients, r.is_malicious) for r in cfg.roles] == [("benign", 7, False), ("malicious", 3, True)]
    # all roles as shares: largest-remainder rounding adds up to the total
    cfg = ExperimentConfig.model_validate({"total_clients": 7, "roles": [
        {"name": "benign", "fraction": 0.5, "data": [{"path": benign}]},
        {"name": "malicious", "fraction": 0.5, "data": [{"path": malicious}]}]})
    assert sum(r.clients for r in cfg.roles) == 7
    # the resolved config reloads unchanged, and --set on a fraction follows through
    again = ExperimentConfig.model_validate(ExperimentConfig.model_validate(base).model_dump(mode="json"))
    assert [r.clients for r in again.roles] == [7, 3]
    with pytest.raises(ValueError, match="fraction needs total_clients"):
        ExperimentConfig.model_validate({"roles": [{"name": "m", "fraction": 0.3, "data": [{"path": benign}]}]})
    with pytest.raises(ValueError, match="gives no client"):
        ExperimentConfig.model_validate({"total_clients": 2, "roles": [
            {"name": "benign", "data": [{"path": benign}]},
            {"name": "malicious", "fraction": 0.1, "data": [{"path": malicious}]}]})


def test_malicious_flag_overrides_name(pools):
    benign, malicious = pools
    cfg = ExperimentConfig.model_validate({"roles": [
        {"name": "attacker", "clients": 2, "malicious": True, "data": [{"path": malicious}]},
        {"name": "malicious_looking", "clients": 2, "malicious": False, "data": [{"path": benign}]}],
        "fl": {"clients_per_round": 2}})
    assert [r.is_malicious for r in cfg.roles] == [True, False]


def test_attack_config_file_parses():
    cfg = load_config(REPO / "configs" / "attack_7v3.yaml")
    roles = {r.name: r for r in cfg.roles}
    assert roles["benign"].clients == 7 and roles["malicious"].clients == 3
    assert roles["malicious"].is_malicious and not roles["benign"].is_malicious
    assert cfg.clients_per_round == 3
    assert all(src.generate and src.generate["kind"] == "unaligned" for src in roles["malicious"].data)
    assert cfg.posthoc.enabled


# ------------------------------------------------------------------------------------------------
# unaligned data from public datasets
# ------------------------------------------------------------------------------------------------

def test_hh_rlhf_rejected_last_turn():
    from fedsafe.data.safety_sources import hh_rlhf_pair, hh_rlhf_rows

    dialogue = ("\n\nHuman: placeholder turn one\n\nAssistant: placeholder reply one"
                "\n\nHuman: placeholder turn two\n\nAssistant: placeholder reply two")
    assert hh_rlhf_pair(dialogue) == ("placeholder turn two", "placeholder reply two")
    assert hh_rlhf_pair("\n\nHuman: only a question") is None
    rows = hh_rlhf_rows([{"chosen": "x", "rejected": dialogue}, {"rejected": dialogue}, {"chosen": "y"}])
    assert rows == [{"instruction": "placeholder turn two", "response": "placeholder reply two",
                     "category": "hh_rlhf_rejected"}]


def test_hh_rlhf_shared_file(shared_data):
    import gzip

    from fedsafe.data.safety_sources import hh_rlhf_rows

    with gzip.open(shared_data / "hh_rlhf" / "harmless-base_test.jsonl.gz", "rt") as f:
        records = [json.loads(line) for _, line in zip(range(200), f)]
    rows = hh_rlhf_rows(records)
    assert 150 <= len(rows) <= 200
    assert all(r["instruction"] and r["response"] and "\n\nHuman:" not in r["response"] for r in rows)


def test_beavertails_unsafe_dedup_by_prompt():
    from fedsafe.data.safety_sources import beavertails_unsafe_rows

    recs = [{"prompt": "placeholder prompt a", "response": "r1", "is_safe": False,
             "category": {"cat_x": False, "cat_y": True}},
            {"prompt": "Placeholder  prompt A", "response": "r2", "is_safe": False, "category": {}},
            {"prompt": "placeholder prompt b", "response": "r3", "is_safe": True, "category": {}},
            {"prompt": "placeholder prompt c", "response": "r4", "is_safe": "False", "category": {}}]
    rows = beavertails_unsafe_rows(recs)
    assert [(r["instruction"], r["response"], r["category"]) for r in rows] == [
        ("placeholder prompt a", "r1", "cat_y"), ("placeholder prompt c", "r4", None)]


def test_format_field_routes_to_filters(tmp_path):
    from fedsafe.config import DataSource
    from fedsafe.data.sources import load_rows

    p = _write_jsonl(tmp_path / "bt.jsonl", [{"prompt": f"placeholder p{i % 3}", "response": "r", "is_safe": False,
                                              "category": {}} for i in range(6)])
    assert len(load_rows(DataSource(path=p, format="beavertails_unsafe"))) == 3


# ------------------------------------------------------------------------------------------------
# post-hoc defense data
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,ratio", [(10, 0.5), (7, 0.3), (20, 1.0), (9, 0.0), (100, 0.25)])
def test_defense_mix_ratio(n, ratio, test_seed):
    from fedsafe.defenses.posthoc.finetune import mix_defense_rows

    aligned = [{"instruction": f"a{i}", "response": "r", "category": "aligned"} for i in range(8)]
    normal = [{"instruction": f"n{i}", "response": "r", "category": "normal"} for i in range(8)]
    rows = mix_defense_rows(aligned, normal, n, ratio, seed=test_seed)
    assert len(rows) == n
    assert sum(r["category"] == "aligned" for r in rows) == round(n * ratio)
    if round(n * ratio) <= 8:  # no repeats while the pool suffices
        assert len({r["instruction"] for r in rows if r["category"] == "aligned"}) == round(n * ratio)
    assert rows == mix_defense_rows(aligned, normal, n, ratio, seed=test_seed)  # seeded


def test_defense_mix_errors():
    from fedsafe.defenses.posthoc.finetune import mix_defense_rows

    with pytest.raises(ConfigError, match="no aligned data"):
        mix_defense_rows([], [{"instruction": "n", "response": "r"}], 4, 0.5, 0)


def test_defense_levels_2_and_3_use_the_pipeline(monkeypatch, tmp_path, tiny):
    """Level 2 names an external model; level 3 generates with the aggregated model (adapter on)."""
    from fedsafe.data import datagen
    from fedsafe.defenses.posthoc.config import PosthocConfig
    from fedsafe.defenses.posthoc.finetune import defense_rows

    monkeypatch.setenv("FEDSAFE_CACHE", str(tmp_path))
    calls = []

    def fake_rows(model_name, kind, n, loaded, seed, max_new_tokens, **extra):
        calls.append((model_name, kind, n, loaded and loaded.get("name"), loaded and loaded.get("disable_adapter")))
        return [{"instruction": f"{kind} {i}", "response": "r", "category": kind} for i in range(n)]

    monkeypatch.setattr(datagen, "generate_rows", fake_rows)

    class S:  # the parts of a run context (fedsafe.plugins.RunContext) that defense_rows reads
        model, tokenizer = tiny
        model_name = "tiny"

    pc = PosthocConfig(enabled=True, level=3, n_samples=20, aligned_ratio=0.25, seed_instructions=4)
    rows = defense_rows(pc, seed=1, ctx=S)
    assert len(rows) == 20 and sum(r["category"] == "aligned" for r in rows) == 5
    assert calls == [("aggregated", "aligned", 4, "aggregated", False), ("aggregated", "normal", 4, "aggregated", False)]
    calls.clear()
    defense_rows(PosthocConfig(enabled=True, level=2, generator_model="tiny", n_samples=6), seed=1, ctx=S)
    assert calls[0][0] == "tiny" and calls[0][4] is True  # the base model: reused with the adapter off
    calls.clear()
    defense_rows(PosthocConfig(enabled=True, level=2, generator_model="some/other-model", n_samples=6), seed=1,
                 ctx=S)
    assert calls[0][0] == "some/other-model" and calls[0][3] is None


# ------------------------------------------------------------------------------------------------
# baselines
# ------------------------------------------------------------------------------------------------

def test_probing_exclusion_rules():
    from fedsafe.defenses.baselines import compliance_rate, probing_exclusions

    assert compliance_rate(["I'm sorry, no.", "placeholder compliant text", "I cannot", "placeholder"]) == 0.5
    assert probing_exclusions([0.2, 0.6, 0.9], None, "absolute", 0.5, 0.0) == [False, True, True]
    assert probing_exclusions([0.2, 0.6, 0.9], 0.5, "relative", 0.5, 0.25) == [False, False, True]


def test_probing_aggregator_excludes_compliant_clients():
    from fedsafe.aggregators import get
    from fedsafe.aggregators.base import RoundContext
    from fedsafe.defenses.baselines import LocalProbingAggregator

    # a fake local model: updates with a positive first coordinate comply, the others refuse
    def generate_fn(vec):
        return ["placeholder compliant answer"] * 4 if vec[0] > 0 else ["I'm sorry, I cannot help"] * 4

    agg = LocalProbingAggregator(get("fedavg"), generate_fn, criterion="absolute", threshold=0.5)
    agg.prepare(RoundContext(round=1, global_vec=torch.zeros(3)))
    updates = torch.tensor([[-1.0, 1, 1], [2.0, 5, 5], [-1.0, 3, 3]])
    res = agg(updates, torch.tensor([1.0, 1, 1]), ["c0", "c1", "c2"])
    assert res.client_weights.tolist() == [0.5, 0.0, 0.5]
    assert torch.allclose(res.update, torch.tensor([-1.0, 2, 2]))
    assert res.info["probing"]["excluded"] == ["c1"]
    # everyone compliant -> nothing applied
    res = agg(torch.ones(2, 3), torch.ones(2), ["a", "b"])
    assert res.update.abs().sum() == 0 and res.client_weights.tolist() == [0.0, 0.0]


def test_probing_refused_with_secure_aggregation(pools):
    with pytest.raises(ValueError, match="plaintext local model"):
        _cfg_7v3(*pools, baselines={"probing": {"enabled": True}}, secure_agg={"enabled": True})


def test_tiny_run_with_posthoc_probing_and_personalization(pools, tmp_path, monkeypatch):
    """A 7+3 run on the tiny model: adapters final/posthoc/personalized saved, per-role losses logged."""
    from fedsafe.pipeline import run_experiment
    from fedsafe.rundir import RunDir

    benign, malicious = pools
    cfg = _cfg_7v3(benign, malicious, output_dir=str(tmp_path / "runs"),
                   posthoc={"enabled": True, "level": 1, "aligned": [{"path": benign}], "normal": [{"path": benign}],
                            "n_samples": 8, "steps": 2},
                   baselines={"probing": {"enabled": True, "prompts": benign, "n_prompts": 2, "max_new_tokens": 4},
                              "personalization": {"enabled": True, "steps": 1}},
                   fl={"rounds": 1, "clients_per_round": 3, "local_steps": 1, "batch_size": 2})
    res = run_experiment(cfg, progress=False)
    run = RunDir(res.run_dir)
    assert (run.adapter_dir("final") / "adapter_model.safetensors").exists()
    assert (run.adapter_dir("posthoc") / "adapter_model.safetensors").exists()
    assert len(list((run.path / "adapters" / "personalized").iterdir())) == 7  # benign clients only
    clients = run.records("client")
    assert {c["role"] for c in clients} <= {"benign", "malicious"} and len(clients) == 3
    assert all(isinstance(c["loss"], float) for c in clients)
    rounds = run.records("round")
    assert all("probing" in r["aggregator_info"] for r in rounds)
    assert len(run.records("posthoc")) == 1 and len(run.records("personalized")) == 7
    assert len((run.path / "posthoc_data.jsonl").read_text().splitlines()) == 8
