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
is registered with :func:`register`. It receives its own section and a :class:`RunContext` (the services of
the run: the one model in memory, the tokenizer, the run directory, the shared settings), never the whole
experiment config. Client hooks (``local_training``, ``client_update``) see plain data only, so a Flower
ClientApp builds them with :func:`client_trainer` from the same config and runs them unchanged.

Compatibility is declared, not scattered: :meth:`Plugin.check` validates a section against the rest of the
setup at config load (before a model is loaded), and :attr:`Plugin.plaintext_updates` says that a plug-in
needs each client's plaintext update, which :func:`check_config` refuses under secure aggregation in one place.

``docs/extending.md`` walks through adding an attack and a defense.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from fedsafe.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from pydantic import BaseModel

    from fedsafe.config import ExperimentConfig

log = logging.getLogger("fedsafe")

HOOKS = ("client_data", "local_training", "client_update", "round_start", "server_view", "aggregate",
         "round_end", "after_training")
KINDS = ("attack", "defense")

# the built-in plug-ins, imported on first use of the registry (each module is light: config + hooks; the
# implementation it drives is imported inside the hooks)
BUILTIN_MODULES = (
    "fedsafe.attacks.data_poisoning",
    "fedsafe.attacks.privacy_extraction",
    "fedsafe.defenses.constrained_updates",
    "fedsafe.defenses.differential_privacy",
    "fedsafe.defenses.safe_fedllm_probe",
    "fedsafe.defenses.local_probing",
    "fedsafe.defenses.secure_aggregation",
    "fedsafe.defenses.posthoc_finetune",
    "fedsafe.defenses.personalization",
    "fedsafe.defenses.weak_dp",
    "fedsafe.attacks.sign_flip",
)
# built-in plug-ins whose modules import torch: imported only when a config uses their top-level section (or when
# the whole registry is listed), so that validating a config stays light (a Flower query handler, `--help`)
LAZY_MODULES = {
    "gate": "fedsafe.defenses.gate",
    "server_view": "fedsafe.attacks.server_view.plugin",
}
# the adaptive attacks (fedsafe.attacks.adaptive) have no section: RoleConfig imports them when a role sets
# ``attack`` (their own models validate it), which registers the plug-in
ADAPTIVE_MODULE = "fedsafe.attacks.adaptive.plugin"
ENTRY_POINT_GROUP = "fedsafe.plugins"  # third-party packages: [project.entry-points."fedsafe.plugins"]


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
    fl: Any
    data: Any
    lora: Any
    aggregator: Any
    roles: list
    eval: Any
    num_clients: int
    clients_per_round: int
    active: dict[str, Any] = field(default_factory=dict)  # name -> section of every active plug-in
    engine_may_be_flower: bool = False  # a Flower deployment: client hooks run on other machines

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Setup:
        return cls(seed=cfg.seed, model_name=cfg.model.name, fl=cfg.fl, data=cfg.data, lora=cfg.lora,
                   aggregator=cfg.aggregator, roles=list(cfg.roles), eval=cfg.eval, num_clients=cfg.num_clients,
                   clients_per_round=cfg.clients_per_round)


@dataclass
class RunContext(Setup):
    """The services a plug-in uses at run time. In a Flower ClientApp only the shared settings and the
    client-side keys are set; the server-side services (run directory, evaluation) are None there."""

    model: Any = None  # the PEFT model: one in memory, adapters are swapped in as flat vectors
    tokenizer: Any = None
    flat: Any = None  # fedsafe.fl.params.FlatLoRA of ``model``
    init_vec: Any = None  # the initial adapter
    run_dir: Any = None  # fedsafe.rundir.RunDir
    console: Any = None
    generator_cache: dict | None = None  # lets data generation reuse the loaded model
    clients: list = field(default_factory=list)  # the clients, after the client_data hooks
    trainer: Any = None  # the local trainer after the local_training hooks (shadow clients train with it)
    he_server_context: bytes | None = None  # a deployment's server: the public CKKS context only
    he_client_context: bytes | None = None  # a ClientApp's secret-key CKKS context
    evaluate: Callable | None = None  # evaluate(vec, defense=label) -> results row
    eval_cache: Any = None  # directory of the evaluation generation cache (default: <run_dir>/cache)
    outputs: list = field(default_factory=list)  # after training: the Outputs of the plug-ins that ran so far
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

    def changes_local_training(self) -> str | None:
        """Why this plug-in changes the clients' local training step, or None. While any active plug-in says so,
        the clients of a round train one at a time instead of as adapters of one batched pass
        (fedsafe.fl.batched); ``client_update`` hooks run on each result either way. Default: a plug-in that
        overrides ``local_training`` is taken to change it (override this when its hook only reads the trainer)."""
        if _overrides(self, "local_training"):
            return "its local_training hook may change the training step"
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

