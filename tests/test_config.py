"""The experiment schema: defaults, overrides and errors that name the field."""

import pytest

from fedsafe.config import ExperimentConfig, apply_override, dump_config, load_config
from fedsafe.errors import ConfigError


def test_defaults_are_the_quickstart():
    cfg = ExperimentConfig()
    assert cfg.model.name == "embedded"
    assert cfg.roles[0].data[0].path == "starter:train"
    assert cfg.num_clients == 4 and cfg.clients_per_round == 2


def test_set_overrides_nested_and_list_fields():
    cfg = load_config(None, ["fl.rounds=7", "roles.0.clients=6", "lora.target_modules=[q_proj,v_proj]",
                             "aggregator.params={f: 1}"])
    assert cfg.fl.rounds == 7 and cfg.roles[0].clients == 6
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.aggregator.params == {"f": 1}


def test_fraction_of_clients_per_round():
    cfg = load_config(None, ["roles.0.clients=10", "fl.clients_per_round=0.3"])
    assert cfg.clients_per_round == 3


@pytest.mark.parametrize("override, needle", [
    (["fl.rounds=0"], "fl.rounds"),
    (["fl.lr=-1"], "fl.lr"),
    (["fl.algorithm=fedfoo"], "fl.algorithm"),
    (["fl.roundz=3"], "fl.roundz: unknown field"),
    (["fl.clients_per_round=9"], "exceeds the 4 clients"),
    (["model.quantization=3bit"], "model.quantization"),
])
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert needle in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("fl: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_round_trip_yaml(tmp_path):
    cfg = load_config(None, ["fl.rounds=2", "name=abc"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_apply_override_bad_index():
    with pytest.raises(ConfigError, match="not an index"):
        apply_override({"roles": [{}]}, "roles.3.clients", 1)


def test_data_source_needs_path_or_generate():
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config(None, ["roles.0.data.0.generate={kind: unaligned}"])
