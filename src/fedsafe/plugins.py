"""Plug-ins: every attack and every defense is one class that hooks into fixed points of a federated round.

The hook points, in the order a run reaches them (the shape follows Flower's mods and PyTorch Lightning's
callbacks)::

    client_data      which rows each client holds          canaries
    local_training   the client's local training step      local DP-SGD, constrained-update loss terms
    client_update    the client's update before it is sent encryption (secure aggregation), model poisoning
    round_start      the server prepares a round            the probe's shadow training
    server_view      the server's view before the rule     the probe, local-model probing, client-level DP
    aggregate        the sum itself                        secure aggregation (ciphertext sum, decryption)
    round_end        a round is finished                    the DP accountant, privacy extraction every k rounds
    after_training   after the last round                  post-hoc defense, personalization, final attacks

A plug-in is a subclass of :class:`Plugin` with a ``name``, a ``kind`` (attack or defense), the dotted path
of its own config ``section`` and that section's pydantic model ``Config``; it overrides the hooks it needs and
is registered by one :class:`Entry` line in :data:`BUILTIN` (a third-party package: :func:`register` or an entry
point). It receives its own section and a :class:`RunContext` (the services of
the run: the one model in memory, the tokenizer, the run directory, the shared settings), never the whole
experiment config. Client hooks (``local_training``, ``client_update``) see plain data only, so a Flower
ClientApp builds them with :func:`client_trainer` from the same config and runs them unchanged.

Compatibility is declared, not scattered: :meth:`Plugin.check` validates a section against the rest of the
setup at config load (before a model is loaded), and :attr:`Plugin.plaintext_updates` says that a plug-in
needs each client's plaintext update, which :func:`check_config` refuses next to a plug-in that declares
:data:`ENCRYPTED_UPDATES` (secure aggregation), in one place.

``docs/extending.md`` walks through adding an attack and a defense.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from fedsafe.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from pydantic import BaseModel
    from rich.console import Console

    from fedsafe.config import (AggregatorConfig, DataConfig, EvalConfig, ExperimentConfig, FLConfig, LoRAConfig,
                                RoleConfig)
    from fedsafe.data.client_data import ClientData
    from fedsafe.fl.params import FlatLoRA
    from fedsafe.fl.server import Server
    from fedsafe.rundir import RunDir

log = logging.getLogger("fedsafe")

HOOKS = ("client_data", "local_training", "client_update", "round_start", "server_view", "aggregate",
         "round_end", "after_training")
KINDS = ("attack", "defense")

ENTRY_POINT_GROUP = "fedsafe.plugins"  # third-party packages: [project.entry-points."fedsafe.plugins"]


@dataclass(frozen=True)
class Entry:
    """One registered plug-in: where its class and its config section's model live, as lazy "module:Class"
    strings (a third-party ``register`` stores the objects themselves)."""

    plugin: str | type  # the Plugin subclass
    section: str | None = None  # dotted path of its own config section (the YAML key)
    config: str | type | None = None  # that section's pydantic model: a light module, no torch
    role_field: str | None = None  # instead of a section: a field of each role (``config`` is its validator),
    #                                the plug-in runs when a role sets it


# The built-in plug-ins: one line each, ``name -> Entry`` of lazy "module:Class" strings (PEFT's
# ``register_peft_method(name, config_cls, model_cls)``). Validating a config imports the torch-free section models
# and plug-in classes (to decide which are active); each plug-in imports its mechanism (torch) inside its hooks.
BUILTIN: dict[str, Entry] = {
    "data_poisoning": Entry("fedsafe.attacks.data_poisoning:DataPoisoning"),
    "posthoc": Entry("fedsafe.defenses.posthoc.plugin:PosthocFinetune", "posthoc",
                     "fedsafe.defenses.posthoc.config:PosthocConfig"),
    "probe": Entry("fedsafe.defenses.safe_fedllm_probe.plugin:SafeFedLLMProbe", "probe",
                   "fedsafe.defenses.safe_fedllm_probe.config:ProbeConfig"),
    "privacy_extraction": Entry("fedsafe.attacks.privacy_extraction.plugin:PrivacyExtraction", "privacy",
                                "fedsafe.attacks.privacy_extraction.config:PrivacyConfig"),
    "differential_privacy": Entry("fedsafe.defenses.differential_privacy.plugin:DifferentialPrivacy", "dp",
                                  "fedsafe.defenses.differential_privacy.config:DPConfig"),
    "constrained_updates": Entry("fedsafe.defenses.constrained_updates.plugin:ConstrainedUpdates", "constrained",
                                 "fedsafe.defenses.constrained_updates.config:ConstrainedConfig"),
    "secure_aggregation": Entry("fedsafe.defenses.secure_aggregation.plugin:SecureAggregation", "secure_agg",
                                "fedsafe.defenses.secure_aggregation.config:SecureAggConfig"),
    "local_probing": Entry("fedsafe.defenses.local_probing:LocalProbing", "baselines.probing",
                           "fedsafe.defenses.local_probing:LocalProbingConfig"),
    "personalization": Entry("fedsafe.defenses.personalization:Personalization", "baselines.personalization",
                             "fedsafe.defenses.personalization:PersonalizationConfig"),
    "weak_dp": Entry("fedsafe.defenses.weak_dp:WeakDP", "weak_dp", "fedsafe.defenses.weak_dp:WeakDPConfig"),
    "fltrust": Entry("fedsafe.aggregators.fltrust_root:FLTrustRoot", "fltrust",
                     "fedsafe.aggregators.fltrust_root:FLTrustRootConfig"),
    "sign_flip": Entry("fedsafe.attacks.sign_flip:SignFlip", "sign_flip", "fedsafe.attacks.sign_flip:SignFlipConfig"),
    "gate": Entry("fedsafe.evaluation.gate.plugin:Gate", "gate", "fedsafe.evaluation.gate.config:GateConfig"),
    "server_view_attack": Entry("fedsafe.attacks.server_view.plugin:ServerViewAttack", "server_view",
                                "fedsafe.attacks.server_view.config:ServerViewConfig"),
    "adaptive_attack": Entry("fedsafe.attacks.adaptive.plugin:AdaptiveAttack", role_field="attack",
                             config="fedsafe.attacks.adaptive.base:parse_attack"),
}


@dataclass
class Output:
    """An adapter a plug-in produces after training: saved as ``adapters/<tag>`` and, with a ``defense``
    label, evaluated into results.csv next to the final model."""

    tag: str
    vec: torch.Tensor
    defense: str | None = None


@dataclass
class Setup:
    """What a plug-in may check its section against at config load: the settings every plug-in shares."""

    seed: int
    model_name: str
    fl: FLConfig
    data: DataConfig
    lora: LoRAConfig
    aggregator: AggregatorConfig
    roles: list[RoleConfig]
    eval: EvalConfig
    num_clients: int
    clients_per_round: int
    active: dict[str, BaseModel | None] = field(default_factory=dict)  # name -> section of every active plug-in
    engine_may_be_flower: bool = False  # a Flower deployment: client hooks run on other machines

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Setup:
        return cls(seed=cfg.seed, model_name=cfg.model.name, fl=cfg.fl, data=cfg.data, lora=cfg.lora,
                   aggregator=cfg.aggregator, roles=list(cfg.roles), eval=cfg.eval, num_clients=cfg.num_clients,
                   clients_per_round=cfg.clients_per_round)


class KeyRing(Protocol):
    """What the Flower engine does with a plug-in's deployment keys and the encrypted sum (``DeploymentKeys.keyring``),
    so that no engine module imports the plug-in. Plain data in and out: paths, bytes, the key parameters, the
    wire form of a sum, a mask tensor; a key file read back has ``context`` (bytes) and ``key_id``, a written key set
    ``clients``, ``server`` (paths) and ``key_id``. Key holders: ``"clients"`` (the secret file of the SuperNodes)
    and ``"server"`` (the public file of the ServerApp)."""

    default_min_clients: int  # the smallest sum a key holder decrypts when nothing raises it

    def write(self, params, out_dir: str | Path, overwrite: bool = False) -> Any: ...

    def read(self, path: str | Path, holder: str, params=None, who: str = "") -> Any: ...

    def describe(self, params) -> str: ...

    def client_key(self, trainer) -> tuple[bytes, int] | None: ...

    def decrypt(self, secret: bytes, wire, mask, min_clients: int) -> Any: ...


@dataclass(frozen=True)
class DeploymentKeys:
    """What a Flower deployment needs from a plug-in whose clients encrypt their updates under a key set that
    ``fedsafe flower keys`` writes (:meth:`Plugin.deployment_keys`): the key parameters the key files must match,
    the smallest sum a key holder decrypts, the config section (for messages), whether it is on, and the
    :class:`KeyRing` that writes and reads the key files and decrypts a sum."""

    section: str
    params: Any  # the key files' parameters (CKKS for secure aggregation), compared when a key file is read
    min_clients: int
    enabled: bool = False
    keyring: KeyRing | None = None


class Engine(Protocol):
    """What runs the clients' local training (:class:`fedsafe.engines.inprocess.InProcessEngine`, the Flower
    engine): ``fit(client_ids, global_vec, rc, on_result=None) -> list[ClientResult]``."""

    name: str

    def fit(self, client_ids: list[str], global_vec: torch.Tensor, rc: Any, on_result=None) -> list: ...


@dataclass
class RunContext(Setup):
    """The services a plug-in uses at run time. In a Flower ClientApp only the shared settings and the
    client-side keys are set; the server-side services (run directory, server, engine, evaluation) are None
    there."""

    model: torch.nn.Module | None = None  # the PEFT model: one in memory, adapters are swapped in as flat vectors
    tokenizer: Any = None  # the model's transformers tokenizer
    flat: FlatLoRA | None = None  # flat view of ``model``'s LoRA parameters
    init_vec: torch.Tensor | None = None  # the initial adapter
    run_dir: RunDir | None = None
    console: Console | None = None
    generator_cache: dict | None = None  # lets data generation reuse the loaded model
    clients: list[ClientData] = field(default_factory=list)  # the clients, after the client_data hooks
    trainer: Any = None  # the local trainer after the local_training hooks (shadow clients train with it)
    server: Server | None = None  # the round's server (set before the server_view hooks run)
    engine: Engine | None = None  # what runs local training (set before the aggregate hooks run)
    he_server_context: bytes | None = None  # a deployment's server: the public CKKS context only
    he_client_context: bytes | None = None  # a ClientApp's secret-key CKKS context
    evaluate: Callable | None = None  # evaluate(vec, defense=label) -> results row
    eval_cache: Path | None = None  # directory of the evaluation generation cache (default: <run_dir>/cache)
    outputs: list[Output] = field(default_factory=list)  # after training: the Outputs of the plug-ins so far
    save_adapter: Callable | None = None  # save_adapter(vec, tag) -> path
    progress: bool = True

    def log(self, record: dict) -> None:
        """Append a record to metrics.jsonl (no-op without a run directory, e.g. in a ClientApp)."""
        if self.run_dir is not None:
            self.run_dir.log(record)

    def print(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)


class Plugin:
    """Base class of attacks and defenses. Override the hooks you need; every hook defaults to a no-op."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "defense"
    section: ClassVar[str | None] = None  # dotted path of the plug-in's own config section
    Config: ClassVar[type[BaseModel] | None] = None
    order: ClassVar[int] = 50  # hooks of lower order run first (e.g. loss terms before DP-SGD replaces the trainer)
    plaintext_updates: ClassVar[str | None] = None  # why it needs plaintext individual updates (refused under HE)
    # it acts only on the final adapter (after_training), so its section leaves the training untouched: runs that
    # differ only in such sections share one training, and fedsafe.pipeline.defend_trained replays its
    # after_training hook on a trained run's final adapter (a grid's defense levels)
    after_training_only: ClassVar[bool] = False

    def __init__(self, config, ctx: RunContext):
        self.config = config
        self.ctx = ctx

    # -- config load ------------------------------------------------------------------------------------
    @classmethod
    def is_active(cls, config, setup: Setup) -> bool:
        """Whether this section turns the plug-in on (default: its ``enabled`` field)."""
        return bool(getattr(config, "enabled", False))

    @classmethod
    def check(cls, config, setup: Setup) -> None:
        """Refuse a section that cannot work with the rest of the setup: raise ``ConfigError`` naming the field."""

    @classmethod
    def declares(cls, config) -> set[str]:
        """Properties other plug-ins may check (e.g. ``server_clipping`` for client-level DP)."""
        return set()

    @classmethod
    def defense_label(cls, config) -> str | None:
        """The results.csv ``defense`` value of the defended model its ``after_training`` hook returns (the
        :class:`Output`'s ``defense``), or None: it makes no defended model (default)."""
        return None

    @classmethod
    def deployment_keys(cls, config) -> DeploymentKeys | None:
        """The key set a Flower deployment distributes for this section (clients encrypt, a key-holding SuperNode
        decrypts the sum), or None: the Flower engine reads keys only through this (default: none)."""
        return None

    def changes_local_training(self) -> str | None:
        """Why this plug-in changes the clients' local training step, or None. While any active plug-in says so,
        the clients of a round train one at a time instead of as adapters of one batched pass
        (fedsafe.fl.batched); ``client_update`` hooks run on each result either way. Default: a plug-in that
        overrides ``local_training`` is taken to change it (override this when its hook only reads the trainer)."""
        if _overrides(self, "local_training"):
            return "its local_training hook may change the training step"
        return None

    # -- the report (fedsafe.report asks every registered plug-in) --------------------------------------
    @classmethod
    def report_summary(cls, section: dict) -> list[str]:
        """Summary bullet lines (``- **...:** ...``) about the run's section, a plain mapping from config.yaml."""
        return []

    @classmethod
    def report_section(cls, run_dir: Path) -> tuple[str, list[str]] | None:
        """A section of the run's report: (heading, markdown lines), or None."""
        return None

    # -- hooks (see the module docstring) ------------------------------------------------------------------
    def client_data(self, clients: list) -> list:
        return clients

    def local_training(self, trainer):
        return trainer

    def client_update(self, result, client, global_vec, rc, trainer):
        return result

    def round_start(self, round_no: int, global_vec, rc):
        return rc

    def server_view(self, aggregator):
        return aggregator

    def aggregate(self, server) -> None:
        return None

    def round_end(self, round_no: int, record: dict, global_vec) -> None:
        return None

    def after_training(self, final_vec) -> list[Output]:
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Entry] = dict(BUILTIN)
_CLASSES: dict[str, type[Plugin]] = {}  # the plug-in classes imported so far
_CONTAINERS: dict[tuple, type] = {}  # models of top-level sections made of dotted ones (baselines.probing, ...)
_LOADED = False  # third-party entry points read


