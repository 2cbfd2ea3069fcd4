"""The federated round loop: sample -> local training (engine) -> validate/aggregate -> log -> checkpoint.

After each round the checkpoint (global adapter, server optimiser, aggregator and client state) is
written atomically, so an interrupted run loses at most the round in progress.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time

import torch

from fedsafe.fl.lora_aggregation import RESIDUAL_FILE
from fedsafe.fl.server import Server, sample_clients
from fedsafe.fl.update_ops import cosine_matrix
from fedsafe.rundir import RunDir, load_checkpoint_state, save_checkpoint




def run_rounds(server: Server, engine, clients, run_dir: RunDir, *, rounds: int, clients_per_round: int,
               save_adapter=None, save_every_round: bool = True, progress=None, on_round_end=None,
               shadow=None, on_round_start=None) -> None:
    """Run rounds ``server.round+1 .. rounds``; each finished round is logged and checkpointed.

    ``on_round_start(round_no, global_vec, rc) -> rc`` and ``on_round_end(round_no, record)`` are the
    plug-ins' round hooks (fedsafe.plugins.PluginSet.round_start / round_end)."""
    lora = _attach_lora_aggregation(server, engine)
    client_ids = [c.client_id for c in clients]
    role_of = {c.client_id: c.role for c in clients}
    malicious = {c.client_id: c.malicious for c in clients}
    total = rounds - server.round
    task = progress.add_task("federated rounds", total=total) if progress is not None else None
    for round_idx in range(server.round, rounds):
        t0 = time.perf_counter()
        chosen = sample_clients(client_ids, clients_per_round, server.seed, round_idx)
        total_samples = sum(engine.clients[c].num_samples for c in chosen) if hasattr(engine, "clients") else 0
        rc = server.round_config(round_idx, total_samples)
        if on_round_start is not None:
            rc = on_round_start(rc.round, server.global_vec, rc)
        # a grid's update cache answers for the round's trainings (shadows, clients, the rule's own) and only them
        with _update_cache_open(engine):
            rc = server.prepare_round(rc, truth={c: malicious[c] for c in chosen}, shadow=shadow)
            ctask = progress.add_task(f"round {round_idx + 1}: clients", total=len(chosen)) if progress else None
            shown = _ClientProgress(progress, ctask, f"round {round_idx + 1}: clients", rc.local_steps)
            fit_kwargs = {"on_step": shown.step} if "on_step" in inspect.signature(engine.fit).parameters else {}
            results = engine.fit(chosen, server.global_vec, rc, on_result=shown.result, **fit_kwargs)
            if progress is not None:
                progress.remove_task(ctask)
            for s, losses in sorted(shown.step_losses.items()):  # train/loss per local step (mean over clients)
                run_dir.log({"type": "train", "round": rc.round, "step": round_idx * rc.local_steps + s,
                             "local_step": s, "loss": sum(losses) / len(losses)})
            stats = server.aggregate(results)
        probe_p = ((stats.get("aggregator_info") or {}).get("probe") or {}).get("probability", {})
        # what the server really received: a server_view hook may have replaced a client's update (a full-knowledge
        # adaptive attack crafts the malicious ones there); the stealth statistics below describe those updates
        received = stats.pop("received", None) or {}
        sent = [received.get(r.client_id, r.update) for r in results]
        for r, w, u in zip(results, stats["client_weights"], sent):
            replaced = ({"honest_update_norm": float(r.update.float().norm()), "update_norm": float(u.float().norm())}
                        if r.client_id in received else {})
            run_dir.log({"type": "client", "round": rc.round, "client_id": r.client_id,
                         "role": role_of.get(r.client_id), "malicious": malicious.get(r.client_id),
                         "aggregation_weight": w, **r.metrics, **replaced,
                         **({"probe_probability": probe_p[r.client_id]} if r.client_id in probe_p else {})})
        finite = [u.float().cpu() for u in sent if torch.isfinite(u).all() and u.numel() == server.global_vec.numel()]
        full = bool(finite) and len(finite) == len(results)
        cos = cosine_matrix(torch.stack(finite)).tolist() if full else None
        losses = [r.metrics["loss"] for r in results if r.metrics.get("loss") is not None]
        record = {"type": "round", "round": rc.round, "clients": [r.client_id for r in results],
                  "roles": [role_of.get(r.client_id) for r in results],
                  "malicious": [malicious.get(r.client_id) for r in results],
                  "aggregator": getattr(server.aggregator, "name", type(server.aggregator).__name__),
                  "client_weights": stats["client_weights"], "cosine": cos, "dropped": stats["dropped"],
                  "clipped": stats.get("clipped") or [],  # the default norm bound (fl.max_norm_ratio)
                  **_distance_stats(finite if full else None, [malicious.get(r.client_id) for r in results]),
                  "compare_weights": stats.get("compare_weights") or {},
                  "mean_loss": sum(losses) / len(losses) if losses else float("nan"),
                  "update_norm": stats["update_norm"],
                  "failed": list(getattr(engine, "last_failures", [])),  # clients that never answered
                  "lr": rc.lr, "aggregator_info": stats["aggregator_info"],
                  "skipped": stats.get("skipped"),  # why the adapter is unchanged this round, or None
                  "compute_seconds": sum(r.metrics.get("compute_seconds", 0.0) for r in results),
                  # the in-process engine: clients trained as one batched pass or one at a time, and why
                  **getattr(engine, "training_path", {})}
        record.update(_lora_record(server, lora, rc, results, stats))
        if save_adapter is not None and (save_every_round or round_idx + 1 == rounds):
            save_adapter(server.global_vec, rc.round)
        if lora is not None and lora.mode == "fedex":  # the residual of the latest global model, next to its adapters
            lora.save_residual(run_dir.path / "adapters" / RESIDUAL_FILE)
        record["seconds"] = time.perf_counter() - t0
        run_dir.log(record)
        # checkpoint last: a crash before this line re-runs the round on resume (its records are dropped)
        save_checkpoint({"server": server.state_dict(), "engine": engine.state_dict()}, run_dir.checkpoint_path)
        if on_round_end is not None:
            on_round_end(rc.round, record)
        if progress is not None:
            progress.advance(task)
    if progress is not None:
        progress.remove_task(task)


