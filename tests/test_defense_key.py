"""``defense: probe_posthoc``: a named defense expands at load into exactly the keys of its preset, from YAML,
``--set`` and a grid's matrix; conflicting keys and unknown names or fields are refused naming the field."""

import json

import pytest
import yaml

from fedsafe.config import ExperimentConfig, dump_config, load_config
from fedsafe.defenses.presets.probe_posthoc import apply, preset
from fedsafe.errors import ConfigError


def _yaml(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _by_hand(**options) -> list[str]:
    """The preset's keys as ``--set`` overrides, the way a user would type them."""
    return [f"{key}={json.dumps(value)}" for key, value in preset(**options).items()]


def test_string_and_mapping_forms_equal_the_hand_set_preset(tmp_path):
    plain = load_config(_yaml(tmp_path, {"defense": "probe_posthoc"}))
    assert plain.model_dump() == load_config(None, _by_hand()).model_dump()
    assert (plain.aggregator.name, plain.probe.decision, plain.posthoc.enabled, plain.posthoc.level) == \
        ("probe", "gap", True, 1)  # the defaults: decision gap, the probe alone, level 1
    assert plain.defense == {"name": "probe_posthoc", "decision": "gap", "rule": None, "level": 1}

    spec = {"name": "probe_posthoc", "decision": "mad", "rule": "median", "level": 2}
    mapped = load_config(_yaml(tmp_path, {"defense": spec}))
    assert mapped.model_dump() == load_config(None, _by_hand(decision="mad", rule="median", level=2)).model_dump()
    assert (mapped.aggregator.name, mapped.probe.decision, mapped.posthoc.level) == ("probe+median", "mad", 2)
    # the Python API builds the same object, and so does the preset applied to a mapping
    assert ExperimentConfig.model_validate({"defense": spec}).model_dump() == mapped.model_dump()
    assert ExperimentConfig.model_validate(apply({}, decision="mad", rule="median", level=2)).model_dump() == \
        mapped.model_dump()
    # other sections of the file are kept, and rule fedavg is the probe alone
    other = load_config(_yaml(tmp_path, {"defense": {"name": "probe_posthoc", "rule": "fedavg"},
                                         "fl": {"rounds": 5}, "posthoc": {"steps": 7}}))
    assert (other.aggregator.name, other.fl.rounds, other.posthoc.steps, other.posthoc.enabled) == ("probe", 5, 7, True)


def test_set_override_path(tmp_path):
    assert load_config(None, ["defense=probe_posthoc"]).model_dump() == load_config(None, _by_hand()).model_dump()
    got = load_config(None, ["defense={name: probe_posthoc, rule: trimmed_mean}", "aggregator.params={beta: 0.25}",
                             "fl.clients_per_round=4"])
    assert got.aggregator.name == "probe+trimmed_mean"
    assert got.model_dump() == load_config(None, [*_by_hand(rule="trimmed_mean"),
                                                  "aggregator.params={beta: 0.25}",
                                                  "fl.clients_per_round=4"]).model_dump()
    # the dump that --set starts from holds every default (aggregator.name fedavg, posthoc.enabled false):
    # defaults are not the user's choice, so they are no conflict
    file_with_defaults = _yaml(tmp_path, {"fl": {"rounds": 2}})
    assert load_config(file_with_defaults, ["defense=probe_posthoc"]).aggregator.name == "probe"
    # a file's defense, changed by --set: the keys its first expansion set follow the new options
    path = _yaml(tmp_path, {"defense": "probe_posthoc", "fl": {"rounds": 2}})
    changed = load_config(path, ["defense.rule=median", "defense.level=2", "fl.lr=0.001"])
    assert (changed.aggregator.name, changed.posthoc.level, changed.fl.rounds, changed.fl.lr) == \
        ("probe+median", 2, 2, 0.001)
    assert changed.model_dump() == load_config(None, [*_by_hand(rule="median", level=2), "fl.rounds=2",
                                                      "fl.lr=0.001"]).model_dump()
    # and switched off: its keys take their defaults again
    off = load_config(path, ["defense=null"])
    assert off.model_dump() == load_config(None, ["fl.rounds=2"]).model_dump() and off.defense is None


@pytest.mark.parametrize("data, overrides, key, theirs", [
    ({"defense": "probe_posthoc", "aggregator": {"name": "krum"}}, [], "aggregator.name", '"krum"'),
    # posthoc.enabled: false is the default value, but the file says it: refused, not silently turned on
    ({"defense": "probe_posthoc", "posthoc": {"enabled": False}}, [], "posthoc.enabled", "false"),
    ({"defense": {"name": "probe_posthoc", "decision": "gap"}, "probe": {"decision": "fpr"}}, [], "probe.decision",
     '"fpr"'),
    ({"defense": "probe_posthoc"}, ["aggregator.name=krum"], "aggregator.name", '"krum"'),
    ({"defense": "probe_posthoc"}, ["posthoc.level=2"], "posthoc.level", "2"),
    ({}, ["posthoc.enabled=false", "defense=probe_posthoc"], "posthoc.enabled", "false"),
    ({"aggregator": {"name": "median"}}, ["defense=probe_posthoc"], "aggregator.name", '"median"'),
])
def test_conflicting_keys_are_refused_naming_both(tmp_path, data, overrides, key, theirs):
    path = _yaml(tmp_path, data) if data else None
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert f"defense: probe_posthoc sets {key}=" in message and f"also sets {key}={theirs}" in message, message


def test_keys_that_agree_with_the_defense_are_accepted(tmp_path):
    same = {"defense": {"name": "probe_posthoc", "rule": "median"}, "aggregator": {"name": "probe+median"},
            "posthoc": {"enabled": True, "level": 1}, "probe": {"decision": "gap"}}
    assert load_config(_yaml(tmp_path, same)).model_dump() == load_config(None, _by_hand(rule="median")).model_dump()
    assert load_config(None, ["posthoc.enabled=true", "defense=probe_posthoc"]).posthoc.enabled


@pytest.mark.parametrize("override, needle", [
    ("defense=nope", "defense: unknown defense 'nope'; choose one of: probe_posthoc"),
    ("defense=3", "defense: give a defense name (probe_posthoc)"),
    ("defense={name: probe_posthoc, foo: 1}", "defense.foo: unknown field; probe_posthoc takes decision, rule, level"),
    ("defense={name: probe_posthoc, decision: vote}",
     "defense.decision: must be one of fixed, fpr, mad, gap, calibrated"),
    ("defense={name: probe_posthoc, rule: probe}", "defense.rule: must be a rule to put the probe in front of"),
    ("defense={name: probe_posthoc, rule: nosuchrule}", "defense.rule: must be a rule"),
    ("defense={name: probe_posthoc, level: 4}", "defense.level:"),
    ("defense.rule=median", "defense.name: missing; choose one of: probe_posthoc"),
])
def test_unknown_names_and_fields_name_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value), str(err.value)


