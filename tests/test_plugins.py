"""The plug-in interface (issue 16): registry, own config sections, declared incompatibilities, hook order, a
third-party plug-in end to end, and the same final adapters as before attacks and defenses became plug-ins."""

import json
import sys
from pathlib import Path

import pytest
import torch
from pydantic import Field

import fedsafe.attacks
import fedsafe.defenses
import fedsafe.plugins as plugins
from fedsafe.config import ExperimentConfig, dump_config, load_config
from fedsafe.errors import ConfigError
from fedsafe.schema import Strict

sys.path.insert(0, str(Path(__file__).parent))
import plugin_cases  # noqa: E402

REFERENCE = json.loads((Path(__file__).parent / "data" / "plugin_reference.json").read_text())


@pytest.mark.parametrize("name", sorted(plugin_cases.CASES))
def test_same_final_adapter_as_before_the_plugin_refactor(name, tmp_path):
    """Every built-in plug-in gives the adapters and metrics records the pre-plug-in code gave (seed 0, tiny
    model). Each case moves the adapter far more than the 2% tolerance, so a plug-in that stops acting fails."""
    if name == "local_probing" and not plugin_cases.SHARED.exists():
        pytest.skip("needs ../shared/data for the probe prompts")
    fp = plugin_cases.run_case(name, tmp_path)
    problem = plugin_cases.close(fp, REFERENCE[name])
    assert problem is None, problem


def test_reference_cases_are_far_apart():
    """The tolerance can tell each plug-in's effect from the plain run (else the equivalence test is empty)."""
    plain = REFERENCE["plain"]["adapters"]["final"]
    for name, ref in REFERENCE.items():
        if name in ("plain", "posthoc", "personalization"):  # these change only their own extra adapters
            continue
        assert plugin_cases.close({"records": ref["records"], "adapters": {"final": plain}}, ref) is not None, name
    assert set(REFERENCE["posthoc"]["adapters"]) == {"final", "posthoc"}
    assert plugin_cases.close({"records": REFERENCE["posthoc"]["records"],
                               "adapters": {"final": plain, "posthoc": plain}}, REFERENCE["posthoc"]) is not None


def test_registry_by_name_and_kind():
    assert {"privacy_extraction", "data_poisoning"} <= set(fedsafe.attacks.available())
    assert {"differential_privacy", "constrained_updates", "secure_aggregation", "probe", "local_probing",
            "posthoc", "personalization"} <= set(fedsafe.defenses.available())
    assert fedsafe.defenses.get("posthoc").section == "posthoc"
    with pytest.raises(ConfigError, match="unknown attack 'posthoc'"):
        fedsafe.attacks.get("posthoc")  # a defense, not an attack
    with pytest.raises(ConfigError, match="available: .*differential_privacy"):
        fedsafe.defenses.get("nope")


def test_each_builtin_owns_its_section_through_its_registry_entry():
    """One registry line per plug-in: its lazy "module:Class" strings name the class and the section model the
    class itself declares, and the experiment config validates that section with that model."""
    cfg = ExperimentConfig()
    for name, entry in plugins.entries().items():
        cls = plugins.plugin_class(name)
        assert (cls.name, cls.section) == (name, entry.section), name
        if entry.role_field is not None:  # the adaptive attack validates roles[i].attack instead
            assert cls.section is None and callable(plugins.config_model(entry)), name
            continue
        assert plugins.config_model(entry) is cls.Config, name
        if cls.Config is not None:
            assert isinstance(plugins.section_of(cfg, cls.section), cls.Config), name
            assert cls.section.split(".")[0] not in ExperimentConfig.model_fields, name  # not a core field


def test_active_plugins_and_hook_order():
    cfg = load_config(None, ["model.name=tiny", "constrained.l2_mu=0.1", "dp.local=true", "posthoc.enabled=true",
                             "posthoc.aligned=[{path: x.jsonl}]", "posthoc.normal=[{path: y.jsonl}]"])
    ctx = plugins.RunContext(**vars(plugins.Setup.from_config(cfg)))
    ps = plugins.build(cfg, ctx)
    assert ps.names() == ["constrained_updates", "differential_privacy", "posthoc"]  # loss terms before DP-SGD
    assert ps.get("posthoc").config is cfg.posthoc  # its own section, not the experiment config
    assert plugins.build(load_config(None, ["model.name=tiny"]), ctx).names() == []


