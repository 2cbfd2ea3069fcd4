"""The server's root dataset for FLTrust, as a plug-in: it trains the server update g_0 every round.

FLTrust (Cao et al., NDSS 2021; the rule is :mod:`fedsafe.aggregators.fltrust`) needs the server's own update
on a small clean root dataset, trained from the current global model like a client's. This plug-in is active
when ``aggregator.name`` uses ``fltrust`` (alone or behind a step: ``nnm+fltrust``). Hook ``server_view``
loads and tokenises the root rows once and gives the rule ``root_update(global_vec, rc)``, which the rule calls
in its ``prepare`` at the start of each round: one local training run (the same trainer as the clients, the
round's learning rate, batch size and ``fl.local_steps`` unless ``fltrust.steps`` is set) on the fixed root
sample, seeded by (seed, round).

Root data (``fltrust.root``): data sources the server holds. Left out, it is the post-hoc defense's aligned +
normal data when ``posthoc`` is enabled (the natural clean set of a safety-minded server); otherwise it must be
given (e.g. the same sources as ``posthoc.aligned`` and ``posthoc.normal``). The paper's root sets have 100
examples (``samples``).
"""

from __future__ import annotations

from pydantic import Field

from fedsafe.errors import ConfigError
from fedsafe.plugins import Plugin
from fedsafe.schema import DataSource, Strict


class FLTrustRootConfig(Strict):
    """The root dataset of FLTrust's server update (Cao et al., NDSS 2021)."""

    root: list[DataSource] | None = Field(None, description="data sources of the server's clean root dataset "
                                          "(default: posthoc.aligned + posthoc.normal when posthoc is enabled)")
    samples: int = Field(100, ge=1, description="root examples drawn once (seeded) from the sources (the paper: 100)")
    steps: int | None = Field(None, ge=1, description="local steps of the server's training (default: fl.local_steps)")
    seed: int | None = Field(None, ge=0, lt=2 ** 32, description="root sampling and training seed (default: seed)")


def uses_fltrust(aggregator_name: str) -> bool:
    """Whether a rule name selects FLTrust (``fltrust`` or a composition ending in it)."""
    return "fltrust" in [part.strip() for part in (aggregator_name or "").split("+")]


def root_sources(config: FLTrustRootConfig, active: dict) -> list[DataSource]:
    """The root data sources: ``fltrust.root``, else the enabled post-hoc defense's aligned + normal sources."""
    if config.root:
        return list(config.root)
    posthoc = active.get("posthoc")
    sources = [*(getattr(posthoc, "aligned", None) or []), *(getattr(posthoc, "normal", None) or [])]
    if not sources:
        raise ConfigError("fltrust.root: aggregator.name=fltrust needs the server's clean root dataset; give "
                          "fltrust.root (e.g. the post-hoc defense's sources: [{path: 'starter:train', categories: "
                          "[aligned]}, {path: 'starter:train', categories: [normal]}]) or enable posthoc with "
                          "posthoc.aligned / posthoc.normal")
    return sources


class FLTrustRoot(Plugin):
    """Train the server's FLTrust update on the root dataset at the start of every round."""

    name = "fltrust"
    kind = "defense"
    section = "fltrust"
    Config = FLTrustRootConfig
    order = 25
    plaintext_updates = "(FLTrust) compares each client's plaintext LoRA update with the server's"

    @classmethod
    def is_active(cls, config, setup) -> bool:
        return uses_fltrust(setup.aggregator.name)

    @classmethod
    def check(cls, config, setup) -> None:
        root_sources(config, setup.active)

    def server_view(self, aggregator):
        from fedsafe.aggregators.fltrust import FLTrust
        from fedsafe.aggregators.wrappers import find_rule

        rule = find_rule(aggregator, FLTrust)
        if rule is None:  # a plug-in wrapped the rule in a way the chain does not show: nothing to feed
            raise ConfigError(f"aggregator.name={self.ctx.aggregator.name!r}: no FLTrust rule found to give the "
                              "server update to")
        rule.root_update = self._root_trainer()
        return aggregator

    def _root_trainer(self):
        import random
        from dataclasses import replace

        from fedsafe.data import load_pool
        from fedsafe.data.format import tokenize_rows
        from fedsafe.data.client_data import ClientData
        from fedsafe.fl.client import derive_seed

        ctx, cfg = self.ctx, self.config
        seed = cfg.seed if cfg.seed is not None else ctx.seed
        rows = load_pool(root_sources(cfg, ctx.active), seed + 5200, ctx.generator_cache)
        examples = tokenize_rows(ctx.tokenizer, rows, ctx.data.max_length, ctx.data.system_prompt)
        if not examples:
            raise ConfigError("fltrust.root: the root data sources gave no example")
        rng = random.Random(derive_seed(seed, "fltrust_root"))
        picked = rng.sample(range(len(examples)), min(cfg.samples, len(examples)))
        root = ClientData("server_root", "server", [examples[i] for i in picked])
        trainer, steps = ctx.trainer, cfg.steps
        if ctx.flat is not None and ctx.init_vec is not None:
            ctx.flat.set(ctx.init_vec)  # generated root data may have used the model

        def root_update(global_vec, rc):
            root_rc = replace(rc, local_steps=steps or rc.local_steps, seed=derive_seed(seed, "fltrust", rc.round),
                              algorithm="fedavg" if rc.algorithm == "scaffold" else rc.algorithm, scaffold_c=None)
            return trainer.fit(root, global_vec, root_rc, {}).update

        return root_update
