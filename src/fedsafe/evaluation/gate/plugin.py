"""The release gate as a plug-in: after training, gate the run's last output adapter against ``gate.policy``,
write ``gate.json`` and log a ``gate`` record that the report shows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fedsafe.errors import ConfigError
from fedsafe.evaluation.gate.config import GATE_JSON, GateConfig, GatePolicy, load_policy
from fedsafe.plugins import Plugin, register

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fedsafe.evaluation.gate.verdict import GateVerdict


@register
class Gate(Plugin):
    """Release gate after training: gate.json in the run directory, a ``gate`` record, the report's verdict."""

    name = "gate"
    kind = "defense"
    section = "gate"
    Config = GateConfig
    order = 99  # after every other after_training hook: it gates the last adapter they produced

    @classmethod
    def is_active(cls, config: GateConfig, setup=None) -> bool:
        return config is not None and config.policy is not None

    @classmethod
    def check(cls, config: GateConfig, setup) -> None:
        """At config load: the policy file must exist and parse (ValueError naming ``policy``)."""
        if config.policy is None or isinstance(config.policy, GatePolicy):
            return
        try:
            load_policy(config.policy)
        except ConfigError as exc:
            raise ConfigError(f"gate.policy: {exc}") from None
        if config.reference not in (None, "base") and not Path(config.reference).exists():
            raise ConfigError(f"gate.reference: {config.reference}: no such adapter or run directory")

    @classmethod
    def report_section(cls, run_dir: Path) -> tuple[str, list[str]] | None:
        """The verdict (gate.json or the ``gate`` record) under "Release gate"."""
        from fedsafe.evaluation.gate.verdict import report_section

        return "Release gate", report_section(run_dir)

    def __init__(self, config: GateConfig, ctx):
        self.config = config
        self.ctx = ctx
        self.policy = (config.policy if isinstance(config.policy, GatePolicy) else load_policy(config.policy))
        self.verdict: GateVerdict | None = None

    def after_training(self, final_vec) -> list:
        """Gate the last output adapter (the post-hoc one when a defense produced it; else ``final_vec``)."""
        from fedsafe.evaluation.gate.verdict import evaluate_gate, print_verdict, resolve_adapter
        from fedsafe.evaluation.runner import noop_adapter_key

        ctx = self.ctx
        vec, tag = final_vec, "final"
        outputs = ctx.outputs  # the Outputs saved so far
        if outputs:
            vec, tag = outputs[-1].vec, outputs[-1].tag
        ref: str | torch.Tensor = self.config.reference or (
            self.policy.helpfulness_proxy.reference if self.policy.helpfulness_proxy else "base")
        if ref != "base":
            from safetensors.torch import load_file

            ref_dir, _ = resolve_adapter(ref, "gate.reference")
            ref = ctx.flat.from_state_dict(load_file(str(ref_dir / "adapter_model.safetensors")))
        run_path = Path(ctx.run_dir.path)
        eval_cfg = ctx.eval
        cache = ctx.eval_cache or run_path / "cache"
        info = {"adapter": str(run_path / "adapters" / tag), "run_dir": str(run_path), "model": ctx.model_name,
                "reference": ref if isinstance(ref, str) else str(self.config.reference)}
        self.verdict = evaluate_gate(ctx.model, ctx.tokenizer, ctx.flat, vec, self.policy, base_eval=eval_cfg,
                                     heldout=ctx.data.heldout, max_length=ctx.data.max_length, cache_dir=cache,
                                     reference=ref if self.policy.helpfulness_proxy else None,
                                     strict=self.config.strict, progress=True, info=info,
                                     adapter_key=noop_adapter_key(ctx.model, ctx.flat, vec))
        ctx.run_dir.write_json(GATE_JSON, json.loads(self.verdict.to_json()))
        ctx.log({"type": "gate", "passed": self.verdict.passed, "verdict": self.verdict.verdict,
                 "mode": self.verdict.mode, "adapter": tag, "failed": self.verdict.failed,
                 "verdict_json": json.loads(self.verdict.to_json())})
        if ctx.console is not None:
            print_verdict(self.verdict, ctx.console)
        return []