_REGISTRY: dict[str, type[Plugin]] = {}
_LOADED = False


def register(cls: type[Plugin]) -> type[Plugin]:
    """Register a plug-in class by its ``name`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise TypeError(f"{cls!r} is not a fedsafe.plugins.Plugin subclass")
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a plug-in needs a name")
    if cls.kind not in KINDS:
        raise ValueError(f"plug-in {cls.name!r}: kind must be one of {KINDS}, got {cls.kind!r}")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"plug-in name {cls.name!r} is taken by {other.__module__}.{other.__qualname__}")
    if cls.section:
        for o in _REGISTRY.values():
            if o.section == cls.section and o.name != cls.name and o is not cls:
                raise ValueError(f"plug-in {cls.name!r}: config section {cls.section!r} is owned by {o.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
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


def load_lazy(section: str | None = None) -> None:
    """Import the lazily registered built-in plug-in that owns top-level ``section`` (all of them when None)."""
    mods = LAZY_MODULES.values() if section is None else [LAZY_MODULES[section]] if section in LAZY_MODULES else []
    for mod in mods:
        importlib.import_module(mod)
    if section is None:
        importlib.import_module(ADAPTIVE_MODULE)


def registered(kind: str | None = None, everything: bool = False) -> list[type[Plugin]]:
    """Every registered plug-in class (of ``kind``), in hook order; ``everything`` also imports the lazily
    registered built-ins (else only those a config has used so far)."""
    _load()
    if everything:
        load_lazy()
    return sorted((c for c in _REGISTRY.values() if kind is None or c.kind == kind), key=lambda c: (c.order, c.name))


def available(kind: str | None = None) -> list[str]:
    """Names of every built-in and registered plug-in (of ``kind``)."""
    return [c.name for c in registered(kind, everything=True)]


def get(name: str, kind: str | None = None) -> type[Plugin]:
    """The plug-in class registered as ``name`` (``fedsafe.attacks.get`` / ``fedsafe.defenses.get``)."""
    _load()
    cls = _REGISTRY.get(name)
    if cls is None:
        load_lazy()
        cls = _REGISTRY.get(name)
    if cls is None or (kind is not None and cls.kind != kind):
        raise ConfigError(f"unknown {kind or 'plug-in'} {name!r}; available: {', '.join(available(kind))}")
    return cls


# ------------------------------------------------------------------------------------------------
# Config sections
# ------------------------------------------------------------------------------------------------

def section_of(cfg, path: str | None):
    """The config object at a dotted ``path`` of ``cfg`` (a third-party section lives in ``cfg.extensions``)."""
    if path is None:
        return None
    node = cfg
    for i, part in enumerate(path.split(".")):
        if i == 0 and not hasattr(node, part) and isinstance(getattr(node, "extensions", None), dict):
            node = node.extensions.get(part)
            continue
        node = getattr(node, part, None) if node is not None else None
    return node


def extension_sections() -> dict[str, type[Plugin]]:
    """Top-level sections of registered plug-ins that ExperimentConfig does not declare itself."""
    from fedsafe.config import ExperimentConfig

    out = {}
    for cls in registered():
        if cls.section and cls.Config is not None:
            top = cls.section.split(".")[0]
            if top not in ExperimentConfig.model_fields:
                out[top] = cls
    return out


def _active(cfg) -> list[tuple[type[Plugin], Any]]:
    setup = Setup.from_config(cfg)
    out = []
    for cls in registered():
        config = section_of(cfg, cls.section)
        if cls.section is not None and config is None and cls.Config is not None:
            config = cls.Config()
        if cls.is_active(config, setup):
            out.append((cls, config))
    return out


def inactive_sections(cfg) -> list[str]:
    """Config sections of registered plug-ins that do not run in ``cfg`` (their data is never trained on)."""
    active = {cls.section for cls, _ in _active(cfg)}
    return sorted({cls.section for cls in registered() if cls.section and cls.section not in active})


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
    if any(cls.name == "secure_aggregation" for cls, _ in active):
        for cls, _config in active:
            if cls.plaintext_updates:
                raise ConfigError(f"{cls.section or cls.name} {cls.plaintext_updates}; it is incompatible with "
                                  "secure_agg.enabled")


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
        """``name -> reason`` of every active plug-in that changes local training (:meth:`Plugin.changes_local_training`)."""
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

    def fit(self, client, global_vec, rc, client_state: dict | None = None):
        result = self.trainer.fit(client, global_vec, rc, client_state)
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