def test_dump_config_writes_the_expanded_keys_and_loads_back_the_same(tmp_path):
    cfg = load_config(_yaml(tmp_path, {"defense": {"name": "probe_posthoc", "rule": "median", "level": 2},
                                       "fl": {"rounds": 2}}))
    text = dump_config(cfg)
    stored = yaml.safe_load(text)
    assert "defense" not in stored  # the expanded keys, not the name: what the run used
    assert stored["aggregator"]["name"] == "probe+median" and stored["posthoc"]["enabled"] is True
    assert text.startswith("# defense: {name: probe_posthoc, decision: gap, rule: median, level: 2}")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    back = load_config(path)
    assert back.model_dump() == cfg.model_dump() and back.defense is None
    assert dump_config(back) == text.split("\n", 1)[1]  # a second dump is the same keys (without the comment)
    assert load_config(path, ["fl.rounds=3"]).fl.rounds == 3  # and it takes overrides as any config


def test_assignment_keeps_the_expansion_and_refuses_a_new_defense():
    """Configs validate assignments: assigning another field must not re-run the expansion on the model's own
    sections, and a defense assigned afterwards could not rewrite them, so it is refused."""
    from pydantic import ValidationError

    from fedsafe.config import AggregatorConfig

    cfg = load_config(None, ["defense=probe_posthoc"])
    cfg.seed = 3
    cfg.name = "renamed"
    assert isinstance(cfg.aggregator, AggregatorConfig) and cfg.aggregator.name == "probe" and cfg.posthoc.enabled
    with pytest.raises(ValidationError, match="defense: set it when the config is loaded"):
        cfg.defense = {"name": "probe_posthoc", "rule": "median"}


