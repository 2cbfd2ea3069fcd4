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
    (["dp.client_level=true", "fl.algorithm=scaffold"], "dp.client_level=true cannot be combined with "
                                                        "fl.algorithm=scaffold"),
    (["dp.client_level=true", "aggregator.name=median"], "dp.client_level=true needs aggregator.name=fedavg"),
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


# --- a rule that cannot work with the round size fails at load, before any model is loaded ---------------

def test_infeasible_rule_fails_at_load_before_any_model_is_loaded(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import fedsafe.models
    import fedsafe.pipeline
    from fedsafe import cli

    loaded = []

    def no_model(*args, **kwargs):
        loaded.append(args)
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(fedsafe.models, "load_base_model", no_model)
    monkeypatch.setattr(fedsafe.pipeline, "load_model", no_model)
    out = tmp_path / "runs"
    res = CliRunner().invoke(cli.app, ["run", "--no-progress", "--set", "model.name=tiny", "--set",
                                       f"output_dir={out}", "--set", "roles.0.clients=10", "--set",
                                       "fl.clients_per_round=4", "--set", "aggregator.name=krum", "--set",
                                       "aggregator.params={f: 9}"])
    assert isinstance(res.exception, ConfigError), res.output
    assert ("aggregator.params.f=9: krum needs more than 2*f+2=20 clients per round, got fl.clients_per_round=4"
            in str(res.exception))
    assert loaded == [] and not out.exists()  # nothing was loaded, no run directory was made


@pytest.mark.parametrize("override, message", [
    (["aggregator.name=bulyan", "aggregator.params={f: 1}", "fl.clients_per_round=0.6"],
     "aggregator.params.f=1: bulyan needs at least 4*f+3=7 clients per round, got fl.clients_per_round=0.6 "
     "(6 of 10 clients)"),
    (["aggregator.name=multikrum", "aggregator.params={f: 0, m: 4}", "fl.clients_per_round=3"],
     "aggregator.params.m=4: multikrum averages the m=4 best-scoring updates"),
    (["aggregator.name=dnc", "aggregator.params={f: 2}"], "aggregator.params.f=2: dnc removes f=2 clients"),
    (["aggregator.name=trimmed_mean", "aggregator.params={beta: 0.2}", "fl.clients_per_round=4"],
     "aggregator.params.beta=0.2: trimmed_mean trims floor(beta*n) values per side, none with fewer than 5"),
    (["aggregator.name=residual"], "aggregator.name=residual: residual reweighting needs at least 3"),
    (["aggregator.name=probe+krum", "aggregator.params={f: 1}", "fl.clients_per_round=4"],
     "aggregator.params.f=1: krum needs more than 2*f+2=4 clients per round, got fl.clients_per_round=4"),
    (["aggregator.name=norm_clip", "aggregator.params={max_norm: 1, aggregator: bulyan, params: {f: 0}}"],
     "aggregator.params.params.f=0: bulyan needs at least 4*f+3=3 clients per round"),
    (["aggregator.name=krum", "aggregator.params={f: 1.5}", "fl.clients_per_round=4"],
     "aggregator.params.f=1.5: krum: f must be a non-negative integer"),
])
def test_infeasible_rules_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["roles.0.clients=10", *override])
    assert message in str(err.value)


def test_feasible_rules_load_at_their_smallest_round():
    base = ["roles.0.clients=12"]
    for override in (["aggregator.name=krum", "aggregator.params={f: 1}", "fl.clients_per_round=5"],
                     ["aggregator.name=bulyan", "aggregator.params={f: 2}", "fl.clients_per_round=11"],
                     ["aggregator.name=trimmed_mean", "aggregator.params={beta: 0.1}", "fl.clients_per_round=10"],
                     ["aggregator.name=trimmed_mean", "aggregator.params={beta: 0}", "fl.clients_per_round=2"],
                     ["aggregator.name=probe+median", "fl.clients_per_round=1"],
                     ["aggregator.name=residual", "fl.clients_per_round=3"],
                     ["aggregator.name=krum", "aggregator.params={f: 2}", "fl.clients_per_round=0.6"]):  # 8 > 6
        cfg = load_config(None, base + override)
        assert cfg.aggregator.name == override[0].split("=")[1]


