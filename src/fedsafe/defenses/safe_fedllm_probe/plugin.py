"""The Safe-FedLLM probe as a plug-in (Tao et al., ACL 2026), trained on the server's own shadow clients.

The server trains shadow clients on benign and on unaligned data it holds, fits a classifier on their LoRA
updates (by default LoRA B of the first layer) and scores each client's update; flagged clients are excluded or
down-weighted before the rule (``aggregator.name: probe`` or ``probe+<rule>``). Hook ``server_view`` builds the
probe around the rule and gives the server the shadow trainer, whose shadows train at the start of each refit
round. The probe reads plaintext updates, so it is refused under secure aggregation (by the rule check of
:func:`fedsafe.defenses.secure_aggregation.params.check_compatible`). The classifier lives in :mod:`fedsafe.aggregators.probe`,
the shadows in :mod:`fedsafe.defenses.safe_fedllm_probe.shadow`, the section in
:mod:`fedsafe.defenses.safe_fedllm_probe.config`.
"""

from __future__ import annotations

from fedsafe.defenses.safe_fedllm_probe.config import ProbeConfig, uses_probe
from fedsafe.errors import ConfigError
from fedsafe.plugins import Plugin, register


@register
class SafeFedLLMProbe(Plugin):
    """Flag clients whose LoRA update a shadow-trained probe scores as unaligned."""

    name = "probe"
    kind = "defense"
    section = "probe"
    Config = ProbeConfig
    order = 30
    plaintext_updates = "reads each client's plaintext LoRA update"

    @classmethod
    def is_active(cls, config, setup) -> bool:
        return uses_probe(setup.aggregator.name)

    @classmethod
    def check(cls, config, setup) -> None:
        mode, kind = setup.fl.lora_aggregation, config.features.kind
        if mode == "ffa" and kind == "A":
            raise ConfigError("probe.features.kind=A reads LoRA A, which fl.lora_aggregation=ffa never trains (its "
                              "update is always zero): use probe.features.kind=B")
        if mode == "rolora" and kind != "both":
            raise ConfigError(f"probe.features.kind={kind} reads one LoRA factor, which fl.lora_aggregation=rolora "
                              "freezes every other round (its update is then zero and the probe sees nothing): use "
                              "probe.features.kind=both")

    def server_view(self, aggregator):
        from fedsafe import aggregators
        from fedsafe.aggregators.probe import with_probe_config
        from fedsafe.defenses.safe_fedllm_probe.shadow import build_shadow

        ctx = self.ctx
        agg = ctx.aggregator
        probe = aggregators.get(agg.name, **with_probe_config(agg.name, agg.params, self.config, ctx.seed))
        if getattr(probe, "needs_shadow", False):  # the probe fits on the server's own shadow clients
            ctx.server.shadow = build_shadow(self.config, ctx.trainer, ctx.generator_cache, data=ctx.data,
                                             seed=ctx.seed, aggregator_name=agg.name)
            ctx.flat.set(ctx.init_vec)  # shadow data generation may have used the model
        return probe

