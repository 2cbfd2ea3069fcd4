"""The adaptive-attack plug-in: where the attacks of ``roles[i].attack`` run in a federated round.

Hooks (fedsafe.plugins, issue 16):

- ``local_training``: wraps the trainer. A client of an attacked role trains on ``benign_data`` before its
  ``start_round`` (late start), on the mixed data of ``mixing``, with the probe's slice trained on normal data
  only (``probe_evasion`` with ``slice: normal_data``), or on the role's shared data with a shared seed
  (``collusion``), else honestly on its own (unaligned) data: that is the harmful update h.
- ``client_update`` (``knowledge: partial``, client-side, so it runs inside Flower ClientApps): the
  malicious client trains ``shadows`` benign shadow updates from the global adapter it received on its own
  ``benign_data``, takes their mean / std / distances, and replaces h by the crafted update before sending.
  Collusion adds each sybil's seeded noise to the shared update (no state shared between clients: each sybil
  trains the shared update itself, :mod:`~fedsafe.attacks.adaptive.collusion`, so it works across ClientApps).
- ``server_view`` (``knowledge: full``, simulation only): wraps the rule and replaces every malicious
  client's update by the crafted one, computed from the benign clients' actual updates of that round, right
  before the rule sees them. ALIE and Min-Max/Min-Sum then send one update per role, crafted from the mean of
  the role's harmful updates, as the papers' colluding attackers do; with partial knowledge each attacker
  crafts from its own h (the shadows are shared per role in one process, the directions are not).

Stealth statistics: with ``knowledge: full`` the view hands the crafted updates back to the server
(``AggregationResult.received``), so the round record's ``cosine``, ``update_norms`` and
``benign_mean_distance``, the ``aggregator.compare`` weights and the malicious clients' ``update_norm`` describe
the crafted updates the rule saw (``honest_update_norm``: h), as with partial knowledge, where the client sends
the crafted update itself. Known gap: a probe with ``level: step`` still receives the honest step reports, and
the ``server_view_attack`` recorder (outside this view) the honest updates.
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace

import torch

from fedsafe.attacks.adaptive.base import AttackConfig, check_engine, craft, parse_attack
from fedsafe.errors import ConfigError
from fedsafe.data.client_data import ClientData
from fedsafe.fl.client import ClientResult, RoundConfig, derive_seed
from fedsafe.plugins import Plugin, register

log = logging.getLogger("fedsafe")


def role_attacks(roles) -> dict[str, AttackConfig]:
    """Role name -> its parsed ``attack``, for every role that has one."""
    return {r.name: parse_attack(r.attack) for r in roles or [] if getattr(r, "attack", None)}


#: attacks whose malicious clients all send one crafted update (Baruch et al.; Shejwalkar & Houmansadr): with full
#: knowledge their direction is the mean harmful update of the role's clients in the round
SHARED_DIRECTION = ("alie", "minmax", "minsum")


def expected_f(num_clients: int, clients_per_round: int, malicious_clients: int) -> int:
    """Malicious clients in a round of ``clients_per_round`` drawn from ``num_clients`` (expected, >= 1)."""
    return max(1, round(clients_per_round * malicious_clients / max(num_clients, 1)))


@register
class AdaptiveAttack(Plugin):
    """Malicious roles craft their updates against the defense (``roles[i].attack``).

    It has no section of its own: each malicious role carries its attack (``roles[i].attack``, validated by
    the attack's own model when the config loads), and the plug-in is active when any role has one.
    """

    name = "adaptive_attack"
    kind = "attack"
    section = None
    Config = None
    # client_update crafts before secure aggregation (90) encrypts; local_training wraps DP-SGD's trainer (20);
    # server_view is outside the rule and the probe (30) and local probing (40), which then see the crafted update
    order = 60

    @classmethod
    def is_active(cls, config, setup) -> bool:
        return any(getattr(r, "attack", None) for r in setup.roles)

    @classmethod
    def check(cls, config, setup) -> None:
        """Config load: ``knowledge: full`` is refused where the engine may be Flower
        (``setup.engine_may_be_flower``); a Flower ClientApp refuses it again when it builds its side. ALIE
        whose z_max is 0 at the configured n and f (it would send the benign mean) is refused unless
        ``attack.z`` is given."""
        malicious_total = sum(r.clients for r in setup.roles if getattr(r, "is_malicious", False))
        n = int(setup.clients_per_round)
        for i, r in enumerate(setup.roles):
            if getattr(r, "attack", None):
                attack = parse_attack(r.attack)
                try:
                    check_engine(attack, str(i), bool(getattr(setup, "engine_may_be_flower", False)))
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
                if attack.name == "alie":
                    from fedsafe.attacks.adaptive.alie import check_z

                    try:
                        check_z(attack, n, attack.f or expected_f(setup.num_clients, n, malicious_total))
                    except ValueError as exc:
                        raise ConfigError(f"roles[{i}].attack.z: {exc}") from None

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.attacks: dict[str, AttackConfig] = role_attacks(ctx.roles)
        clients = list(getattr(ctx, "clients", None) or [])
        if not clients and getattr(ctx, "run_dir", None) is None:  # a Flower ClientApp builds its side alone
            for role, a in self.attacks.items():
                try:
                    check_engine(a, role, engine_may_be_flower=True)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
        self.seed = int(ctx.seed)
        self.n = int(ctx.clients_per_round)
        malicious_total = sum(r.clients for r in ctx.roles if r.is_malicious)
        self.f = {role: a.f or expected_f(ctx.num_clients, self.n, malicious_total)
                  for role, a in self.attacks.items()}
        self.benign_pools = {role: self._load_benign(a) for role, a in self.attacks.items()}
        self._shadow_cache: dict[tuple, torch.Tensor] = {}
        self._sybil_data: dict[str, ClientData] = {}
        self._masks: dict[str, torch.Tensor] = {}
        self.round = 0

    # --- data ----------------------------------------------------------------------------------------------
    def _load_benign(self, attack: AttackConfig) -> list:
        from fedsafe.data import load_pool
        from fedsafe.data.format import tokenize_rows

        data = getattr(self.ctx, "data", None)
        rows = load_pool(attack.benign_data, self.seed + 9000, getattr(self.ctx, "generator_cache", None))
        examples = tokenize_rows(self.ctx.tokenizer, rows, getattr(data, "max_length", 256),
                                 getattr(data, "system_prompt", None))
        if not examples:
            raise ValueError(f"attack {attack.name}: benign_data gives no example")
        return examples

    def sybil_client(self, role: str) -> ClientData:
        """Collusion: the shared client every sybil of ``role`` trains as (same id, data and seeds in every
        process): ``shared_samples`` rows of ``shared_data`` (default the role's own data sources)."""
        if role not in self._sybil_data:
            from fedsafe.data import load_pool
            from fedsafe.data.format import tokenize_rows

            attack = self.attacks[role]
            r_idx, role_cfg = next((i, r) for i, r in enumerate(self.ctx.roles) if r.name == role)
            data = getattr(self.ctx, "data", None)
            sources = attack.shared_data or role_cfg.data
            if not sources:
                raise ConfigError(f"roles[{r_idx}].attack.shared_data: collusion needs data every sybil holds "
                                  "(the role has no data sources)")
            k = attack.shared_samples or role_cfg.samples_per_client or getattr(data, "samples_per_client", 32)
            rows = load_pool(sources, derive_seed(self.seed, role, "sybil-pool") % (2 ** 31),
                             getattr(self.ctx, "generator_cache", None))
            rows = random.Random(derive_seed(self.seed, role, "sybil-data")).sample(rows, min(k, len(rows)))
            examples = tokenize_rows(self.ctx.tokenizer, rows, getattr(data, "max_length", 256),
                                     getattr(data, "system_prompt", None))
            if not examples:
                raise ConfigError(f"roles[{r_idx}].attack.shared_data: no usable example for the sybils")
            self._sybil_data[role] = ClientData(f"{role}_sybil", role, examples, malicious=True)
        return self._sybil_data[role]

    def _sample_benign(self, role: str, k: int, *seed_parts) -> list:
        pool = self.benign_pools[role]
        rng = random.Random(derive_seed(self.seed, role, *seed_parts))
        return rng.sample(pool, min(k, len(pool)))

    @property
    def role_of(self) -> dict[str, str]:
        """Client id -> role, on the server (the clients exist after the client_data hooks)."""
        return {c.client_id: c.role for c in getattr(self.ctx, "clients", None) or []}

    @property
    def malicious(self) -> set[str]:
        return {c.client_id for c in getattr(self.ctx, "clients", None) or [] if c.malicious}

    def attack_of(self, client_id: str, role: str | None = None) -> tuple[str, AttackConfig] | None:
        """(role, attack) of a client (by its role, or on the server by its id), or None."""
        role = role if role is not None else self.role_of.get(client_id)
        return (role, self.attacks[role]) if role in self.attacks else None

    def _mask(self, attack: AttackConfig, flat) -> torch.Tensor | None:
        if attack.name != "probe_evasion":
            return None
        key = f"{attack.layers}/{attack.kind}"
        if key not in self._masks:
            from fedsafe.attacks.adaptive.probe_evasion import feature_mask

            self._masks[key] = feature_mask(flat, attack.layers, attack.kind)
        return self._masks[key]

    # --- hooks ---------------------------------------------------------------------------------------------
    def local_training(self, trainer):
        return AdaptiveTrainer(trainer, self)

    def shadow_updates(self, role: str, trainer, global_vec: torch.Tensor, rc: RoundConfig) -> torch.Tensor:
        """``[shadows, d]`` benign shadow updates of ``role``'s attacker this round (cached per round)."""
        key = (role, rc.round)
        if key not in self._shadow_cache:
            attack = self.attacks[role]
            shadow_rc = replace(rc, algorithm="fedavg" if rc.algorithm == "scaffold" else rc.algorithm,
                                scaffold_c=None, step_feature_mask=None,
                                seed=derive_seed(self.seed, "adaptive-shadow", role))
            ups = []
            for i in range(attack.shadows):
                data = self._sample_benign(role, attack.samples_per_shadow, rc.round, "shadow", i)
                shadow = ClientData(f"{role}_shadow_{i:02d}", "adaptive_shadow", data, malicious=False)
                ups.append(trainer.fit(shadow, global_vec, shadow_rc, {}).update)  # as a benign client trains
            self._shadow_cache = {key: torch.stack(ups)}  # keep only the current round
        return self._shadow_cache[key]

    def client_update(self, result: ClientResult, client: ClientData, global_vec, rc: RoundConfig,
                      trainer) -> ClientResult:
        """Partial knowledge: craft from the attacker's own benign shadows; collusion: the sybil's noise on the
        shared update it trained (AdaptiveTrainer)."""
        found = self.attack_of(client.client_id, client.role)
        if found is None or rc.round < found[1].start_round:
            return result
        role, attack = found
        if attack.name == "collusion":
            if attack.noise == 0:
                return result
            update, info = craft(attack, result.update, None, self.n, self.f[role],
                                 noise_seed=derive_seed(self.seed, rc.round, client.client_id, "sybil"))
            return self._replaced(result, update, attack, info)
        if attack.knowledge != "partial" or not attack.uses_statistics:
            return result
        benign = self.shadow_updates(role, trainer, global_vec, rc)
        update, info = craft(attack, result.update, benign, self.n, self.f[role],
                             mask=self._mask(attack, getattr(trainer, "flat", None)))
        return self._replaced(result, update, attack, info)

    def server_view(self, aggregator):
        if any(a.knowledge == "full" and a.uses_statistics for a in self.attacks.values()):
            return FullKnowledgeView(aggregator, self)
        return aggregator

    def replace_full(self, round_no: int, updates: torch.Tensor, client_ids: list[str]) -> tuple[torch.Tensor, dict]:
        """Full knowledge: each malicious row of ``updates [n, d]`` crafted from this round's benign rows."""
        role_of, malicious = self.role_of, self.malicious
        rows = [i for i, c in enumerate(client_ids) if (a := self.attack_of(c, role_of.get(c)))
                and a[1].knowledge == "full" and a[1].uses_statistics and round_no >= a[1].start_round]
        benign_rows = [i for i, c in enumerate(client_ids) if c not in malicious]
        if not rows:
            return updates, {}
        if len(benign_rows) < 2:
            log.warning("adaptive attack (full knowledge), round %d: %d benign updates, fewer than 2; the "
                        "malicious updates are sent unchanged", round_no, len(benign_rows))
            return updates, {"skipped": "fewer than 2 benign updates"}
        benign = updates[benign_rows]
        f = sum(1 for c in client_ids if c in malicious)
        out = updates.clone()
        info = {}
        for i in rows:
            role, attack = self.attack_of(client_ids[i], role_of.get(client_ids[i]))
            h = updates[i]
            if attack.name in SHARED_DIRECTION:  # the papers' attackers send one update: the role's mean h
                h = updates[[j for j in rows if role_of.get(client_ids[j]) == role]].mean(dim=0)
            out[i], info[client_ids[i]] = craft(attack, h, benign, len(client_ids), f,
                                                mask=self._mask(attack, getattr(self.ctx, "flat", None)))
        return out, info

    @staticmethod
    def _replaced(result: ClientResult, update: torch.Tensor, attack: AttackConfig, info: dict) -> ClientResult:
        metrics = {**result.metrics, "attack": attack.name, "honest_update_norm": float(result.update.norm()),
                   "update_norm": float(update.norm()),
                   **{f"attack_{k}": v for k, v in info.items() if isinstance(v, (int, float))}}
        return replace(result, update=update.to(result.update.dtype), metrics=metrics)


class AdaptiveTrainer:
    """Wraps a LocalTrainer: late start (benign data before ``start_round``) and mixing change the data.

    A client whose data was replaced reports ``seen_examples`` as indices into the replaced list, marks its
    record ``seen_examples_from`` (the phase), and :meth:`trained_examples` gives that list for the round, so
    the server-view attack's members are the texts the client actually trained on (issue 28)."""

    def __init__(self, inner, plugin: AdaptiveAttack):
        self.inner = inner
        self.plugin = plugin
        self._trained: dict[str, tuple[int, list]] = {}  # client id -> (round, the examples it trained on)

    def __getattr__(self, name):  # model, tokenizer, flat, loss_terms, ... of the wrapped trainer
        return getattr(self.inner, name)

    def trained_examples(self, client_id: str, round_no: int) -> list | None:
        """The examples ``client_id`` trained on in ``round_no`` when this wrapper replaced its data (the list
        its ``seen_examples`` index), else None; kept for the latest round only."""
        kept = self._trained.get(client_id)
        return kept[1] if kept is not None and kept[0] == round_no else None

    def fit(self, client: ClientData, global_vec: torch.Tensor, rc: RoundConfig, client_state: dict | None = None):
        found = self.plugin.attack_of(client.client_id, client.role)
        if found is None:
            return self.inner.fit(client, global_vec, rc, client_state)
        role, attack = found
        phase = "attack"
        if rc.round < attack.start_round:  # late start: look benign until round k
            data = self.plugin._sample_benign(role, client.num_samples, rc.round, client.client_id)
            client, phase = replace(client, examples=data), "late_start_benign"
        elif attack.name == "mixing":
            from fedsafe.attacks.adaptive.mixing import mix_examples

            client = replace(client, examples=mix_examples(
                client.examples, self.plugin.benign_pools[role], attack.normal_share,
                derive_seed(self.plugin.seed, client.client_id, "mixing")))
        elif attack.name == "collusion":  # every sybil trains the role's shared update itself (no shared state)
            shared = self.plugin.sybil_client(role)
            result = self.inner.fit(shared, global_vec, rc, None)
            result = replace(result, client_id=client.client_id)
            result.metrics.pop("seen_examples", None)  # indices into the shared data, not this client's
            result.metrics.update({"attack": attack.name, "attack_phase": "attack_shared_update"})
            return result
        elif attack.name == "probe_evasion" and attack.slice == "normal_data":
            from fedsafe.attacks.adaptive.probe_evasion import train_slice_on_normal

            result = train_slice_on_normal(self.inner, client, self.plugin.benign_pools[role], global_vec, rc,
                                           self.plugin._mask(attack, self.inner.flat))
            result.metrics.update({"attack": attack.name, "attack_phase": "attack_slice_normal_data"})
            return result
        result = self.inner.fit(client, global_vec, rc, client_state)
        result.metrics.update({"attack": attack.name, "attack_phase": phase})
        if phase == "late_start_benign" or attack.name == "mixing":  # seen_examples index the replaced data
            self._trained = {c: v for c, v in self._trained.items() if v[0] == rc.round}
            self._trained[client.client_id] = (rc.round, client.examples)
            result.metrics["seen_examples_from"] = "mixing" if phase == "attack" else phase
        return result


class FullKnowledgeView:
    """Wraps the rule: malicious updates are replaced using the round's benign updates (simulation only)."""

    def __init__(self, inner, plugin: AdaptiveAttack):
        self.inner = inner
        self.plugin = plugin

    def __getattr__(self, name):  # name, needs_shadow, needs_plaintext, state_dict, ... of the rule
        return getattr(self.inner, name)

    def prepare(self, context):
        self.plugin.round = context.round
        prepare = getattr(self.inner, "prepare", None)
        return prepare(context) if prepare is not None else context.round_config

    def __call__(self, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str]):
        crafted, info = self.plugin.replace_full(self.plugin.round, updates, client_ids)
        result = self.inner(crafted, num_samples, client_ids)
        if crafted is not updates:  # the server's stealth statistics describe what it received (fedsafe.fl.loop)
            result.received = crafted
        if info:
            result.info = {**result.info, "adaptive_attack": {c: {k: v for k, v in i.items()} for c, i in info.items()}
                           if "skipped" not in info else info}
        return result
