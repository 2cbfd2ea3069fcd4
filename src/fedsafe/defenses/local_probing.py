"""Local-model probing as a plug-in: a baseline the post-hoc defense is compared with (Ye et al., reviewers).

The server generates answers with each client's plaintext local model on a few harmful prompts and excludes
clients whose models comply (absolutely, or relative to the global model's compliance for bases that are not
safety-aligned). Hook ``server_view`` wraps the rule; it needs plaintext local models, so it is refused under
secure aggregation. The mechanism lives in :mod:`fedsafe.defenses.baselines`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedsafe.plugins import Plugin, register
from fedsafe.schema import Strict


class LocalProbingConfig(Strict):
    """Baseline: the server probes each local model on harmful prompts and excludes compliant clients.

    Needs plaintext local models: incompatible with secure aggregation (see fedsafe.defenses.baselines).
    """

    enabled: bool = False
    prompts: str | None = Field(None, description="harmful prompts file (CSV/JSON/JSONL); None: the base model "
                                                  "generates them with the datagen pipeline")
    n_prompts: int = Field(8, ge=1, description="probe prompts per client")
    max_new_tokens: int = Field(32, ge=1, description="answer length when probing")
    criterion: Literal["relative", "absolute"] = Field(
        "relative", description="absolute: exclude if compliance > threshold; relative: if compliance > the "
                                "global model's + margin (for bases that are not safety-aligned)")
    threshold: float = Field(0.5, ge=0, le=1, description="absolute criterion: compliance share to exclude")
    margin: float = Field(0.25, ge=0, le=1, description="relative criterion: allowed excess compliance")


@register
class LocalProbing(Plugin):
    """Exclude clients whose local model answers harmful probe prompts."""

    name = "local_probing"
    kind = "defense"
    section = "baselines.probing"
    Config = LocalProbingConfig
    order = 40
    plaintext_updates = "needs each client's plaintext local model"

    def server_view(self, aggregator):
        from fedsafe.defenses.baselines import wrap_probing

        ctx = self.ctx
        wrapped = wrap_probing(self.config, aggregator, ctx.model, ctx.tokenizer, ctx.flat, model_name=ctx.model_name,
                               seed=ctx.seed, rule_list=ctx.eval.rule_list, generator_cache=ctx.generator_cache)
        ctx.flat.set(ctx.init_vec)  # prompt generation may have used the model
        return wrapped
