"""How many clients a round must have for each rule to work: one source of truth for the rules and the config.

Each rule calls its function here on every round (:func:`require`), and :class:`fedsafe.config.ExperimentConfig`
calls :func:`check_feasible` on ``fl.clients_per_round`` when a config is loaded, so a rule that cannot work
with its round size fails before any model is loaded, with the same numbers it would fail with in round 1.
This module imports neither torch nor the rules (the config stays light).

The conditions, each from its rule's paper (see the rule's module):

  krum, multikrum   n > 2f + 2                 (Blanchard et al. 2017: the score sums n - f - 2 neighbours)
  multikrum m       n >= m                     (it averages the m best-scoring updates)
  bulyan            n >= 4f + 3                (El Mhamdi et al. 2018)
  dnc               n >= floor(c * f) + 1      (Shejwalkar & Houmansadr 2021: it removes floor(c f) clients)
  trimmed_mean      beta: floor(beta * n) >= 1 when beta > 0  (Yin et al. 2018; trimming 0 values per side is
                    the plain mean, not the rule the config names; beta = 0 asks for the mean and is accepted)
                    f (a count instead of beta): n >= 2f + 1 (f values trimmed per side, one left)
  residual          n >= 3                     (Fu et al. 2019: the robust scale divides by n - 1 and drops one
                    residual; with fewer clients fedsafe falls back to the plain mean)
  nnm (a step)      n >= f + 1                 (Allouah et al. 2023: each update is mixed with its n - f nearest)

Compositions (:mod:`fedsafe.aggregators.wrappers`): ``<step>+<rule>`` needs what the step needs (its params
are ``aggregator.params.<step>``, plus the shared ones of :data:`SHARED_PARAMS` taken from the rule's) and what
``<rule>`` needs (``aggregator.params``); ``norm_clip`` needs what its inner ``aggregator`` needs (params under
``aggregator.params.params``). Median, geometric median, FoolsGold, FedAvg, FLAME, LASA, FLTrust, centered
clipping and the probe alone work with any n >= 1 (FLAME's clustering with n = 1 or 2 admits every update; see
its module). Rules registered by plug-ins are not checked here (they raise at run time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedsafe.errors import ConfigError

#: the smallest round the residual rule reweights; below it, it returns the plain mean
RESIDUAL_MIN_CLIENTS = 3

#: parameters a pre-aggregation step reads from its inner rule's params when its own section leaves them out
#: (``nnm+krum`` with ``params: {f: 4}``: NNM mixes over n - 4 neighbours, Krum assumes 4 attackers)
SHARED_PARAMS: dict[str, tuple[str, ...]] = {"nnm": ("f",)}

#: slack for beta * n computed just below an integer: beta = f/n must trim f values (int(beta * n) trimmed
#: f - 1 for 368 of the (n <= 200, f < n/2) pairs, e.g. none at all for n = 49, beta = 1/49)
TRIM_SLACK = 1e-9


@dataclass(frozen=True)
class Need:
    """One condition of a rule on the round size, ``n >= min_clients``, set by parameter ``param=value``."""

    param: str  # the parameter that sets it ("f", "beta", ...; "name" for the rule itself)
    value: Any
    min_clients: int
    text: str  # "krum needs more than 2*f+2=20 clients per round"
    fix: str = "lower"  # what to do with the parameter for fewer clients: "lower", "raise" or "change"

    def message(self, got: str, field: str) -> str:
        """The error naming the field: ``aggregator.params.f=9: krum needs ..., got fl.clients_per_round=4``."""
        fix = f"raise {field} or fl.clients_per_round" if self.fix == "raise" else \
            f"{self.fix} {field} or raise fl.clients_per_round"
        return f"{field}={self.value}: {self.text}, got {got}; {fix}"


def validate_f(f) -> int:
    """``f`` as a non-negative int (raises ValueError, which ``aggregators.get`` turns into a ConfigError)."""
    if isinstance(f, bool) or not isinstance(f, (int, float)) or int(f) != f or f < 0:
        raise ValueError(f"f must be a non-negative integer, got {f!r}")
    return int(f)


def validate_m(m) -> int | None:
    """Multi-Krum's ``m`` as a positive int, or None (the default n - f)."""
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, (int, float)) or int(m) != m or m < 1:
        raise ValueError(f"m must be a positive integer, got {m!r}")
    return int(m)


