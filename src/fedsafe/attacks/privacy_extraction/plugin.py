"""Training-data extraction by a participating client, as a plug-in.

Guo et al., "Can Federated Learning Safeguard Private Data in LLM Training?" (Findings of EMNLP 2025): a client
keeps the global adapters it receives and attacks them with zero-input generation, partial-input completion,
multi-round tracking and loss-based membership inference; optional canaries (Carlini et al., "The Secret
Sharer", USENIX Security 2019) are inserted into victims' data first. Hooks: ``client_data`` (canaries),
``round_end`` (observe each global adapter; attack every k rounds), ``after_training`` (the final attack and
the leakage/utility table). The attacks live in :mod:`fedsafe.attacks.privacy_extraction.extraction`.
"""

from __future__ import annotations

from fedsafe.attacks.privacy_extraction.config import PrivacyConfig
from fedsafe.errors import ConfigError
from fedsafe.plugins import Output, Plugin, register


@register
class PrivacyExtraction(Plugin):
    """A participating client extracts other clients' training text from the global models."""

    name = "privacy_extraction"
    kind = "attack"
    section = "privacy"
    Config = PrivacyConfig
    order = 5  # canaries go into the victims' data before anything else sees it

    @classmethod
    def check(cls, config, setup) -> None:
        if config.victim_roles is not None:
            known = {r.name for r in setup.roles}
            unknown = sorted(set(config.victim_roles) - known)
            if unknown:
                raise ConfigError(f"privacy.victim_roles: {unknown} are not roles (roles: {sorted(known)})")

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.canaries: list = []
        self.attacker = None

    def client_data(self, clients: list) -> list:
        from fedsafe.attacks.privacy_extraction.extraction import prepare_canaries

        ctx = self.ctx
        self.canaries = prepare_canaries(self.config, clients, ctx.tokenizer, seed=ctx.seed, data=ctx.data,
                                         run_dir=ctx.run_dir)
        return clients

    def _attacker(self):
        if self.attacker is None:
            from fedsafe.attacks.privacy_extraction.extraction import build_attacker

            ctx = self.ctx
            self.attacker = build_attacker(self.config, ctx.model, ctx.tokenizer, ctx.flat, ctx.init_vec, ctx.clients,
                                           self.canaries, seed=ctx.seed, data=ctx.data, run_dir=ctx.run_dir)
        return self.attacker

    def round_start(self, round_no: int, global_vec, rc):
        self._attacker()  # built before the first round: it keeps every global adapter from round 0 on
        return rc

    def round_end(self, round_no: int, record: dict, global_vec) -> None:
        attacker = self._attacker()
        attacker.observe(round_no, global_vec)
        if self.config.every and round_no % self.config.every == 0 and round_no < self.ctx.fl.rounds:
            attacker.run(round_no)

    def after_training(self, final_vec) -> list[Output]:
        from fedsafe.evaluation.leakage import write_leakage_utility

        attacker = self._attacker()
        attacker.observe(self.ctx.fl.rounds, final_vec)
        attacker.run(self.ctx.fl.rounds)
        write_leakage_utility([self.ctx.run_dir.path], self.ctx.run_dir.path)
        return []
