"""Personalization as a plug-in: a baseline the post-hoc defense is compared with (Ye et al., reviewers).

After the last round each benign client fine-tunes the final global model on its own data (hook
``after_training``); the personal adapters are saved under ``adapters/personalized/<client_id>``. The
mechanism lives in :func:`fedsafe.defenses.baselines.personalize`.
"""

from __future__ import annotations

from pydantic import Field

from fedsafe.plugins import Output, Plugin, register
from fedsafe.schema import Strict


class PersonalizationConfig(Strict):
    """Baseline: each benign client fine-tunes the final global model on its own data."""

    enabled: bool = False
    steps: int = Field(10, ge=1, description="fine-tuning steps per benign client")
    lr: float | None = Field(None, gt=0, description="default: fl.lr")


@register
class Personalization(Plugin):
    """Each benign client fine-tunes the final model on its own data."""

    name = "personalization"
    kind = "defense"
    section = "baselines.personalization"
    Config = PersonalizationConfig
    order = 80

    def after_training(self, final_vec) -> list[Output]:
        from fedsafe.defenses.baselines import personalize

        personal = personalize(self.config, self.ctx, final_vec)
        return [Output(f"personalized/{cid}", vec) for cid, vec in personal.items()]