def _update_cache_open(engine):
    """The engine's update cache (fedsafe.fl.update_cache) opened for one round, or a no-op without one."""
    cache = getattr(engine, "update_cache", None)
    return cache.opened() if cache is not None else contextlib.nullcontext()


class _ClientProgress:
    """The clients bar of one round: each local step's loss and the last client's tokens/s in its description,
    and each step's losses kept for the per-step ``train`` records."""

    def __init__(self, progress, task, label: str, local_steps: int):
        self.progress, self.task, self.label, self.local_steps = progress, task, label, local_steps
        self.step_losses: dict[int, list[float]] = {}
        self.tokens_per_s: float | None = None

    def _show(self, text: str) -> None:
        if self.progress is not None:
            rate = f" · {self.tokens_per_s:,.0f} tok/s" if self.tokens_per_s else ""
            self.progress.update(self.task, description=f"{self.label} · {text}{rate}")

    def step(self, client_id: str, step: int, loss: float) -> None:
        if math.isfinite(loss):
            self.step_losses.setdefault(step, []).append(loss)
        self._show(f"{client_id} step {step}/{self.local_steps} loss {loss:.3f}")

    def result(self, res) -> None:
        self.tokens_per_s = res.metrics.get("tokens_per_s") or self.tokens_per_s
        if self.progress is not None:
            self.progress.advance(self.task)
        loss = res.metrics.get("loss")
        self._show(f"{res.client_id} loss {loss:.3f}" if isinstance(loss, (int, float)) else res.client_id)