def validate_beta(beta) -> float:
    """The trimmed mean's ``beta`` in [0, 1/2)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")
    return float(beta)


def validate_trim(beta=None, f=None, where: str = "aggregator.params") -> tuple[float | None, int | None]:
    """The trimmed mean's ``(beta, f)``: the fraction or the count, exactly one (neither: beta = 0.1).

    Raises ConfigError naming both fields when both are given, ValueError for a bad value.
    """
    if beta is not None and f is not None:
        raise ConfigError(f"{where}.beta={beta!r} and {where}.f={f!r}: trimmed_mean takes the fraction beta or "
                          "the count f of values trimmed per side, not both")
    if f is not None:
        return None, validate_f(f)
    return validate_beta(0.1 if beta is None else beta), None


def trimmed_per_side(n: int, beta: float | None = None, f: int | None = None) -> int:
    """Values the trimmed mean drops from each end of a coordinate of ``n`` updates.

    ``f`` when the count is given; else ``floor(beta * n)``, computed with :data:`TRIM_SLACK` so that a
    product rounded just below an integer (``beta = f / n``) still trims f, and capped so one value is left.
    """
    if f is not None:
        return f
    return max(0, min(math.floor(beta * n + TRIM_SLACK), (n - 1) // 2))


def validate_filter_frac(filter_frac) -> float:
    """DnC's filtering fraction c >= 0."""
    if isinstance(filter_frac, bool) or not isinstance(filter_frac, (int, float)) or filter_frac < 0:
        raise ValueError(f"filter_frac must be >= 0, got {filter_frac!r}")
    return float(filter_frac)


def krum_needs(f: int, m: int | None = None, rule: str = "krum") -> list[Need]:
    """Krum / Multi-Krum: n > 2f + 2; Multi-Krum with an explicit m also n >= m."""
    needs = [Need("f", f, 2 * f + 3, f"{rule} needs more than 2*f+2={2 * f + 2} clients per round")]
    if m is not None and m > 1:
        needs.append(Need("m", m, m, f"{rule} averages the m={m} best-scoring updates and needs at least "
                                     f"{m} clients per round"))
    return needs


def bulyan_needs(f: int) -> list[Need]:
    """Bulyan: n >= 4f + 3."""
    return [Need("f", f, 4 * f + 3, f"bulyan needs at least 4*f+3={4 * f + 3} clients per round")]


def dnc_needs(f: int, filter_frac: float = 1.0) -> list[Need]:
    """DnC: it removes floor(filter_frac * f) clients and must keep at least one."""
    removed = int(filter_frac * f)
    how = f"floor(filter_frac*f)={removed}" if filter_frac != 1.0 else f"f={f}"
    return [Need("f", f, removed + 1, f"dnc removes {how} clients and needs at least {removed + 1} clients "
                                      "per round")]


def trimmed_mean_min_clients(beta: float | None = None, f: int | None = None) -> int:
    """The smallest n the trimmed mean trims with: 2f + 1 for a count f; for a fraction the smallest n with
    :func:`trimmed_per_side` >= 1 (1 when beta = 0 or f = 0: the plain mean was asked for)."""
    if f is not None:
        return 2 * f + 1 if f > 0 else 1
    if beta <= 0:
        return 1
    n = max(1, int(1 / beta) - 1)
    while trimmed_per_side(n, beta) < 1:  # the same count the rule computes
        n += 1
    return n


def trimmed_mean_needs(beta: float | None = None, f: int | None = None) -> list[Need]:
    """Trimmed mean: floor(beta * n) >= 1 values trimmed per side when beta > 0; n >= 2f + 1 for a count f."""
    need = trimmed_mean_min_clients(beta, f)
    if f is not None:
        return [Need("f", f, need, f"trimmed_mean trims f={f} values per side and needs at least 2*f+1={need} "
                                   "clients per round")]
    return [Need("beta", beta, need, f"trimmed_mean trims floor(beta*n) values per side, none with fewer than "
                                     f"{need} clients per round (it would be the plain mean; one per side needs "
                                     "beta >= 1/n and n >= 3)", "raise")]


def residual_needs() -> list[Need]:
    """Residual reweighting: n >= 3."""
    return [Need("name", "residual", RESIDUAL_MIN_CLIENTS,
                 f"residual reweighting needs at least {RESIDUAL_MIN_CLIENTS} clients per round (its robust "
                 "scale divides by n-1 and drops one residual; with fewer it is the plain mean)", "change")]


