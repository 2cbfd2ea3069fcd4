"""What an honest-but-curious server learns from the updates it sees, as a plug-in (``server_view_attack``).

Each attacked round, the server runs two attacks on every *view* it has of the round's updates:

- ``individual``: one client's plaintext update Delta_k, as the aggregation rule receives it (plaintext FedAvg,
  client-level DP at the server, local DP-SGD, constrained updates; absent under secure aggregation);
- ``dp_individual`` (client-level DP only): clip(Delta_k, C) + N(0, (sigma C)^2), one client's update through
  the DP-FedAvg mechanism on its own, i.e. what the server would see if each client privatised its update
  itself (with DP at the server, the server itself still receives ``individual``);
- ``aggregate``: what the round publishes, (theta_{t+1} - theta_t) / server_lr: the decrypted sum divided by
  the count under secure aggregation (pruned coordinates are zero), the noised mean under client-level DP.

Attacks: update-level membership inference (:mod:`.update_mia`) and DAGER-style text reconstruction
(:mod:`.reconstruction`). Members of a client's view are the examples it trained on in the round (its
``seen_examples`` report, ground truth for scoring only); non-members are held-out texts nobody trains on. The
aggregate view is scored on the members of the first attacked client, so its AUC compares with that client's
individual view; its reconstruction is scored against every sampled client's batch. Records:
``{"type": "server_view", "round", "view", "client_id", ...}`` in metrics.jsonl.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from fedsafe.attacks.server_view.config import ServerViewConfig
from fedsafe.plugins import Plugin, register

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger("fedsafe")


class _Recorder:
    """Wraps the aggregation rule: keeps a copy of the updates it receives, then aggregates unchanged."""

    def __init__(self, inner, plugin: ServerViewAttack):
        self.inner = inner
        self.plugin = plugin

    def __call__(self, updates, num_samples, client_ids):
        self.plugin.observe_updates(client_ids, updates, dp=dp_parameters(self.inner))
        return self.inner(updates, num_samples, client_ids)

    def __getattr__(self, name):
        if name in ("inner", "plugin"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def dp_parameters(aggregator) -> tuple[float, float] | None:
    """(clip norm, noise multiplier) of a DP-FedAvg rule (possibly wrapped), else None."""
    seen = 0
    while aggregator is not None and seen < 10:
        if hasattr(aggregator, "clip_norm") and hasattr(aggregator, "noise_multiplier"):
            return float(aggregator.clip_norm), float(aggregator.noise_multiplier)
        aggregator = getattr(aggregator, "inner", None) or getattr(aggregator, "aggregator", None)
        seen += 1
    return None


@register
class ServerViewAttack(Plugin):
    """An honest-but-curious server attacks each round's updates (or their sum under secure aggregation)."""

    name = "server_view_attack"
    kind = "attack"
    section = "server_view"
    Config = ServerViewConfig
    order = 95  # wraps the rule last (sees what it receives) and attacks after the round's other hooks

    @classmethod
    def check(cls, config, setup) -> None:
        if config.reconstruction and (setup.fl.local_steps != 1 or getattr(setup.fl, "optimizer", "adamw") != "sgd"):
            log.warning("server_view.reconstruction assumes single-step SGD updates (fl.local_steps=1, "
                        "fl.optimizer=sgd); with fl.local_steps=%s and fl.optimizer=%s expect little or nothing",
                        setup.fl.local_steps, getattr(setup.fl, "optimizer", "adamw"))

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.round_global: torch.Tensor | None = None
        self.updates: dict[str, torch.Tensor] = {}
        self.dp: tuple[float, float] | None = None
        self.previous_aggregate: torch.Tensor | None = None
        self._nonmembers = None
        self.seconds = 0.0

    # -- hooks ------------------------------------------------------------------------------------------
    def round_start(self, round_no: int, global_vec, rc):
        self.round_global = global_vec.detach().clone()
        self.updates = {}
        return rc

    def server_view(self, aggregator):
        return _Recorder(aggregator, self)

    def round_end(self, round_no: int, record: dict, global_vec) -> None:
        if self.round_global is None:
            return
        lr = self.ctx.fl.resolved_server_lr if hasattr(self.ctx.fl, "resolved_server_lr") else 1.0
        aggregate = (global_vec.detach().float().cpu() - self.round_global.float().cpu()) / lr
        if round_no % self.config.every == 0 and not record.get("skipped"):
            self.attack_round(round_no, self.round_global, self.updates, aggregate,
                              record.get("clients") or list(self.updates), dp=self.dp)
        self.previous_aggregate = aggregate

    # -- the attacks ------------------------------------------------------------------------------------
    def observe_updates(self, client_ids, updates, dp=None) -> None:
        """Keep the individual updates of the round (called by the wrapped rule, or by an engine)."""
        self.dp = dp
        for cid, u in zip(client_ids, updates):
            if u.numel():
                self.updates[cid] = u.detach().float().cpu().clone()

    def nonmembers(self) -> list:
        """Held-out non-member examples (``server_view.nonmembers`` or ``data.heldout``), tokenised once."""
        if self._nonmembers is None:
            from fedsafe.data import load_pool
            from fedsafe.data.format import tokenize_rows

            ctx = self.ctx
            sources = self.config.nonmembers or ctx.data.heldout
            self._nonmembers = []
            if sources:
                rows = load_pool(sources, seed=ctx.seed + 78)
                self._nonmembers = tokenize_rows(ctx.tokenizer, rows, ctx.data.max_length,
                                                 ctx.data.system_prompt)[: self.config.n_nonmembers]
            else:
                log.warning("server_view: no non-member data (server_view.nonmembers or data.heldout); membership "
                            "inference is skipped")
        return self._nonmembers

    def seen_examples(self, round_no: int) -> dict[str, list]:
        """{client id: the examples it trained on in ``round_no``} from the run's client records (ground truth).

        ``seen_examples`` index the client's own data, unless its record says ``seen_examples_from`` (a
        local-training wrapper replaced the data for the round, e.g. an adaptive attacker's ``mixing`` or late
        start): they then index the replaced list, which the wrapped trainer gives by ``trained_examples``.
        Where that list is not at hand (a client trained in another process) the client is left out, never
        scored against texts it did not train on."""
        ctx = self.ctx
        by_id = {c.client_id: c for c in ctx.clients}
        out = {}
        if ctx.run_dir is None:
            return out
        trainer = getattr(ctx, "trainer", None)
        resolve = getattr(trainer, "trained_examples", None) if trainer is not None else None
        for r in ctx.run_dir.records("client"):
            if r.get("round") == round_no and r.get("client_id") in by_id and "seen_examples" in r:
                cid = r["client_id"]
                examples = by_id[cid].examples
                if r.get("seen_examples_from"):
                    examples = resolve(cid, round_no) if callable(resolve) else None
                    if examples is None:
                        log.warning("server_view: round %d, client %s trained on replaced data (%s) this process "
                                    "does not hold; its membership inference is skipped", round_no, cid,
                                    r["seen_examples_from"])
                        continue
                out[cid] = [examples[i] for i in r["seen_examples"] if i < len(examples)]
        return out

    def attack_round(self, round_no: int, global_vec: torch.Tensor, updates: dict[str, torch.Tensor],
                     aggregate: torch.Tensor | None, sampled: list[str], dp=None,
                     seen: dict[str, list] | None = None) -> list[dict]:
        """Run the attacks on every view of one round; log and return the ``server_view`` records."""
        import torch  # the plug-in module stays light: a config validates without torch

        t_start = time.perf_counter()
        cfg = self.config
        ctx = self.ctx
        seen = seen if seen is not None else self.seen_examples(round_no)
        targets = [c for c in sampled if c in seen and seen[c]][: cfg.max_clients]
        views: list[tuple[str, str | None, torch.Tensor, torch.Tensor | None, list]] = []
        for cid in targets:
            if cid in updates:
                others = [u for k, u in updates.items() if k != cid]
                ref = torch.stack(others).mean(0) if others else None
                views.append(("individual", cid, updates[cid], ref, seen[cid]))
                if dp is not None and cfg.dp_view:
                    views.append(("dp_individual", cid, dp_privatise(updates[cid], *dp,
                                                                     seed=ctx.seed * 7919 + round_no), None, seen[cid]))
        if aggregate is not None and targets:
            batch = [e for c in sampled for e in seen.get(c, [])]
            views.append(("aggregate", targets[0], aggregate, self.previous_aggregate, seen[targets[0]], batch))
        if cfg.save_updates and ctx.run_dir is not None:
            self._save(round_no, global_vec, views, sampled)
        records = []
        nonmembers = self.nonmembers() if cfg.mia else []
        pad = ctx.tokenizer.pad_token_id
        losses: dict = {}  # (id of the loaded update or None for the global adapter) -> {text index: loss}
        if cfg.mia and nonmembers:  # each adapter scores each text once: the round's views share them
            from fedsafe.attacks.server_view.update_mia import mean_losses

            texts = list(nonmembers) + [e for c in targets for e in seen[c]]
            index = {id(e): i for i, e in enumerate(texts)}

            def scored(vec, key, examples):
                have = losses.setdefault(key, {})
                todo = [e for e in examples if index[id(e)] not in have]
                if todo:
                    for e, x in zip(todo, mean_losses(ctx.model, ctx.flat, vec, todo, pad, cfg.batch_size)):
                        have[index[id(e)]] = x
                return [have[index[id(e)]] for e in examples]
        for view in views:
            kind, cid, update, ref, members = view[:5]
            batch = view[5] if len(view) > 5 else members
            t0 = time.perf_counter()
            rec = {"type": "server_view", "round": round_no, "view": kind, "client_id": cid,
                   "n_clients": len(sampled), "secure_agg": not updates,
                   "update_bytes": 4 * int(update.numel()), "update_norm": float(update.norm())}
            if cfg.mia and nonmembers and members:
                from fedsafe.attacks.server_view.update_mia import membership_scores

                ex = list(members) + list(nonmembers)
                mia = membership_scores(scored(global_vec, None, ex), scored(global_vec + update, id(update), ex),
                                        scored(global_vec + ref, id(ref), ex) if ref is not None else None,
                                        len(members))
                rec.update({f"mia_{k}": v for k, v in mia.items()})
            if cfg.reconstruction:
                rec.update(self._reconstruct(global_vec, update, batch))
            rec["seconds"] = time.perf_counter() - t0
            records.append(rec)
            ctx.log(rec)
        self.seconds += time.perf_counter() - t_start
        return records

    def _reconstruct(self, global_vec, update, batch) -> dict:
        from fedsafe.attacks.server_view import reconstruction as R

        ctx = self.ctx
        tok = ctx.tokenizer
        targets = [e.input_ids.tolist() for e in batch]
        start = _common_prefix(targets)[:1] or targets[0][:1]
        rec = R.reconstruct(ctx.model, ctx.flat, global_vec, update, tau=self.config.tau, tau_rel=self.config.tau_rel,
                            seq_tau_rel=self.config.seq_tau_rel,
                            rank_tol=self.config.rank_tol, max_len=self.config.max_len or ctx.data.max_length,
                            max_beams=self.config.max_beams, sequences=self.config.sequences, start=start,
                            n_sequences=max(1, min(len(targets), self.config.max_sequences)),
                            stop=[t for t in (tok.eos_token_id, tok.pad_token_id) if t is not None])
        out = {"rec_method": rec.method, "rec_rank_l0": rec.rank_l0, "rec_rank_l1": rec.rank_l1,
               "rec_capacity": rec.capacity, "rec_saturated_l0": rec.saturated_l0,
               "rec_saturated_l1": rec.saturated_l1, "rec_n_sequences": len(rec.sequences)}
        true = {t for s in targets for t in s}
        out.update({f"rec_{k}": v for k, v in R.token_scores(rec.tokens, true).items()})
        out.update({f"rec_{k}": v for k, v in R.sequence_scores(tok, rec.sequences, targets).items() if k != "n"})
        return out

    def attack_saved(self, path) -> list[dict]:
        """Re-run the attacks on a round saved with ``server_view.save_updates`` (members from the run's records)."""
        import torch

        payload = torch.load(path, weights_only=False)
        views = payload["views"]
        updates = {v["client_id"]: v["update"] for v in views if v["view"] == "individual"}
        aggregate = next((v for v in views if v["view"] == "aggregate"), None)
        if aggregate is not None:
            self.previous_aggregate = aggregate["reference"]
        return self.attack_round(payload["round"], payload["global_vec"], updates,
                                 aggregate["update"] if aggregate is not None else None, payload["sampled"],
                                 dp=payload.get("dp"))

    def _save(self, round_no, global_vec, views, sampled) -> None:
        from fedsafe.io import atomic_torch_save

        payload = {"round": round_no, "global_vec": global_vec, "sampled": sampled, "dp": self.dp,
                   "views": [{"view": v[0], "client_id": v[1], "update": v[2], "reference": v[3]} for v in views
                             if v[0] != "dp_individual"]}
        path = self.ctx.run_dir.path / "server_view" / f"round_{round_no:04d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(payload, path)


def dp_privatise(update: torch.Tensor, clip_norm: float, noise_multiplier: float, seed: int) -> torch.Tensor:
    """One update through DP-FedAvg's mechanism on its own: clip to C, add N(0, (sigma C)^2) (McMahan et al. 2018)."""
    import torch

    from fedsafe.fl.update_ops import clip_rows, gaussian_noise

    clipped, _ = clip_rows(update[None].float(), clip_norm)
    gen = torch.Generator().manual_seed(seed)
    return clipped[0] + gaussian_noise(update.numel(), noise_multiplier * clip_norm, gen)


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    if not seqs:
        return []
    out = []
    for toks in zip(*seqs):
        if len(set(toks)) != 1:
            break
        out.append(toks[0])
    return out