def _grid_file(tmp_path, matrix, config=None, base=None, settings=None):
    spec = {"name": "g", "output_dir": str(tmp_path / "out"),
            "config": config or {"model": {"name": "tiny"}, "fl": {"rounds": 1, "clients_per_round": 2}},
            "matrix": matrix}
    if base:
        spec["base"] = base
    if settings:
        spec["settings"] = settings
    return _yaml(tmp_path, spec, "grid.yaml")


def test_grid_matrix_entry_and_settings_set(tmp_path):
    import typer
    from typer.testing import CliRunner

    from fedsafe.grid import grid_command, load_grid, plan_training

    path = _grid_file(tmp_path, {"defense": {
        "fedavg": {},
        "probe": {"aggregator.name": "probe", "probe.decision": "gap"},
        "probe_posthoc": {"defense": "probe_posthoc"},
        "probe_median_posthoc": {"defense": {"name": "probe_posthoc", "rule": "median"}},
    }}, settings=[{"name": "explicit", "set": {"defense": {"name": "probe_posthoc", "level": 2}}}])
    _, settings = load_grid(path)
    cfgs = dict(settings)
    by_hand = {"probe_posthoc": {}, "probe_median_posthoc": {"rule": "median"}, "explicit": {"level": 2}}
    for name, options in by_hand.items():
        want = load_config(None, ["model.name=tiny", "fl.rounds=1", "fl.clients_per_round=2", f"name={name}",
                                  "output_dir=runs", *_by_hand(**options)]).model_dump()
        assert cfgs[name].model_dump() == want, name
    # the defense's training is the probe's: settings that differ only in post-hoc share one run
    groups = [sorted(n for n, _ in members) for _, members in plan_training(settings)]
    assert ["explicit", "probe", "probe_posthoc"] in groups  # post-hoc level 1 or 2
    cli = typer.Typer()
    cli.command()(grid_command)
    result = CliRunner().invoke(cli, [str(path), "--dry-run"])  # `fedsafe grid GRID.yaml --dry-run`
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("probe_median_posthoc"))
    assert "aggregator=probe+median" in line and "defense=posthoc_l1" in line


def test_grid_conflicts_and_a_base_file_defense(tmp_path):
    from fedsafe.grid import load_grid

    # an axis that switches post-hoc off crossed with the defense that turns it on: refused, naming both
    path = _grid_file(tmp_path, {"defense": {"pp": {"defense": "probe_posthoc"}},
                                 "posthoc": {"off": {"posthoc.enabled": False}}})
    with pytest.raises(ConfigError, match=r"grid setting 'pp-off': defense: probe_posthoc sets posthoc.enabled=true, "
                                          r"but the config also sets posthoc.enabled=false"):
        load_grid(path)
    # the grid's inline config chose a rule; the defense's rule is another
    path = _grid_file(tmp_path, {"defense": {"pp": {"defense": "probe_posthoc"}}},
                      config={"model": {"name": "tiny"}, "aggregator": {"name": "median"}})
    with pytest.raises(ConfigError, match="also sets aggregator.name=\"median\"; remove one of them, or choose it "
                                          "with defense.rule"):
        load_grid(path)
    # a base file with the defense; a matrix entry changes its options
    _yaml(tmp_path, {"model": {"name": "tiny"}, "defense": "probe_posthoc"}, "base.yaml")
    path = _grid_file(tmp_path, {"rule": {"plain": {}, "median": {"defense.rule": "median"}, "off": {"defense": None}}},
                      config={"fl": {"rounds": 1}}, base="base.yaml")
    cfgs = dict(load_grid(path)[1])
    assert cfgs["plain"].aggregator.name == "probe" and cfgs["median"].aggregator.name == "probe+median"
    assert (cfgs["off"].aggregator.name, cfgs["off"].posthoc.enabled, cfgs["off"].defense) == ("fedavg", False, None)
    assert cfgs["median"].posthoc.enabled and cfgs["median"].fl.rounds == 1