def nnm_needs(f: int) -> list[Need]:
    """Nearest-neighbour mixing: n - f >= 1 neighbours (the update itself)."""
    return [Need("f", f, f + 1, f"nnm mixes each update with its n-f nearest and needs at least f+1={f + 1} "
                                "clients per round")]


def _needs_of(name: str, params: dict, where: str) -> list[Need]:
    """The conditions of one plain (uncomposed) rule; a bad parameter value raises ConfigError naming it."""

    def param(key: str, default, validate):
        value = params.get(key, default)
        try:
            return validate(value)
        except ValueError as exc:
            raise ConfigError(f"{where}.{key}={value!r}: {name}: {exc}") from None

    if name in ("krum", "multikrum"):
        m = param("m", None, validate_m) if name == "multikrum" else None
        return krum_needs(param("f", 1, validate_f), m, name)
    if name == "bulyan":
        return bulyan_needs(param("f", 1, validate_f))
    if name == "dnc":
        return dnc_needs(param("f", 1, validate_f), param("filter_frac", 1.0, validate_filter_frac))
    if name == "trimmed_mean":
        beta, f = params.get("beta"), params.get("f")
        if beta is not None and f is not None:
            validate_trim(beta, f, where)  # raises the ConfigError naming both fields
        if f is not None:
            return trimmed_mean_needs(f=param("f", None, validate_f))
        return trimmed_mean_needs(param("beta", 0.1, validate_beta))
    if name == "residual":
        return residual_needs()
    if name == "nnm":
        if params.get("f") is None:
            raise ConfigError(f"{where}.f: nnm needs f, the assumed number of Byzantine clients (set it there or "
                              "give the inner rule an f)")
        return nnm_needs(param("f", None, validate_f))
    return []


def rule_needs(name: str, params: dict | None = None, where: str = "aggregator.params",
               name_field: str = "aggregator.name") -> list[tuple[str, Need]]:
    """The conditions on n of rule ``name`` with ``params``, each with the config field that sets it.

    ``where`` is the config path of ``params`` and ``name_field`` that of ``name``. Handles ``probe+<rule>``
    and ``norm_clip``'s inner rule; unknown names give no condition. A bad parameter value raises ConfigError.
    """
    params = dict(params or {})
    name = (name or "").strip()
    if "+" in name:  # a step in front (fedsafe.aggregators.wrappers): the step's needs and the inner rule's
        outer, inner = (part.strip() for part in name.split("+", 1))
        own = dict(params.pop(outer, None) or {})
        shared = {k: params[k] for k in SHARED_PARAMS.get(outer, ()) if k not in own and k in params}
        needs = [(f"{where}.{need.param}" if need.param in shared else f"{where}.{outer}.{need.param}", need)
                 for need in _needs_of(outer, {**own, **shared}, f"{where}.{outer}")]
        return needs + rule_needs(inner, params, where, name_field)
    if name == "norm_clip":
        return rule_needs(str(params.get("aggregator") or "fedavg"), params.get("params") or {},
                          where + ".params", where + ".aggregator")
    needs = _needs_of(name, params, where)
    return [(name_field if need.param == "name" else f"{where}.{need.param}", need) for need in needs]


def min_clients(name: str, params: dict | None = None) -> int:
    """The smallest number of clients per round rule ``name`` with ``params`` works with."""
    return max([1] + [need.min_clients for _, need in rule_needs(name, params)])


def check_feasible(name: str, params: dict | None, n: int, got: str | None = None,
                   where: str = "aggregator.params", name_field: str = "aggregator.name") -> None:
    """Raise ConfigError, naming the field, if rule ``name`` with ``params`` cannot work with ``n`` clients.

    ``got`` says where n comes from (default: the number itself), e.g. ``fl.clients_per_round=4``.
    """
    for field, need in rule_needs(name, params, where, name_field):
        if n < need.min_clients:
            raise ConfigError(need.message(got if got is not None else str(n), field))


def require(needs: list[Need], n: int, where: str = "aggregator.params") -> None:
    """A rule's own check on every round: raise ConfigError if this round's ``n`` updates are too few."""
    for need in needs:
        if n < need.min_clients:
            raise ConfigError(need.message(f"{n} in this round", f"{where}.{need.param}"))
