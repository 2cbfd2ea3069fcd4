"""Adaptive attacks: malicious clients that craft their update against the defense (issue 18).

One module per attack, each citing its paper and formula, each a pure function on tensors
``craft(h [d], benign [m, d], n, f, cfg) -> (update [d], info)``:

    scaling        Bhagoji et al. (ICML 2019): lambda * h, or h at the benign norm (norm_match)
    alie           Baruch et al. (NeurIPS 2019): mu + z sigma sign(h - mu), z from n and f
    ipm            Xie et al. (UAI 2019): -epsilon mu
    minmax/minsum  Shejwalkar & Houmansadr (NDSS 2021): mu + gamma h/||h||, largest gamma within the benign
                   max (summed) distances
    mixing         trains on a share of normal data mixed into the unaligned data
    probe_evasion  keeps the probe's slice (first layer's LoRA B) at the benign shadows' value, or trains it on
                   normal data only (slice: normal_data); start_round (every attack) attacks only from round k
    collusion      sybils send one identical update (or it with small noise), FoolsGold's case; each sybil
                   trains it itself from a shared seed and shared data (no communication)

Configured per malicious role: ``roles: [{name: malicious, ..., attack: {name: alie, knowledge: partial}}]``.
Where they run: :mod:`fedsafe.attacks.adaptive.plugin`.
"""

from fedsafe.attacks.adaptive.base import ATTACKS, AttackConfig, craft, parse_attack
from fedsafe.attacks.adaptive.plugin import AdaptiveAttack  # registers the plug-in (fedsafe.plugins)

__all__ = ["ATTACKS", "AdaptiveAttack", "AttackConfig", "craft", "parse_attack"]
