"""Stealth analysis: per-round figures from round records, the three PNG plots, and compare weights logged
by a real (tiny) federated run."""

import json
import math

import pytest
import torch

from fedsafe.evaluation import stealth
from fedsafe.fl.update_ops import cosine_matrix


def _record(rnd, weights, compare=None, cosine=True):
    clients = ["b0", "b1", "m0", "b2"]
    malicious = [False, False, True, False]
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.2], [1.0, 0.1]])
    return {"type": "round", "round": rnd, "clients": clients, "malicious": malicious,
            "roles": ["benign", "benign", "unaligned", "benign"], "aggregator": "median",
            "client_weights": weights, "compare_weights": compare or {},
            "cosine": cosine_matrix(x).tolist() if cosine else None}


def test_cosine_matrix_formula():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    c = cosine_matrix(x)
    assert c[0, 1].item() == pytest.approx(1 / math.sqrt(2))
    assert c[2].tolist() == [0.0, 0.0, 0.0]


def test_round_stealth_figures():
    rec = _record(1, [0.25, 0.25, 0.4, 0.1], compare={"krum(f=1)": [1.0, 0, 0, 0], "bulyan(f=1)": None})
    s = stealth.round_stealth(rec)
    assert s["malicious_weight"] == {"median": pytest.approx(0.4), "krum(f=1)": 0.0}  # refused rule left out
    assert s["malicious_share_of_clients"] == 0.25
    cos = rec["cosine"]
    assert s["cos_benign_malicious"] == pytest.approx(sum(cos[i][2] for i in (0, 1, 3)) / 3)
    assert s["cos_malicious_malicious"] is None  # a single malicious client has no pair
    assert stealth.malicious_weight_fraction([0, 0], [True, False]) != stealth.malicious_weight_fraction([0, 0], [True, False])  # NaN


def test_plot_stealth_writes_three_pngs(tmp_path):
    recs = [_record(1, [0.3, 0.3, 0.1, 0.3], {"foolsgold": [0.2, 0.2, 0.4, 0.2]}),
            _record(2, [0.25, 0.25, 0.0, 0.5], {"foolsgold": [0.3, 0.3, 0.1, 0.3]}, cosine=False)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    paths = stealth.plot_stealth(tmp_path)
    assert [p.name for p in paths] == ["stealth_similarity.png", "stealth_weights.png",
                                       "stealth_malicious_weight.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]  # no temp files left
    assert stealth.main([str(tmp_path)]) == 0


def test_role_order_puts_malicious_last():
    assert stealth._role_order(_record(1, [0.25] * 4)) == [0, 1, 3, 2]


def test_compare_weights_logged_by_a_tiny_run(tmp_path, test_seed):
    from fedsafe.config import load_config
    from fedsafe.pipeline import run_experiment

    cfg = load_config(None, [
        "model.name=tiny", f"seed={test_seed}", f"output_dir={tmp_path}", "name=s", "fl.rounds=2", "fl.local_steps=1",
        "fl.batch_size=2", "data.samples_per_client=4", "data.max_length=96", "roles.0.clients=4",
        "fl.clients_per_round=4", "aggregator.name=median", "eval.helpfulness_proxy=false",
        "aggregator.compare=[foolsgold, {name: krum, params: {f: 0}}, {name: krum, params: {f: 1}}]"])
    res = run_experiment(cfg, progress=False)
    rounds = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "round"]
    assert len(rounds) == 2
    for r in rounds:
        cw = r["compare_weights"]
        assert set(cw) == {"foolsgold", "krum(f=0)", "krum(f=1)"}
        assert cw["krum(f=1)"] is None  # 4 clients <= 2*1+2: refused, the round goes on
        assert sorted(cw["krum(f=0)"]) == [0.0, 0.0, 0.0, 1.0]
        assert sum(cw["foolsgold"]) == pytest.approx(1.0, abs=1e-5) or sum(cw["foolsgold"]) == 0
        assert sum(r["client_weights"]) == pytest.approx(1.0, abs=1e-5)
    assert len(stealth.plot_stealth(res.run_dir)) == 3


def test_compare_entry_errors_name_the_field():
    from fedsafe import aggregators
    from fedsafe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"aggregator.compare\[1\]"):
        aggregators.compare_rules(["median", {"name": "nope"}])