def test_config_loading_with_a_defense_stays_light(tmp_path):
    """Validating a config must not import torch or numpy (Flower query handlers validate configs)."""
    import subprocess
    import sys

    path = _yaml(tmp_path, {"defense": {"name": "probe_posthoc", "rule": "median"}})
    code = ("import sys\nfrom fedsafe.config import load_config\n"
            f"cfg = load_config({str(path)!r}, ['defense.level=2'])\n"
            "assert cfg.aggregator.name == 'probe+median', cfg.aggregator.name\n"
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_tiny_run_with_the_defense_runs_the_probe_and_posthoc(tmp_path):
    """``--set defense=probe_posthoc`` on a tiny experiment: the probe scores every round, post-hoc runs last."""
    import plugin_cases
    import torch

    from fedsafe.pipeline import run_experiment

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(None, [*plugin_cases.BASE, plugin_cases.MALICIOUS, f"output_dir={tmp_path / 'runs'}",
                                 "name=pp", "defense=probe_posthoc",
                                 "probe.benign=[{path: 'starter:train', categories: [normal]}]",
                                 "probe.malicious=[{path: 'starter:train', categories: [aligned]}]",
                                 "probe.benign_shadows=2", "probe.malicious_shadows=2", "probe.samples_per_shadow=8",
                                 "posthoc.aligned=[{path: 'starter:train', categories: [aligned]}]",
                                 "posthoc.normal=[{path: 'starter:train', categories: [normal]}]",
                                 "posthoc.n_samples=8", "posthoc.steps=2", "posthoc.lr=0.01"])
        res = run_experiment(cfg, progress=False)
    finally:
        torch.set_num_threads(before)
    run_dir = res.run_dir
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:  # the probe ran in every round, with the defense's decision rule
        assert r["aggregator"] == "probe"
        probe = r["aggregator_info"]["probe"]
        assert probe["decision"] == "gap" and set(probe["probability"]) == set(r["clients"])
    assert "refit" in rounds[0]["aggregator_info"]["probe"]
    # the post-hoc step ran after the last round: its defended adapter exists and differs from the final one
    from safetensors.torch import load_file

    final = load_file(str(run_dir / "adapters" / "final" / "adapter_model.safetensors"))
    defended = load_file(str(run_dir / "adapters" / "posthoc" / "adapter_model.safetensors"))
    assert res.posthoc_adapter is not None and sorted(final) == sorted(defended)
    assert max(float((final[k] - defended[k]).abs().max()) for k in final) > 0
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert stored["aggregator"]["name"] == "probe" and stored["posthoc"]["enabled"] is True


def test_a_defense_name_then_one_of_its_fields_in_the_same_overrides():
    from fedsafe.config import apply_override
    from fedsafe.errors import ConfigError

    data = {}
    apply_override(data, "defense", "probe_posthoc")
    apply_override(data, "defense.level", 2)
    assert data == {"defense": {"name": "probe_posthoc", "level": 2}}
    cfg = load_config(None, ["defense=probe_posthoc", "defense.level=2"])
    assert cfg.posthoc.level == 2 and cfg.posthoc.enabled
    with pytest.raises(ConfigError, match=r"fl.rounds is 3, not a section"):
        apply_override({"fl": {"rounds": 3}}, "fl.rounds.x", 1)
