"""One contract over every registered plug-in (issue 31): its registry line resolves, its default section loads
without torch, a config switches it on through its section alone, and a declared incompatibility refuses."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fedsafe.plugins as plugins
from fedsafe.config import ExperimentConfig, dump_config, load_config
from fedsafe.errors import ConfigError

MALICIOUS = ("roles=[{name: benign, clients: 2, data: [{path: 'starter:train'}]}, "
             "{name: malicious, clients: 1, data: [{path: 'starter:train'}]}]")
BASE = ["model.name=tiny", "fl.clients_per_round=3", "roles.0.clients=3"]

# How a config switches each built-in plug-in on. A new plug-in adds its line here (the test below refuses a
# registered plug-in without one), so every plug-in is loaded, checked and combined at least once.
SWITCH_ON = {
    "data_poisoning": [MALICIOUS],
    "adaptive_attack": ["roles=[{name: benign, clients: 2, data: [{path: 'starter:train'}]}, {name: malicious, "
                        "clients: 1, data: [{path: 'starter:train'}], attack: {name: scaling}}]"],
    "sign_flip": [MALICIOUS, "sign_flip.enabled=true"],
    "privacy_extraction": ["privacy.enabled=true"],
    "server_view_attack": ["server_view.enabled=true"],
    "differential_privacy": ["dp.local=true"],
    "constrained_updates": ["constrained.l2_mu=0.1"],
    "secure_aggregation": ["secure_agg.enabled=true"],
    "weak_dp": ["weak_dp.enabled=true"],
    "probe": ["aggregator.name=probe"],
    "local_probing": ["baselines.probing.enabled=true"],
    "personalization": ["baselines.personalization.enabled=true"],
    "posthoc": ["posthoc.enabled=true", "posthoc.aligned=[{path: 'starter:train'}]",
                "posthoc.normal=[{path: 'starter:train'}]"],
    "gate": ["gate.policy={rule: {min: 50}}"],
    "fltrust": ["aggregator.name=fltrust", "fltrust.root=[{path: 'starter:train'}]"],
}
NAMES = sorted(plugins.entries())


def test_every_registered_plugin_has_a_switch():
    assert sorted(SWITCH_ON) == NAMES, "add the new plug-in's overrides to SWITCH_ON"


@pytest.mark.parametrize("name", NAMES)
def test_registry_line_resolves_to_the_class_that_declares_it(name):
    entry = plugins.entries()[name]
    cls = plugins.plugin_class(name)
    assert cls.name == name and cls.kind in plugins.KINDS and cls.section == entry.section
    if entry.role_field is None:
        assert plugins.config_model(entry) is cls.Config


def test_default_config_and_every_section_model_load_without_torch():
    """A config validates in a process that never imports torch or numpy (a Flower query handler, --help):
    the registry imports only the plug-ins' light config modules."""
    configs = sorted({e.config.partition(":")[0] for e in plugins.entries().values()
                      if isinstance(e.config, str) and e.role_field is None})
    code = ("import importlib, sys\nfrom fedsafe.config import ExperimentConfig, dump_config\n"
            "cfg = ExperimentConfig()\ndump_config(cfg)\n"
            f"for m in {configs!r}:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"a config module imports {out.stdout.strip()}"


@pytest.mark.parametrize("name", NAMES)
def test_a_config_switches_it_on_through_its_section(name):
    cfg = load_config(None, BASE + SWITCH_ON[name])
    assert name in [cls.name for cls, _ in plugins.active(cfg)]
    assert name not in [cls.name for cls, _ in plugins.active(load_config(None, BASE))]
    again = load_config(None, BASE + SWITCH_ON[name])
    assert dump_config(cfg) == dump_config(again)  # the same YAML, section and all
    section = plugins.entries()[name].section
    if section:  # the section dumps at the top level under its own key, not under extensions
        assert f"\n{section.split('.')[0]}:" in "\n" + dump_config(cfg)
        assert "extensions" not in ExperimentConfig.model_validate(cfg.model_dump(mode="json")).model_dump()


@pytest.mark.parametrize("name", [n for n in NAMES if plugins.plugin_class(n).plaintext_updates])
def test_declared_plaintext_need_refuses_secure_aggregation(name):
    """A plug-in that declares it needs plaintext updates is refused next to one that declares encrypted ones."""
    with pytest.raises(ConfigError, match=r"incompatible with secure_agg\.enabled|secure aggregation"):
        load_config(None, BASE + SWITCH_ON[name] + ["secure_agg.enabled=true"])


# ------------------------------------------------------------------------------------------------
# Hooks take and return plain data: what can be checked without running a round
# ------------------------------------------------------------------------------------------------

# every method the core calls on a plug-in (the hooks, config load, the report, the deployment)
CALLED = (*plugins.HOOKS, "is_active", "check", "declares", "deployment_keys", "defense_label", "report_summary",
          "report_section", "changes_local_training")  # (the hooks' names: Plugin's methods)


def _signature_faults(cls) -> list[str]:
    """Hooks whose parameters differ from the base hook's (the core passes exactly those), or whose annotations
    name the experiment config or a torch module."""
    import inspect

    faults = []
    for hook in CALLED:
        mine, base = getattr(cls, hook), getattr(plugins.Plugin, hook)
        if getattr(mine, "__func__", mine) is getattr(base, "__func__", base):
            continue
        got, want = list(inspect.signature(mine).parameters), list(inspect.signature(base).parameters)
        if got != want:
            faults.append(f"{cls.name}.{hook}{tuple(got)}: the core passes {tuple(want)}")
        notes = getattr(getattr(mine, "__func__", mine), "__annotations__", {})
        for arg, note in notes.items():
            if any(bad in str(note) for bad in ("ExperimentConfig", "nn.Module", "PreTrainedModel")):
                faults.append(f"{cls.name}.{hook}: {arg} is annotated {note}")
    return faults


def _foreign(value, cls, where: str = "") -> list[str]:
    """Objects in ``value`` (through containers, dataclasses and pydantic fields) that are not plain data for
    plug-in ``cls``: a torch module, the whole experiment config, or another plug-in's config section."""
    import dataclasses

    import torch
    from pydantic import BaseModel

    others = tuple({c.Config for c in plugins.registered() if c.Config is not None and c.Config is not cls.Config})
    if isinstance(value, torch.nn.Module):
        return [f"{where}: a torch module ({type(value).__name__})"]
    if isinstance(value, ExperimentConfig):
        return [f"{where}: the experiment config"]
    if others and isinstance(value, others):
        return [f"{where}: another plug-in's section ({type(value).__name__})"]
    if isinstance(value, dict):
        return [f for k, v in value.items() for f in _foreign(v, cls, f"{where}[{k!r}]")]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [f for i, v in enumerate(value) for f in _foreign(v, cls, f"{where}[{i}]")]
    if isinstance(value, BaseModel):
        return [f for k in type(value).model_fields for f in _foreign(getattr(value, k), cls, f"{where}.{k}")]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [f for fl in dataclasses.fields(value) for f in _foreign(getattr(value, fl.name), cls,
                                                                        f"{where}.{fl.name}")]
    return []


def _declared(cls, config, cfg) -> dict:
    """What the core asks a plug-in class about its section (no hook runs): name -> the returned value."""
    import yaml

    section = yaml.safe_load(dump_config(cfg))
    for part in (cls.section or "").split("."):
        section = section.get(part, {}) if part and isinstance(section, dict) else section
    setup = plugins.Setup.from_config(cfg)
    return {"is_active": cls.is_active(config, setup), "check": cls.check(config, setup),
            "declares": cls.declares(config), "defense_label": cls.defense_label(config),
            "deployment_keys": cls.deployment_keys(config),
            "report_summary": cls.report_summary(section if isinstance(section, dict) else {})}


@pytest.mark.parametrize("name", NAMES)
def test_hooks_take_what_the_core_passes(name):
    """Each hook a plug-in overrides takes the base hook's parameters (plain data the core and a Flower ClientApp
    pass: results, clients, vectors, round numbers, its own section), none added, none annotated as the
    experiment config or a torch module."""
    assert _signature_faults(plugins.plugin_class(name)) == []


@pytest.mark.parametrize("name", NAMES)
def test_a_plugin_gets_its_own_section_and_declares_plain_data(name):
    """Switched on, a plug-in is given its own section (never the experiment config or another plug-in's section)
    and its declarations are plain data of the documented types."""
    cfg = load_config(None, BASE + SWITCH_ON[name])
    ((cls, config),) = [(c, s) for c, s in plugins.active(cfg) if c.name == name]
    if cls.Config is not None and plugins.entries()[name].role_field is None:
        assert type(config) is cls.Config
    assert _foreign(config, cls, "section") == []
    got = _declared(cls, config, cfg)
    assert got["is_active"] is True and got["check"] is None
    assert isinstance(got["declares"], set) and all(isinstance(p, str) for p in got["declares"])
    assert got["defense_label"] is None or isinstance(got["defense_label"], str)
    assert isinstance(got["report_summary"], list) and all(isinstance(s, str) for s in got["report_summary"])
    keys = got["deployment_keys"]
    if keys is not None:
        assert isinstance(keys, plugins.DeploymentKeys) and keys.section == cls.section
        assert all(callable(getattr(keys.keyring, m, None)) for m in ("write", "read", "describe", "client_key",
                                                                      "decrypt"))
    assert _foreign({k: v for k, v in got.items() if k != "deployment_keys"}, cls, "declared") == []


def test_the_contract_checks_can_fail():
    """A plug-in whose hook asks for the experiment config, or that hands out a torch module or another plug-in's
    section, is caught by the checks above."""
    import torch

    from fedsafe.defenses.posthoc.config import PosthocConfig

    class Leaky(plugins.Plugin):
        name = "test_leaky"
        section = "test_leaky"

        def round_end(self, round_no, record, global_vec, cfg: ExperimentConfig = None):
            return None

        @classmethod
        def declares(cls, config) -> set:
            return {torch.nn.Linear(1, 1)}

    assert _signature_faults(Leaky) == [
        "test_leaky.round_end('self', 'round_no', 'record', 'global_vec', 'cfg'): the core passes "
        "('self', 'round_no', 'record', 'global_vec')", "test_leaky.round_end: cfg is annotated ExperimentConfig"]
    assert _foreign(Leaky.declares(None), Leaky) == ["[0]: a torch module (Linear)"]
    assert _foreign({"s": PosthocConfig()}, Leaky) == ["['s']: another plug-in's section (PosthocConfig)"]
    assert _foreign({"cfg": ExperimentConfig()}, Leaky) == ["['cfg']: the experiment config"]
