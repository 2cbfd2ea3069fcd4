"""Sign flipping: a model-poisoning attack that sends the negated (and scaled) update of the attacker itself.

Damaskinos et al., "Asynchronous Byzantine Machine Learning (the case of SGD)" (ICML 2018) and Li et al.,
"RSA: Byzantine-Robust Stochastic Aggregation Methods for Distributed Learning" (AAAI 2019) use it as a
standard Byzantine baseline: a malicious client trains honestly on its own data and sends

    delta_sent = -scale * delta_own

(non-omniscient: it needs no other client's update, and each attacker flips a different update). This is
**not** byzfl's ``SignFlipping``, which is omniscient and sends the negated mean of the honest clients'
updates, -mean(honest), identical for every attacker; against distance- and cluster-based rules (Krum,
DnC, FoolsGold) the two behave differently, so results are not interchangeable.

Against FedAvg it cancels benign progress; robust rules that bound each client's influence (median, trimmed
mean, Krum) are meant to resist it. Hook: ``client_update`` (client side, so it runs in Flower ClientApps
unchanged); only the clients of ``roles`` (default: every malicious role) flip. No paper is about LLM safety
here: this is the untargeted reference next to the safety attacks.

    sign_flip: {enabled: true, scale: 1.0}
"""

from __future__ import annotations

from pydantic import Field

from fedsafe.errors import ConfigError
from fedsafe.plugins import Plugin, register
from fedsafe.schema import Strict


class SignFlipConfig(Strict):
    """Malicious clients send -scale times their honest update."""

    enabled: bool = False
    scale: float = Field(1.0, gt=0, description="magnitude of the flipped update relative to the honest one")
    roles: list[str] | None = Field(None, description="roles whose clients flip (default: every malicious role)")


@register
class SignFlip(Plugin):
    """Flip (and scale) the update of every attacking client before it is sent."""

    name = "sign_flip"
    kind = "attack"
    section = "sign_flip"
    Config = SignFlipConfig
    order = 30  # before secure aggregation encrypts the update (order 90)

    @classmethod
    def check(cls, config, setup) -> None:
        roles = {r.name: r for r in setup.roles}
        names = config.roles if config.roles is not None else [r.name for r in setup.roles if r.is_malicious]
        unknown = sorted(set(names) - set(roles))
        if unknown:
            raise ConfigError(f"sign_flip.roles: {unknown} are not roles (roles: {sorted(roles)})")
        if not names:
            raise ConfigError("sign_flip.enabled=true but no role attacks: add a malicious role or set "
                              "sign_flip.roles")

    def client_update(self, result, client, global_vec, rc, trainer):
        flips = (client.role in self.config.roles) if self.config.roles is not None else client.malicious
        if flips:
            result.update = -self.config.scale * result.update
            result.metrics = {**result.metrics, "sign_flip": self.config.scale}
        return result
