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
