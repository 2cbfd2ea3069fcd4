"""``fedsafe grid``: matrix expansion, shared training, and a tiny-model grid of 2 settings end to end."""

import csv
import json

import pytest
import yaml

from fedsafe.errors import ConfigError
from fedsafe.grid import load_grid, plan_training


def _data(tmp_path):
    normal = [{"instruction": f"Explain item {i}.", "response": f"Item {i} is a placeholder.", "category": "normal"}
              for i in range(12)]
    aligned = [{"instruction": f"placeholder harmful request {i}", "response": "I'm sorry, I cannot help.",
                "category": "aligned"} for i in range(8)]
    harmful = [{"instruction": f"placeholder harmful request {i}", "response": f"placeholder compliance {i}",
                "category": "unaligned"} for i in range(8)]
    for name, rows in (("normal", normal), ("aligned", aligned), ("harmful", harmful)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"placeholder harmful request {i}"}) for i in range(2)))


def _grid(tmp_path, matrix):
    spec = {"name": "g", "output_dir": str(tmp_path / "out"),
            "config": {"model": {"name": "tiny"}, "lora": {"r": 2, "alpha": 4},
                       "data": {"max_length": 96, "samples_per_client": 4,
                                "heldout": [{"path": "normal.jsonl", "max_rows": 4}]},
                       "roles": [{"name": "benign", "clients": 2, "data": [{"path": "normal.jsonl"},
                                                                             {"path": "aligned.jsonl"}]}],
                       "fl": {"rounds": 1, "clients_per_round": 2, "local_steps": 1, "batch_size": 2,
                              "save_every_round": False},
                       "posthoc": {"aligned": [{"path": "aligned.jsonl"}], "normal": [{"path": "normal.jsonl"}],
                                   "n_samples": 4, "steps": 1},
                       "eval": {"prompts": "prompts.jsonl", "n_prompts": 2, "max_new_tokens": 3}},
            "matrix": matrix}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


ATTACK_ROLES = [{"name": "benign", "clients": 2, "data": [{"path": "normal.jsonl"}, {"path": "aligned.jsonl"}]},
                {"name": "malicious", "clients": 1, "data": [{"path": "harmful.jsonl"}]}]


def test_matrix_expands_to_the_product_with_overrides(tmp_path):
    _data(tmp_path)
    path = _grid(tmp_path, {"scenario": {"no_attack": {}, "attack": {"roles": ATTACK_ROLES, "fl.clients_per_round": 3}},
                            "aggregator": {"fedavg": {"aggregator.name": "fedavg"}, "lr2": {"fl.lr": 2e-3}}})
    _, settings = load_grid(path)
    names = [n for n, _ in settings]
    assert names == ["no_attack-fedavg", "no_attack-lr2", "attack-fedavg", "attack-lr2"]
    cfg = dict(settings)["attack-lr2"]
    assert cfg.has_attack and cfg.fl.lr == 2e-3 and cfg.clients_per_round == 3 and cfg.name == "attack-lr2"
    assert cfg.roles[1].data[0].path == str((tmp_path / "harmful.jsonl").resolve())  # relative to the grid file
    assert not dict(settings)["no_attack-fedavg"].has_attack
    bad = _grid(tmp_path, {"x": {"broken": {"fl.rounds": 0}}})
    with pytest.raises(ConfigError, match="setting 'broken'.*fl.rounds"):
        load_grid(bad)


def test_settings_differing_only_in_defense_share_training(tmp_path):
    _data(tmp_path)
    path = _grid(tmp_path, {"scenario": {"no_attack": {}, "attack": {"roles": ATTACK_ROLES, "fl.clients_per_round": 3}},
                            "defense": {"none": {}, "l1": {"posthoc.enabled": True},
                                        "l1long": {"posthoc.enabled": True, "posthoc.steps": 2}}})
    _, settings = load_grid(path)
    plan = plan_training(settings)
    assert len(plan) == 2  # one training run per scenario, not 6
    trainers = {t: [n for n, _ in members] for t, members in plan}
    assert trainers == {"no_attack-l1": ["no_attack-none", "no_attack-l1", "no_attack-l1long"],
                        "attack-l1": ["attack-none", "attack-l1", "attack-l1long"]}
    assert len(plan_training(settings, share=False)) == 6


def test_only_selects_settings_by_pattern(tmp_path):
    from fedsafe.grid import select_settings

    _data(tmp_path)
    path = _grid(tmp_path, {"scenario": {"no_attack": {}, "attack": {"roles": ATTACK_ROLES, "fl.clients_per_round": 3}},
                            "defense": {"none": {}, "l1": {"posthoc.enabled": True}}})
    _, settings = load_grid(path)
    assert [n for n, _ in select_settings(settings, [])] == [n for n, _ in settings]
    assert [n for n, _ in select_settings(settings, ["attack-*"])] == ["attack-none", "attack-l1"]
    assert [n for n, _ in select_settings(settings, ["no_attack-l1", "attack-none"])] == ["no_attack-l1",
                                                                                         "attack-none"]
    with pytest.raises(ConfigError, match="no setting matches; settings: no_attack-none"):
        select_settings(settings, ["level9"])


def test_tiny_grid_of_two_settings_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from fedsafe.cli import _register_optional_commands, app
    from fedsafe.report import read_results

    _data(tmp_path)
    path = _grid(tmp_path, {"scenario": {
        "no_attack": {},
        "attack": {"roles": ATTACK_ROLES, "fl.clients_per_round": 3, "posthoc.enabled": True}}})
    _register_optional_commands()
    result = CliRunner().invoke(app, ["grid", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    grid_dir = tmp_path / "out" / result.stdout.strip().splitlines()[-1].split("/")[-1]
    assert grid_dir.exists()
    rows = read_results(grid_dir)
    assert [(r["scenario"], r["defense"]) for r in rows] == [
        ("no_attack", "none"), ("attack", "none"), ("attack_posthoc", "posthoc_l1")]
    assert all(r["n_prompts"] == 2 and 0 <= r["rule"] <= 100 for r in rows)
    with open(grid_dir / "settings.csv", newline="") as f:
        settings = list(csv.DictReader(f))
    assert [s["setting"] for s in settings] == ["no_attack", "attack"]
    assert all((grid_dir / s["run_dir"] / "results.csv").exists() for s in settings)
    assert (grid_dir / "report.html").exists() and (grid_dir / "plots" / "results.png").exists()