def _import(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _path(obj) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def register(cls: type[Plugin]) -> type[Plugin]:
    """Register a plug-in class by its ``name`` (usable as a class decorator; third-party plug-ins)."""
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise TypeError(f"{cls!r} is not a fedsafe.plugins.Plugin subclass")
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a plug-in needs a name")
    if cls.kind not in KINDS:
        raise ValueError(f"plug-in {cls.name!r}: kind must be one of {KINDS}, got {cls.kind!r}")
    other = _REGISTRY.get(cls.name)
    if other is not None:
        other_path = other.plugin if isinstance(other.plugin, str) else _path(other.plugin)
        if other_path == _path(cls):  # a built-in's module being imported, or a module reloaded
            _CLASSES[cls.name] = cls
            return cls
        if other.plugin is not cls and other_path.rpartition(":")[2] != cls.__qualname__:
            raise ValueError(f"plug-in name {cls.name!r} is taken by {other_path.replace(':', '.')}")
    if cls.section:
        for name, entry in _REGISTRY.items():
            if entry.section == cls.section and name != cls.name:
                raise ValueError(f"plug-in {cls.name!r}: config section {cls.section!r} is owned by {name!r}")
    _REGISTRY[cls.name] = Entry(cls, cls.section, cls.Config)
    _CLASSES[cls.name] = cls
    return cls


def _load() -> None:
    """Register the plug-ins of installed third-party packages (entry points), once."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
                if isinstance(obj, type) and issubclass(obj, Plugin) and obj.name not in _REGISTRY:
                    register(obj)
            except Exception as exc:  # a broken third-party package must not break fedsafe
                log.warning("plug-in entry point %s could not be loaded: %s", ep.name, exc)
    except Exception as exc:  # pragma: no cover - importlib.metadata failure
        log.warning("plug-in entry points could not be read: %s", exc)


def entries() -> dict[str, Entry]:
    """Every registered plug-in's entry (built-in and third-party), by name; nothing is imported."""
    _load()
    return dict(_REGISTRY)


def plugin_class(name: str) -> type[Plugin]:
    """The plug-in class registered as ``name`` (its module is imported now)."""
    cls = _CLASSES.get(name)
    if cls is not None:
        return cls
    entry = entries()[name]
    cls = _import(entry.plugin) if isinstance(entry.plugin, str) else entry.plugin
    if not (isinstance(cls, type) and issubclass(cls, Plugin)) or cls.name != name:
        raise TypeError(f"registry entry {name!r}: {entry.plugin} is not a Plugin named {name!r}")
    _CLASSES[name] = cls
    return cls


def config_model(entry: Entry) -> type[BaseModel] | Callable | None:
    """The model (or, for a role field, the parser) of an entry's config (its light module is imported)."""
    return _import(entry.config) if isinstance(entry.config, str) else entry.config


def registered(kind: str | None = None, everything: bool = True) -> list[type[Plugin]]:
    """Every registered plug-in class (of ``kind``), in hook order (imports their modules)."""
    classes = [plugin_class(name) for name in entries()]
    return sorted((c for c in classes if kind is None or c.kind == kind), key=lambda c: (c.order, c.name))


def available(kind: str | None = None) -> list[str]:
    """Names of every built-in and registered plug-in (of ``kind``)."""
    return [c.name for c in registered(kind)]


def get(name: str, kind: str | None = None) -> type[Plugin]:
    """The plug-in class registered as ``name`` (``fedsafe.attacks.get`` / ``fedsafe.defenses.get``)."""
    cls = plugin_class(name) if name in entries() else None
    if cls is None or (kind is not None and cls.kind != kind):
        raise ConfigError(f"unknown {kind or 'plug-in'} {name!r}; available: {', '.join(available(kind))}")
    return cls


# ------------------------------------------------------------------------------------------------
# Config sections: the experiment config validates every plug-in section through these
# ------------------------------------------------------------------------------------------------

def sections() -> dict[str, type[BaseModel]]:
    """Top-level config section -> its model, for every registered plug-in with a section, in registry order.

    A dotted section (``baselines.probing``) makes its top level (``baselines``) a model whose fields are the
    parts, each with its default. Only the light config modules are imported."""
    from pydantic import Field, create_model

    from fedsafe.schema import Strict

    tops: dict[str, dict[str, type[BaseModel]] | type[BaseModel]] = {}
    for name, entry in entries().items():
        if entry.section is None or entry.config is None or entry.role_field is not None:
            continue
        top, _, rest = entry.section.partition(".")
        model = config_model(entry)
        if not rest:
            tops[top] = model
        else:
            parts = tops.setdefault(top, {})
            if not isinstance(parts, dict) or "." in rest:
                raise ValueError(f"plug-in {name!r}: section {entry.section!r} nests deeper than one level or "
                                 f"under a section another plug-in owns")
            parts[rest] = model
    out: dict[str, type[BaseModel]] = {}
    for top, model in tops.items():
        if isinstance(model, dict):
            key = (top, *((k, id(v)) for k, v in model.items()))
            if key not in _CONTAINERS:
                fields = {k: (v, Field(default_factory=v, description=(v.__doc__ or "").strip().split("\n")[0]))
                          for k, v in model.items()}
                _CONTAINERS[key] = create_model(f"{top.title()}Sections", __base__=Strict,
                                                __doc__=f"``{top}``: the sections {', '.join(model)}.", **fields)
            model = _CONTAINERS[key]
        out[top] = model
    return out


def role_field_parser(name: str) -> Callable | None:
    """The validator of role field ``name`` a registered plug-in owns (e.g. ``attack``), or None."""
    for entry in entries().values():
        if entry.role_field == name:
            return config_model(entry)
    return None


def section_of(cfg, path: str | None):
    """The config object at a dotted ``path`` of ``cfg`` (a plug-in section lives in ``cfg.extensions``)."""
    if path is None:
        return None
    node = cfg
    for i, part in enumerate(path.split(".")):
        if i == 0 and isinstance(getattr(node, "extensions", None), dict) and part in node.extensions:
            node = node.extensions[part]
            continue
        node = getattr(node, part, None) if node is not None else None
    return node


def active(cfg) -> list[tuple[type[Plugin], Any]]:
    """The plug-ins ``cfg`` turns on, each with its section, in hook order."""
    return _active(cfg)


def _active(cfg) -> list[tuple[type[Plugin], Any]]:
    setup = Setup.from_config(cfg)
    out = []
    for name, entry in entries().items():
        if entry.role_field is not None and not any(getattr(r, entry.role_field, None) for r in cfg.roles):
            continue  # a role-field plug-in runs only when a role sets its field: its module stays unimported
        cls = plugin_class(name)
        config = section_of(cfg, cls.section)
        if cls.section is not None and config is None and cls.Config is not None:
            config = cls.Config()
        if cls.is_active(config, setup):
            out.append((cls, config))
    return sorted(out, key=lambda pair: (pair[0].order, pair[0].name))


def inactive_sections(cfg) -> list[str]:
    """Config sections of registered plug-ins that do not run in ``cfg`` (their data is never trained on)."""
    active = {cls.section for cls, _ in _active(cfg)}
    return sorted({e.section for e in entries().values() if e.section and e.section not in active})


def deployment_keys(cfg) -> DeploymentKeys | None:
    """The deployment key set of the plug-in of ``cfg`` that has one (:meth:`Plugin.deployment_keys`), enabled or
    not (``fedsafe flower keys`` makes keys for a config before it is switched on), else None."""
    setup = Setup.from_config(cfg)
    for name, entry in entries().items():
        if entry.role_field is not None:
            continue  # role-field plug-ins have no section (and stay unimported)
        cls = plugin_class(name)
        if cls.deployment_keys.__func__ is Plugin.deployment_keys.__func__:
            continue
        config = section_of(cfg, cls.section)
        if config is None and cls.Config is not None:
            config = cls.Config()
        keys = cls.deployment_keys(config)
        if keys is not None:
            return DeploymentKeys(keys.section, keys.params, keys.min_clients, cls.is_active(config, setup),
                                  keys.keyring)
    return None


def after_training_only_sections() -> list[str]:
    """The config sections of the registered plug-ins that act only after training
    (:attr:`Plugin.after_training_only`), on or off: what two runs may differ in and still share one training."""
    out = []
    for name, entry in entries().items():
        if entry.role_field is None and entry.section is not None and plugin_class(name).after_training_only:
            out.append(entry.section)
    return out


def after_training_defenses(cfg) -> list[tuple[type[Plugin], Any]]:
    """The active plug-ins of ``cfg`` that act only after training (each with its section), in hook order: a
    trained run's final adapter is all they need (:func:`fedsafe.pipeline.defend_trained`)."""
    return [(cls, config) for cls, config in _active(cfg) if cls.after_training_only]


def defense_label(cfg) -> str:
    """The ``defense`` value of ``cfg``'s defended row in results.csv: the labels its after-training-only plug-ins
    declare (:meth:`Plugin.defense_label`), joined by ``+``, or ``none``."""
    labels = [label for cls, config in after_training_defenses(cfg) if (label := cls.defense_label(config))]
    return "+".join(labels) or "none"


# Properties a plug-in may declare (Plugin.declares) that other plug-ins and the core check
ENCRYPTED_UPDATES = "encrypted_updates"  # the server sees only the sum of the updates, never one in plaintext
CHECKS_ROUND_SIZE = "checks_round_size"  # it replaces the rule's round-size need with its own check


def check_config(cfg, engine_may_be_flower: bool = False) -> None:
    """Config-load checks of every active plug-in, and the declared incompatibilities, in one place.

    ``ExperimentConfig`` runs it when it validates; the Flower deployment commands run it again with
    ``engine_may_be_flower=True`` (e.g. an omniscient adaptive attack is simulation only)."""
    active = _active(cfg)
    setup = Setup.from_config(cfg)
    setup.active = {cls.name: config for cls, config in active}
    setup.engine_may_be_flower = engine_may_be_flower
    for cls, config in active:
        cls.check(config, setup)
    hiders = [cls for cls, config in active if ENCRYPTED_UPDATES in cls.declares(config)]
    if hiders:
        for cls, _config in active:
            if cls.plaintext_updates:
                raise ConfigError(f"{cls.section or cls.name} {cls.plaintext_updates}; it is incompatible with "
                                  f"{hiders[0].section or hiders[0].name}.enabled")


def declared_by(cfg) -> set[str]:
    """Union of the properties the active plug-ins of ``cfg`` declare (:meth:`Plugin.declares`)."""
    out: set[str] = set()
    for cls, config in _active(cfg):
        out |= cls.declares(config)
    return out


def declared(setup: Setup) -> set[str]:
    """Union of the properties the active plug-ins declare (:meth:`Plugin.declares`)."""
    out: set[str] = set()
    for name, config in setup.active.items():
        out |= get(name).declares(config)
    return out


# ------------------------------------------------------------------------------------------------
# Composition
# ------------------------------------------------------------------------------------------------

def _overrides(plugin: Plugin, hook: str) -> bool:
    return getattr(type(plugin), hook) is not getattr(Plugin, hook)


class PluginSet:
    """The active plug-ins of one run; each method runs one hook through every plug-in that defines it."""

    def __init__(self, plugins: list[Plugin]):
        self.plugins = sorted(plugins, key=lambda p: (p.order, p.name))

    def __iter__(self):
        return iter(self.plugins)

    def __len__(self) -> int:
        return len(self.plugins)

    def names(self) -> list[str]:
        return [p.name for p in self.plugins]

    def get(self, name: str) -> Plugin | None:
        return next((p for p in self.plugins if p.name == name), None)

    def _with(self, hook: str) -> list[Plugin]:
        return [p for p in self.plugins if _overrides(p, hook)]

    def sequential_training(self) -> dict[str, str]:
        """``name -> reason`` of each active plug-in that changes local training (Plugin.changes_local_training)."""
        return {p.name: why for p in self.plugins if (why := p.changes_local_training())}

    def client_data(self, clients: list) -> list:
        for p in self._with("client_data"):
            clients = p.client_data(clients)
        return clients

    def local_training(self, trainer):
        for p in self._with("local_training"):
            trainer = p.local_training(trainer)
        return trainer

    def client_side(self, trainer):
        """``trainer`` wrapped so that every ``client_update`` hook sees each result before it is sent."""
        hooks = self._with("client_update")
        return ClientPipeline(trainer, hooks) if hooks else trainer

    def round_start(self, round_no: int, global_vec, rc):
        for p in self._with("round_start"):
            rc = p.round_start(round_no, global_vec, rc)
        return rc

    def server_view(self, aggregator):
        for p in self._with("server_view"):
            aggregator = p.server_view(aggregator)
        return aggregator

    def aggregate(self, server) -> None:
        for p in self._with("aggregate"):
            p.aggregate(server)

    def round_end(self, round_no: int, record: dict, global_vec) -> None:
        for p in self._with("round_end"):
            p.round_end(round_no, record, global_vec)

    def after_training(self, final_vec) -> list[Output]:
        outputs: list[Output] = []
        for p in self._with("after_training"):
            p.ctx.outputs = list(outputs)  # a later hook (the release gate) sees what earlier ones produced
            outputs.extend(p.after_training(final_vec) or [])
        return outputs


class ClientPipeline:
    """A local trainer followed by the ``client_update`` hooks (plain data: a ClientResult in, one out)."""

    def __init__(self, trainer, plugins: list[Plugin]):
        self.trainer = trainer
        self.plugins = plugins

    def fit(self, client, global_vec, rc, client_state: dict | None = None, on_step=None):
        kwargs = {"on_step": on_step} if on_step is not None and "on_step" in inspect.signature(
            self.trainer.fit).parameters else {}
        result = self.trainer.fit(client, global_vec, rc, client_state, **kwargs)
        for p in self.plugins:
            result = p.client_update(result, client, global_vec, rc, self.trainer)
        return result

    def plugin(self, name: str) -> Plugin | None:
        return next((p for p in self.plugins if p.name == name), None)

    def __getattr__(self, name):  # model, tokenizer, flat, ... of the wrapped trainer
        if name in ("trainer", "plugins"):
            raise AttributeError(name)
        return getattr(self.trainer, name)


def build(cfg: ExperimentConfig, ctx: RunContext) -> PluginSet:
    """Instantiate the active plug-ins of ``cfg``, each with its own section and the shared ``ctx``."""
    plugins = [cls(config, ctx) for cls, config in _active(cfg)]
    ctx.active = {p.name: p.config for p in plugins}
    if plugins:
        log.info("plug-ins: %s", ", ".join(f"{p.name} ({p.kind})" for p in sorted(plugins, key=lambda p: p.order)))
    return PluginSet(plugins)


def client_trainer(cfg: ExperimentConfig, model, tokenizer, he_client_context: bytes | None = None):
    """The client side of ``cfg`` for a process that only trains (a Flower ClientApp): a local trainer with
    the ``local_training`` hooks applied, followed by the ``client_update`` hooks."""
    from fedsafe.fl.client import LocalTrainer

    setup = Setup.from_config(cfg)
    ctx = RunContext(**vars(setup), model=model, tokenizer=tokenizer, he_client_context=he_client_context)
    plugins = build(cfg, ctx)
    ctx.trainer = plugins.local_training(LocalTrainer(model, tokenizer))
    return plugins.client_side(ctx.trainer)