def test_declared_incompatibility_is_checked_at_config_load():
    with pytest.raises(ConfigError, match="baselines.probing needs each client's plaintext local model; it is "
                                          "incompatible with secure_agg.enabled"):
        load_config(None, ["secure_agg.enabled=true", "baselines.probing.enabled=true"])
    with pytest.raises(ConfigError, match="dp.client_level=true needs aggregator.name=fedavg"):
        load_config(None, ["dp.client_level=true", "aggregator.name=median", "fl.clients_per_round=2"])
    with pytest.raises(ConfigError, match=r"privacy.victim_roles: \['nobody'\] are not roles"):
        load_config(None, ["privacy.enabled=true", "privacy.victim_roles=[nobody]"])


# ------------------------------------------------------------------------------------------------
# A third-party plug-in: its own section at the top level, validated by its own model, hooks that act
# ------------------------------------------------------------------------------------------------

class ScaleConfig(Strict):
    """Section of the test plug-in."""

    enabled: bool = False
    factor: float = Field(0.5, gt=0, description="multiply every sent update by this")


class ScaleUpdates(plugins.Plugin):
    """Scales each client's update before it is sent and counts the rounds it saw."""

    name = "test_scale_updates"
    kind = "attack"
    section = "test_scale"
    Config = ScaleConfig

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.rounds_seen = []

    def client_update(self, result, client, global_vec, rc, trainer):
        result.update = result.update * self.config.factor
        return result

    def round_end(self, round_no, record, global_vec):
        self.ctx.log({"type": "test_scale", "round": round_no, "factor": self.config.factor})


@pytest.fixture
def third_party():
    plugins.register(ScaleUpdates)
    yield ScaleUpdates
    plugins._REGISTRY.pop(ScaleUpdates.name, None)


def test_third_party_section_is_validated_with_its_path(third_party):
    cfg = load_config(None, ["test_scale.enabled=true", "test_scale.factor=0.25"])
    assert plugins.section_of(cfg, "test_scale").factor == 0.25
    assert "test_scale:" in dump_config(cfg) and "extensions" not in dump_config(cfg)
    with pytest.raises(ConfigError, match=r"test_scale.factor: Input should be greater than 0"):
        load_config(None, ["test_scale.enabled=true", "test_scale.factor=-1"])
    with pytest.raises(ConfigError, match=r"test_scale.facter"):
        load_config(None, ["test_scale.facter=1"])


def test_third_party_plugin_changes_the_run(third_party, tmp_path):
    from fedsafe.pipeline import run_experiment

    base = ["model.name=tiny", f"output_dir={tmp_path}", "fl.rounds=1", "fl.local_steps=2", "fl.batch_size=2",
            "data.samples_per_client=4", "data.max_length=64", "roles.0.clients=2", "fl.clients_per_round=2",
            "fl.lr=0.01", "eval.helpfulness_proxy=false", "eval.normal_prompts=null"]
    plain = run_experiment(load_config(None, [*base, "name=plain"]), progress=False)
    scaled = run_experiment(load_config(None, [*base, "name=scaled", "test_scale.enabled=true",
                                               "test_scale.factor=0.25"]), progress=False)
    from safetensors.torch import load_file

    def vec(run):
        t = load_file(str(Path(run.run_dir) / "adapters" / "final" / "adapter_model.safetensors"))
        return torch.cat([t[k].reshape(-1) for k in sorted(t)])

    def rounds(run):
        return [json.loads(x) for x in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines()]

    # FedAvg of scaled updates = 0.25 x FedAvg of the same updates (the same seed trains the same updates)
    p_norm = next(r for r in rounds(plain) if r["type"] == "round")["update_norm"]
    s_norm = next(r for r in rounds(scaled) if r["type"] == "round")["update_norm"]
    assert s_norm == pytest.approx(0.25 * p_norm, rel=1e-4)
    assert [r for r in rounds(scaled) if r["type"] == "test_scale"] == [{"type": "test_scale", "round": 1,
                                                                          "factor": 0.25}]
    assert not [r for r in rounds(plain) if r["type"] == "test_scale"]
    assert not torch.equal(vec(plain), vec(scaled))