def _distance_stats(updates: list[torch.Tensor] | None, is_malicious: list) -> dict:
    """Per client (stealth analysis): the L2 norm of the update the server received and its L2 distance to the
    mean of the benign clients' received updates (the simulator's truth; None without a benign client)."""
    if updates is None:
        return {"update_norms": None, "benign_mean_distance": None}
    stacked = torch.stack(updates).float()
    benign = [i for i, m in enumerate(is_malicious) if not m]
    dist = None
    if benign:
        dist = (stacked - stacked[benign].mean(dim=0)).norm(dim=1).tolist()
    return {"update_norms": stacked.norm(dim=1).tolist(), "benign_mean_distance": dist}


def _attach_lora_aggregation(server: Server, engine):
    """Give the server the LoRA layout (and model, for FedEx's residual) of the engine's trainer, if it has one.

    In-process and in Flower's simulation the trainer's model is the pipeline's one model; a Flower deployment's
    server holds no trainer: the aggregation error is then not logged and fedex is refused.
    """
    from fedsafe.errors import ConfigError
    from fedsafe.fl.lora_aggregation import LoRAAggregation

    if server.lora is not None:
        return server.lora
    mode = server.cfg.lora_aggregation
    trainer = getattr(engine, "trainer", None)
    flat = getattr(trainer, "flat", None) if trainer is not None else None
    if flat is None:
        if mode == "fedex":
            raise ConfigError(f"fl.lora_aggregation=fedex needs the server's in-memory model to hold the residual; "
                              f"the {getattr(engine, 'name', type(engine).__name__)} engine gives the server none "
                              "(run fedex in-process or in Flower's simulation)")
        return None
    server.attach_lora(LoRAAggregation(mode, flat, trainer.model))
    return server.lora


def _lora_record(server: Server, lora, rc, results, stats: dict) -> dict:
    """fl.lora_aggregation fields of a round record: mode, trained factors, aggregation error, payload bytes.

    ``bytes_per_client``: under secure aggregation the mean ciphertext bytes a client sent
    (``bytes_kind=ciphertext``); else the float32 bytes of the factors it trained (``bytes_kind=plaintext``:
    a frozen factor's zeros need not travel, although the engines carry the full vector).
    """
    from fedsafe.fl.lora_aggregation import BYTES_PER_VALUE

    out = {"lora_aggregation": server.cfg.lora_aggregation, "trainable": rc.trainable,
           "aggregation_error": stats.get("aggregation_error")}
    if "aggregation_error_factors" in stats:
        out["aggregation_error_factors"] = stats["aggregation_error_factors"]
    # an encrypted update travels as a mapping with its "ciphertexts" in the result's extra (secure aggregation)
    cipher = [sum(len(c) for c in payload["ciphertexts"]) for r in results for payload in r.extra.values()
              if isinstance(payload, dict) and isinstance(payload.get("ciphertexts"), list)]
    if cipher:
        out["bytes_per_client"], out["bytes_kind"] = sum(cipher) / len(cipher), "ciphertext"
    elif lora is not None:
        out["bytes_per_client"], out["bytes_kind"] = lora.payload_bytes(rc.round), "plaintext"
    elif rc.trainable == "AB":  # no layout (a Flower deployment's server), but every coordinate is trained
        out["bytes_per_client"], out["bytes_kind"] = server.global_vec.numel() * BYTES_PER_VALUE, "plaintext"
    else:
        out["bytes_per_client"], out["bytes_kind"] = None, None
    return out


def load_checkpoint(run_dir: RunDir, server: Server, engine) -> int:
    """Restore server and engine state from the run's checkpoint; returns the rounds completed.

    The checkpoint is read with ``torch.load(weights_only=True)`` (:func:`fedsafe.rundir.load_checkpoint_state`):
    resuming a run directory someone else wrote must not run code they put in it."""
    if not run_dir.checkpoint_path.exists():
        return 0
    state = load_checkpoint_state(run_dir.checkpoint_path)
    server.load_state_dict(state["server"])
    engine.load_state_dict(state.get("engine", {}))
    return server.round
