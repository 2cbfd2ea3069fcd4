"""Reports from a synthetic run directory: results.csv columns, the paper-layout table, inline plots."""

import csv
import json
import re

import pytest

from fedsafe.config import ExperimentConfig, dump_config
from fedsafe.report import RESULT_COLUMNS, append_results, read_results, results_table, write_report


def _synthetic_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(ExperimentConfig(name="synthetic")))
    recs = []
    for rnd in (1, 2, 3):
        recs.append({"type": "round", "round": rnd, "mean_loss": 2.0 / rnd, "client_weights": [0.5, 0.5],
                     "clients": ["client_00", "client_01"], "roles": ["benign", "malicious"],
                     "malicious": [False, True], "cosine": [[1.0, 0.2], [0.2, 1.0]], "aggregator": "fedavg"})
        for cid, role, mal, loss in (("client_00", "benign", False, 1.0 / rnd), ("client_01", "malicious", True, 3.0 / rnd)):
            recs.append({"type": "client", "round": rnd, "client_id": cid, "role": role, "malicious": mal,
                         "aggregation_weight": 0.5, "loss": loss})
        recs.append({"type": "eval", "round": rnd, "scenario": "attack", "method": "fedavg", "defense": "none",
                     "rule": 90.0 - 30 * rnd})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return run


def test_results_csv_columns_and_empty_cells(tmp_path):
    run = _synthetic_run(tmp_path)
    append_results(run, [{"scenario": "attack", "method": "fedavg", "defense": "none", "rule": 25.0,
                          "helpfulness_proxy": 7.5, "n_prompts": 48}])
    append_results(run, [{"scenario": "attack_posthoc", "method": "fedavg", "defense": "posthoc_l1",
                          "rule": 93.75, "judge": None, "helpfulness_proxy": 7.9, "n_prompts": 48}])
    with open(run / "results.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert header == RESULT_COLUMNS == ["scenario", "method", "defense", "rule", "judge", "rm", "mt1",
                                        "helpfulness_proxy", "n_prompts"]
    assert body[0] == ["attack", "fedavg", "none", "25", "", "", "", "7.5", "48"]
    rows = read_results(run)
    assert [r["scenario"] for r in rows] == ["attack", "attack_posthoc"]
    assert rows[1]["rule"] == pytest.approx(93.75) and rows[1]["judge"] is None


def test_table_has_only_measured_columns():
    rows = [{"scenario": "s", "method": "fedavg", "defense": "none", "rule": 50.0, "judge": None, "rm": None,
             "mt1": 6.25, "helpfulness_proxy": None, "n_prompts": 4}]
    header, body = results_table(rows)
    assert header == ["Scenario", "Method", "Defense", "Rule (%) ↑", "MT-1 ↑", "Prompts"]
    assert body == [["s", "fedavg", "none", "50.0", "6.25", "4"]]


def test_report_from_synthetic_run(tmp_path):
    run = _synthetic_run(tmp_path)
    append_results(run, [{"scenario": "attack", "method": "fedavg", "defense": "none", "rule": 0.0,
                          "helpfulness_proxy": 7.5, "n_prompts": 48},
                         {"scenario": "attack_posthoc", "method": "fedavg", "defense": "posthoc_l1",
                          "rule": 93.75, "helpfulness_proxy": 7.9, "n_prompts": 48}])
    md_path, html_path = write_report(run)
    md = md_path.read_text()
    assert "| attack_posthoc | fedavg | posthoc_l1 | 93.8 | 7.90 | 48 |" in md
    assert "Judge" not in md.split("## Plots")[0]  # not measured: no column
    for name in ("results", "loss", "safety", "weights"):
        assert (run / "plots" / f"{name}.png").exists()
        assert f"plots/{name}.png" in md
    assert "Stealth" in md  # fedsafe.evaluation.stealth plots are included when the module is there
    html = html_path.read_text()
    imgs = re.findall(r"<img [^>]*src='([^']+)'", html)
    assert len(imgs) >= 4 and all(src.startswith("data:image/png;base64,") for src in imgs)
    assert "synthetic" in html and "93.8" in html


def test_report_with_no_results_yet(tmp_path):
    run = _synthetic_run(tmp_path)
    md_path, _ = write_report(run)
    assert "No evaluation results yet" in md_path.read_text()
