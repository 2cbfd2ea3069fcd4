"""``fedsafe grid``: matrix expansion, shared training, and a tiny-model grid of 2 settings end to end."""

import csv
import json

import pytest
import torch
import yaml

import fedsafe.plugins as plugins
from fedsafe.errors import ConfigError
from fedsafe.grid import load_grid, plan_training
from fedsafe.schema import Strict


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
                       "eval": {"prompts": "prompts.jsonl", "n_prompts": 2, "max_new_tokens": 3,
                                "n_normal_prompts": 3}},
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


def test_grid_table_shows_over_refusal_next_to_rule(tmp_path, monkeypatch):
    """With generations under the test's control, over-refusal = 100 * refused benign prompts / benign prompts."""
    from rich.console import Console
    from typer.testing import CliRunner

    import fedsafe.grid
    from fedsafe import generation
    from fedsafe.cli import _register_optional_commands, app
    from fedsafe.evaluation.runner import load_benign_prompts
    from fedsafe.report import read_outcomes, read_results

    _data(tmp_path)
    path = _grid(tmp_path, {"scenario": {"no_attack": {}}})
    refused = {load_benign_prompts("starter:heldout")[1], "placeholder harmful request 0"}
    monkeypatch.setattr(generation, "generate", lambda model, tok, prompts, **kw: [
        "I'm sorry, I cannot help with that." if p in refused else "Sure, here it is." for p in prompts])
    console = Console(record=True, width=250)
    monkeypatch.setattr(fedsafe.grid, "console", console)
    _register_optional_commands()
    result = CliRunner().invoke(app, ["grid", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    grid_dir = tmp_path / "out" / result.stdout.strip().splitlines()[-1].split("/")[-1]
    (row,) = read_results(grid_dir)
    assert row["rule"] == pytest.approx(100 * 1 / 2)
    assert row["over_refusal"] == pytest.approx(100 * 1 / 3, abs=1e-3)  # results.csv keeps 6 digits
    assert row["n_normal_prompts"] == 3
    (outcome,) = read_outcomes(grid_dir)
    assert outcome["over_refusal"] == [0.0, 100.0, 0.0] and outcome["over_refusal_prompt_ids"] == [0, 1, 2]
    with open(grid_dir / "summary.csv", newline="") as f:
        (s,) = list(csv.DictReader(f))
    assert float(s["over_refusal_mean"]) == pytest.approx(100 / 3, abs=1e-3)
    text = console.export_text()
    assert text.index("Rule (%)") < text.index("Over-refusal (%)") and "33.3" in text


def test_parse_and_resolve_seeds(tmp_path):
    from fedsafe.grid import parse_seeds, resolve_seeds

    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("0,4,7") == [0, 4, 7] and parse_seeds("5,") == [5]
    for bad in ("0", "a", "1,1"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    _data(tmp_path)
    spec, settings = load_grid(_grid(tmp_path, {"scenario": {"no_attack": {}}}))
    resolved, per_seed = resolve_seeds(spec, settings)
    assert resolved[0][1].seeds == [0] and not per_seed  # one seed, as before: run dirs keep their names
    resolved, per_seed = resolve_seeds(spec, settings, [3, 4])
    assert resolved[0][1].seeds == [3, 4] and per_seed
    spec_seeds = spec.model_copy(update={"seeds": [1, 2]})
    assert resolve_seeds(spec_seeds, settings)[0][0][1].seeds == [1, 2]
    # seeds in the experiment config (as in a run config file)
    _, settings = load_grid(_grid(tmp_path, {"scenario": {"no_attack": {"seeds": [5, 6]}}}))
    assert resolve_seeds(spec, settings)[0][0][1].seeds == [5, 6]
    with pytest.raises(ConfigError, match="seeds"):
        load_grid(_grid(tmp_path, {"scenario": {"no_attack": {"seeds": [1, 1]}}}))


def _runs_of(grid_dir):
    return sorted(p.name.rsplit("-", 2)[0] for p in (grid_dir / "runs").iterdir())


def test_tiny_grid_with_seeds_then_resume_skips_finished_seeds(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import fedsafe.pipeline
    from fedsafe.cli import _register_optional_commands, app
    from fedsafe.report import read_outcomes, read_results

    _data(tmp_path)
    path = _grid(tmp_path, {"scenario": {
        "no_attack": {},
        "attack": {"roles": ATTACK_ROLES, "fl.clients_per_round": 3, "posthoc.enabled": True}}})
    spec = yaml.safe_load(path.read_text())
    spec["config"]["eval"].update({"base": True, "n_prompts": 3})
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"placeholder harmful request {i}"}) for i in range(4)))
    trained = []
    real = fedsafe.pipeline.run_experiment
    monkeypatch.setattr(fedsafe.pipeline, "run_experiment",
                        lambda cfg=None, **kw: trained.append(cfg.seed if cfg else "resumed") or real(cfg, **kw))
    _register_optional_commands()
    runner = CliRunner()
    # seed 0 only, then resume with two seeds: only seed 1 is trained the second time
    result = runner.invoke(app, ["grid", str(path), "--seeds", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    grid_dir = tmp_path / "out" / result.stdout.strip().splitlines()[-1].split("/")[-1]
    assert trained == [0, 0] and _runs_of(grid_dir) == ["attack-s0", "no_attack-s0"]
    result = runner.invoke(app, ["grid", str(path), "--seeds", "2", "--resume", str(grid_dir), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert trained == [0, 0, 1, 1]
    assert _runs_of(grid_dir) == ["attack-s0", "attack-s1", "no_attack-s0", "no_attack-s1"]

    rows = read_results(grid_dir)
    assert sorted((r["scenario"], r["seed"]) for r in rows) == sorted(
        (s, seed) for s in ("base", "no_attack", "attack", "attack_posthoc") for seed in (0, 1))
    outcomes = read_outcomes(grid_dir)
    assert len(outcomes) == len(rows) and all(o["prompt_ids"] == [0, 1, 2] and len(o["rule"]) == 3 for o in outcomes)
    with open(grid_dir / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [(s["scenario"], s["n_seeds"], s["seeds"]) for s in summary] == [
        ("base", "2", "0 1"), ("no_attack", "2", "0 1"), ("attack", "2", "0 1"), ("attack_posthoc", "2", "0 1")]
    for s in summary:
        assert float(s["rule_ci_low"]) <= float(s["rule_mean"]) <= float(s["rule_ci_high"])
        assert float(s["over_refusal_ci_low"]) <= float(s["over_refusal_mean"]) <= float(s["over_refusal_ci_high"])
        assert s["helpfulness_proxy_std"] != ""
    assert all(o["over_refusal_prompt_ids"] == [0, 1, 2] and len(o["over_refusal"]) == 3 for o in outcomes)
    assert all(r["n_normal_prompts"] == 3 and 0 <= r["over_refusal"] <= 100 for r in rows)
    with open(grid_dir / "comparisons.csv", newline="") as f:
        pairs = {(r["compared"], r["reference"]) for r in csv.DictReader(f)}
    assert pairs == {("attack", "no_attack"), ("attack_posthoc", "attack")}
    with open(grid_dir / "settings.csv", newline="") as f:
        assert [(r["setting"], r["seed"]) for r in csv.DictReader(f)] == [
            ("no_attack", "0"), ("attack", "0"), ("no_attack", "1"), ("attack", "1")]
    # the seed drives training: the same setting's seeds see different first rounds
    losses = {}
    for run in (grid_dir / "runs").iterdir():
        first = next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                     if json.loads(line).get("type") == "round")
        losses[run.name.rsplit("-", 2)[0]] = first["mean_loss"]
        assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == int(run.name.rsplit("-", 2)[0][-1])
    assert losses["attack-s0"] != losses["attack-s1"]
    # one shared generation cache: the base model (all LoRA B = 0) is evaluated once per seed, not per setting
    # (two prompt sets each: the harmful prompts and the benign ones of over-refusal)
    assert len(list((grid_dir / "cache" / "generations").glob("base-*.json"))) == 2 * 2
    # a changed grid is not resumed silently
    result = runner.invoke(app, ["grid", str(path), "--seeds", "2", "--resume", str(grid_dir), "--no-progress",
                                 "--set", "fl.lr=0.01"])
    assert result.exit_code != 0 and "differs from the one run" in str(result.exception)


def test_run_with_seeds_is_a_grid_of_one_setting(tmp_path):
    from typer.testing import CliRunner

    from fedsafe.cli import _register_optional_commands, app

    _data(tmp_path)
    spec = yaml.safe_load(_grid(tmp_path, {}).read_text())
    cfg = {**spec["config"], "name": "one", "output_dir": str(tmp_path / "out"), "seeds": [3, 4]}
    cfg["eval"]["n_prompts"] = 2
    for src in cfg["roles"][0]["data"] + cfg["posthoc"]["aligned"] + cfg["posthoc"]["normal"] + cfg["data"]["heldout"]:
        src["path"] = str(tmp_path / src["path"])
    cfg["eval"]["prompts"] = str(tmp_path / "prompts.jsonl")
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(cfg))
    _register_optional_commands()
    result = CliRunner().invoke(app, ["run", str(tmp_path / "one.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    grid_dir = tmp_path / "out" / result.stdout.strip().splitlines()[-1].split("/")[-1]
    assert _runs_of(grid_dir) == ["one-s3", "one-s4"]
    with open(grid_dir / "summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["setting"], row["n_seeds"], row["seeds"]) == ("one", "2", "3 4")
    # grid.yaml holds the experiment, so the repeated run can be resumed as a grid
    _, settings = load_grid(grid_dir / "grid.yaml")
    assert settings[0][1].seeds == [3, 4] and settings[0][1].fl.rounds == 1


def test_partitions_and_attack_data_follow_the_experiment_seed(monkeypatch):
    from fedsafe.data import datagen
    from fedsafe.config import ExperimentConfig
    from fedsafe.data import build_clients
    from fedsafe.models import byte_tokenizer

    asked = []

    def fake_generate_rows(model_name, kind, n, loaded=None, **kw):  # records the seed datagen is given
        asked.append(kw["seed"])
        return [{"instruction": f"placeholder request {i} {kw['seed']}", "response": f"placeholder answer {i}"}
                for i in range(n)]

    monkeypatch.setattr(datagen, "generate_rows", fake_generate_rows)
    roles = [{"name": "benign", "clients": 2, "data": [{"path": "starter:train"}]},
             {"name": "malicious", "clients": 1, "data": [{"generate": {"kind": "unaligned", "n": 8}}]},
             {"name": "fixed", "clients": 1, "malicious": True,
              "data": [{"generate": {"kind": "unaligned", "n": 8, "seed": 42}}]}]
    tok = byte_tokenizer()
    clients = {}
    for seed in (0, 1):
        cfg = ExperimentConfig(seed=seed, roles=roles, data={"samples_per_client": 4, "max_length": 64})
        clients[seed] = build_clients(cfg, tok)
    assert asked[0] != asked[2] and asked[1] == asked[3] == 42  # explicit generate.seed wins
    benign = {s: [ex.input_ids.tolist() for ex in cs[0].examples] for s, cs in clients.items()}
    assert benign[0] != benign[1]  # the partition follows the seed


def test_grid_checks_every_setting_before_its_directory_exists(tmp_path):
    """Issue 30: a missing file of one setting fails the grid before anything is made; issue 29: so does an
    over-refusal set that a setting trains on."""
    from fedsafe.grid import run_grid

    _data(tmp_path)
    path = _grid(tmp_path, {"scenario": {"ok": {}, "broken": {"eval.prompts": str(tmp_path / "gone.jsonl")}}})
    spec, settings = load_grid(path)
    with pytest.raises(Exception, match="gone.jsonl"):
        run_grid(spec, settings, progress=False)
    assert not (tmp_path / "out").exists()
    path = _grid(tmp_path, {"scenario": {"leaky": {"eval.normal_prompts": str(tmp_path / "normal.jsonl")}}})
    spec, settings = load_grid(path)
    with pytest.raises(ConfigError, match=r"eval\.normal_prompts: 3 of 3 prompts .* roles\[0\]\.data\[0\]"):
        run_grid(spec, settings, progress=False)
    assert not (tmp_path / "out").exists()


class _HalveConfig(Strict):
    """Section of the test's after-training defense."""

    enabled: bool = False
    factor: float = 0.5


class _Halve(plugins.Plugin):
    """A defense that only scales the final adapter: declared after-training-only, so the grid shares training."""

    name = "test_halve"
    section = "test_halve"
    Config = _HalveConfig
    after_training_only = True

    @classmethod
    def defense_label(cls, config):
        return f"halved_{config.factor}"

    def after_training(self, final_vec):
        return [plugins.Output("halved", final_vec * self.config.factor, defense=self.defense_label(self.config))]


@pytest.fixture
def halve():
    plugins.register(_Halve)
    yield _Halve
    plugins._REGISTRY.pop(_Halve.name, None)
    plugins._CLASSES.pop(_Halve.name, None)


def test_grid_replays_any_after_training_defense_through_its_hooks(tmp_path, halve):
    """The grid knows no defense by name: a (third-party) plug-in declaring ``after_training_only`` makes its
    settings share one training, and a second level replays its after_training hook on the trained run's final
    adapter (fedsafe.pipeline.defend_trained); each defended row names the scenario it defends."""
    from safetensors.torch import load_file

    from fedsafe.grid import run_grid
    from fedsafe.report import read_results

    _data(tmp_path)
    path = _grid(tmp_path, {"defense": {"none": {}, "half": {"test_halve.enabled": True},
                                        "quarter": {"test_halve.enabled": True, "test_halve.factor": 0.25}}})
    spec, settings = load_grid(path)
    plan = plan_training(settings)
    assert [(t, [n for n, _ in members]) for t, members in plan] == [("half", ["none", "half", "quarter"])]
    grid_dir = run_grid(spec, settings, progress=False)
    with open(grid_dir / "settings.csv", newline="") as f:
        where = {r["setting"]: grid_dir / r["run_dir"] for r in csv.DictReader(f)}
    assert where["none"] == where["half"] != where["quarter"]

    def adapter(run, tag):
        t = load_file(str(run / "adapters" / tag / "adapter_model.safetensors"))
        return {k: t[k] for k in sorted(t)}

    final, quarter = adapter(where["half"], "final"), adapter(where["quarter"], "halved")
    assert not (where["quarter"] / "adapters" / "final").exists()  # nothing was trained again
    assert set(quarter) == set(final) and all(torch.equal(quarter[k], final[k] * 0.25) for k in final)
    assert all(torch.equal(adapter(where["half"], "halved")[k], final[k] * 0.5) for k in final)
    shared = [json.loads(x) for x in (where["quarter"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["trained_run"] for r in shared if r["type"] == "shared_training"] == [str(where["half"])]
    rows = read_results(grid_dir)
    assert [(r["setting"], r["scenario"], r["defense"], r["defends"]) for r in rows] == [
        ("none", "no_attack", "none", ""), ("half", "no_attack_posthoc", "halved_0.5", "no_attack"),
        ("quarter", "no_attack_posthoc", "halved_0.25", "no_attack")]
