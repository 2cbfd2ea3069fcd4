"""What every adaptive attack shares: its config base, the benign statistics, and the registry by name.

The *harmful direction* ``h`` is the update a malicious client gets by training honestly on its unaligned
data (plain data poisoning). An adaptive attack turns ``h`` into the update it sends, using statistics of the
benign updates ``benign [m, d]``: their mean mu, coordinate standard deviation sigma and distances. Where those
come from is the attack's ``knowledge``:

- ``partial`` (default, realistic): the attacker trains ``shadows`` benign shadow updates itself, from the
  global adapter it received, on benign-looking data it holds (``benign_data``; default the starter set's
  normal rows). Runs on the client, so it works unchanged in Flower ClientApps.
- ``full`` (omniscient, simulation only): the benign clients' actual updates of the round, seen on the server
  before the rule runs. Refused for the Flower engine (:func:`check_engine`).

Every crafting function is pure: ``craft(h [d], benign [m, d], n, f, cfg) -> (update [d], info)`` with ``n``
the clients per round and ``f`` the malicious clients among them.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedsafe.config import DataSource


class AttackConfig(BaseModel):
    """Options common to every adaptive attack (``roles[i].attack``); each attack adds its own fields."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="attack name: " + ", ".join(
        ("scaling", "alie", "ipm", "minmax", "minsum", "mixing", "probe_evasion", "collusion")))
    knowledge: Literal["partial", "full"] = Field(
        "partial", description="partial: benign statistics from the attacker's own benign shadow training "
                               "(works in Flower); full: the benign clients' actual updates of the round "
                               "(omniscient, simulation only)")
    benign_data: list[DataSource] = Field(
        default_factory=lambda: [DataSource(path="starter:train", categories=["normal"])],
        description="benign-looking data the attacker holds (its shadows and mixing/probe evasion train on it)")
    shadows: int = Field(4, ge=2, description="benign shadow updates per round (partial knowledge; >= 2 for "
                                              "a standard deviation)")
    samples_per_shadow: int = Field(24, ge=1, description="examples per benign shadow")
    f: int | None = Field(None, ge=1, description="malicious clients per round the attacker assumes (default: "
                                                  "the expected number, at least 1)")
    start_round: int = Field(1, ge=1, description="late start: send honest benign-data updates before this "
                                                  "round (aimed at defenses that freeze trust after k rounds)")

    #: True for attacks that need benign statistics (mu, sigma, distances); False for training-only attacks
    uses_statistics: ClassVar[bool] = True


#: attack name -> module (relative to this package) that defines ``Config`` and ``craft``
ATTACKS: dict[str, str] = {
    "scaling": "scaling",
    "alie": "alie",
    "ipm": "ipm",
    "minmax": "minmax",
    "minsum": "minmax",
    "mixing": "mixing",
    "probe_evasion": "probe_evasion",
    "collusion": "collusion",
}


def attack_module(name: str):
    """The module of attack ``name`` (its ``Config`` model and ``craft`` function)."""
    return importlib.import_module(f"fedsafe.attacks.adaptive.{ATTACKS[name]}")


def parse_attack(spec: dict[str, Any] | AttackConfig) -> AttackConfig:
    """Validate ``roles[i].attack`` with its attack's own model; errors name the field (``z: ...``)."""
    if isinstance(spec, AttackConfig):
        return spec
    if not isinstance(spec, dict):
        raise ValueError(f"must be a mapping such as {{name: alie, knowledge: partial}}, got {spec!r}")
    name = spec.get("name")
    if name not in ATTACKS:
        raise ValueError(f"name={name!r} is not an adaptive attack; choose one of {', '.join(ATTACKS)}")
    module = attack_module(name)
    cls = module.CONFIGS[name] if hasattr(module, "CONFIGS") else module.Config
    try:
        return cls.model_validate(spec)
    except ValidationError as err:
        parts = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "<root>"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                allowed = ", ".join(cls.model_fields)
                msg = f"unknown parameter of attack {name!r} (it takes {allowed})"
            elif not isinstance(e.get("input"), dict):
                msg += f" (got {e.get('input')!r})"
            parts.append(f"{loc}: {msg}")
        raise ValueError("; ".join(parts)) from None


def craft(cfg: AttackConfig, h: torch.Tensor, benign: torch.Tensor | None, n: int, f: int, **context):
    """Dispatch to the attack's pure crafting function; returns ``(update [d], info dict)``."""
    return attack_module(cfg.name).craft(h, benign, n, f, cfg, **context)


def benign_stats(benign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean mu and coordinate standard deviation sigma (unbiased, as ``torch.std``) of ``benign [m, d]``."""
    if benign.ndim != 2 or benign.shape[0] < 2:
        raise ValueError(f"benign statistics need at least 2 benign updates [m, d], got {tuple(benign.shape)}")
    benign = benign.float()
    return benign.mean(dim=0), benign.std(dim=0)


def unit(v: torch.Tensor) -> torch.Tensor:
    """``v / ||v||`` (zero stays zero)."""
    norm = v.norm()
    return v / norm if norm > 0 else v


def check_engine(cfg: AttackConfig, role: str, engine_may_be_flower: bool) -> None:
    """Refuse omniscient attacks where updates cross machines: the server cannot hand a Flower ClientApp the
    other clients' updates, and a deployment has no simulated server view to replace them in."""
    if cfg.knowledge == "full" and engine_may_be_flower:
        raise ValueError(f"roles[{role}].attack.knowledge=full is simulation only (omniscient: it reads the "
                         "benign clients' actual updates on the server); the Flower engine runs attacks in "
                         "the ClientApps, so use knowledge: partial (benign statistics from the attacker's "
                         "own shadow training)")