def test_secure_aggregation_needs_min_clients_per_round():
    cfg = load_config(None, ["secure_agg.enabled=true"])
    assert cfg.secure_agg.min_clients == 2 and cfg.clients_per_round == 2
    with pytest.raises(ConfigError, match=r"secure_agg\.min_clients=3: secure aggregation decrypts no sum of fewer "
                                          r"clients, got fl\.clients_per_round=2"):
        load_config(None, ["secure_agg.enabled=true", "secure_agg.min_clients=3"])
    with pytest.raises(ConfigError, match=r"secure_agg\.min_clients"):
        load_config(None, ["secure_agg.enabled=true", "secure_agg.min_clients=0"])
    # robust rules are refused under HE for a more basic reason, which is the one reported
    with pytest.raises(ConfigError, match=r"aggregator\.name='krum' cannot run under secure aggregation"):
        load_config(None, ["secure_agg.enabled=true", "aggregator.name=krum", "aggregator.params={f: 9}"])


def _float_fields(model_cls, prefix=""):
    """Dotted paths of every float field of a config section and its sub-sections (issue 30 item 4)."""
    import typing

    from pydantic import BaseModel

    for name, field in model_cls.model_fields.items():
        ann = field.annotation
        args = (ann,) if typing.get_origin(ann) is list else (typing.get_args(ann) or (ann,))
        if float in args:
            yield prefix + name
        for arg in args:
            where = f"{prefix}{name}."
            if typing.get_origin(arg) is list:  # roles: the first item's fields
                arg, where = typing.get_args(arg)[0], f"{prefix}{name}.0."
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg.__name__ != "DataSource":
                yield from _float_fields(arg, where)


def test_every_float_field_refuses_inf_and_nan():
    """allow_inf_nan=False on the shared base section: `fl.lr: .inf` made every update NaN and still exited 0."""
    from fedsafe.plugins import sections

    fields = list(_float_fields(ExperimentConfig))  # the core sections, then the plug-ins' (validated through
    fields += [f for top, model in sections().items() for f in _float_fields(model, f"{top}.")]  # the registry)
    assert {"fl.lr", "fl.clients_per_round", "dp.noise_multiplier", "lora.alpha", "fl.max_norm_ratio",
            "roles.0.fraction", "probe.C"} <= set(fields), fields
    for path in fields:
        for bad in (".inf", "-.inf", ".nan"):
            with pytest.raises(ConfigError) as err:
                load_config(None, ["total_clients=4", f"{path}={bad}"])
            text = " ".join(str(err.value).split())
            leaf = path.rsplit(".", 1)[-1]  # secure_agg.ckks has its own check: "ckks: global_scale must be a finite"
            assert f"{path}: Input should be a finite number" in text or (leaf in text and "finite" in text), text
    with pytest.raises(ConfigError, match=r"total_clients: Input should be a finite number"):
        load_config(None, ["total_clients=.inf"])  # was an OverflowError traceback


@pytest.mark.parametrize("override, needle", [
    (["seed=-1"], "seed: Input should be greater than or equal to 0"),
    (["seed=4294967296"], "seed: Input should be less than 4294967296"),
    (["seeds=[1, -1]"], "seeds.1: Input should be greater than or equal to 0"),
    (["probe.seed=-1"], "probe.seed: Input should be greater than or equal to 0"),
    (["fl.max_grad_norm=0"], "fl.max_grad_norm: Input should be greater than 0"),
])
def test_out_of_range_integers_and_bounds_are_refused_at_load(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, override)
