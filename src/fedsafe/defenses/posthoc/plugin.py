"""The server's post-hoc safety fine-tune as a plug-in (Ye et al., "Emerging Safety Attack and Defense in
Federated Instruction Tuning of Large Language Models", ICLR 2025).

After the last round the server fine-tunes the aggregated adapter on defense data: level 1 samples datasets
it holds, level 2 has an external model generate them, level 3 has the aggregated model itself generate them.
Hook ``after_training`` returns the defended adapter (saved as ``adapters/posthoc`` and evaluated as
``posthoc_l<level>``). The mechanism lives in :mod:`fedsafe.defenses.posthoc.finetune`,
the section in :mod:`fedsafe.defenses.posthoc.config`.
"""

from __future__ import annotations

from fedsafe.defenses.posthoc.config import PosthocConfig
from fedsafe.plugins import Output, Plugin, register


@register
class PosthocFinetune(Plugin):
    """Fine-tune the final adapter on aligned + normal defense data."""

    name = "posthoc"
    kind = "defense"
    section = "posthoc"
    Config = PosthocConfig
    order = 70
    after_training_only = True  # it fine-tunes the final adapter: a grid's defense levels share one training

    def round_start(self, round_no: int, global_vec, rc):
        """Level 1 with the utility guard: split the defense data now, so that a pool too small for
        ``validation_rows`` is an error before training, not after it (levels 2/3 generate at the end)."""
        if self.config.level == 1 and self.config.validation_rows and not getattr(self, "_checked", False):
            from fedsafe.defenses.posthoc.finetune import defense_data

            defense_data(self.config, self.ctx.seed + 4242, self.ctx)
            self._checked = True
        return rc

    @classmethod
    def defense_label(cls, config) -> str:
        return f"posthoc_l{config.level}"

    @classmethod
    def report_summary(cls, section: dict) -> list[str]:
        if not section.get("enabled"):
            return []
        return [f"- **Post-hoc defense:** level {section.get('level')}, {section.get('n_samples')} samples "
                f"({section.get('aligned_ratio')} aligned), {section.get('steps')} steps"]

    def after_training(self, final_vec) -> list[Output]:
        from fedsafe.defenses.posthoc.finetune import posthoc_defense

        defended = posthoc_defense(self.config, self.ctx, final_vec)
        return [Output("posthoc", defended, defense=self.defense_label(self.config))]
