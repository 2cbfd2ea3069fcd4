"""The default engine: every client trains in this process on one shared model.

The clients of a round train as adapters of one batched pass (fedsafe.fl.batched) when nothing changes local
training, else one after another; :attr:`InProcessEngine.training_path` says which path the last round took and
why, and the round record carries it.
"""

from __future__ import annotations

import inspect

import torch

from fedsafe.data.client_data import ClientData
from fedsafe.fl.client import ClientResult, LocalTrainer, RoundConfig, derive_seed


class InProcessEngine:
    """Runs sampled clients with one :class:`LocalTrainer` (LoRA weights swapped per client), batched when it can."""

    name = "inprocess"

    def __init__(self, trainer: LocalTrainer, clients: list[ClientData], batched_clients: str = "off",
                 sequential_plugins: dict[str, str] | None = None):
        self.trainer = trainer
        self.clients = {c.client_id: c for c in clients}
        self.client_states: dict[str, dict] = {}  # client-side state that persists (SCAFFOLD's c_i)
        self.training_path: dict = {}
        self.plan_batching(batched_clients, sequential_plugins)

    def plan_batching(self, batched_clients: str, sequential_plugins: dict[str, str] | None = None) -> None:
        """``fl.batched_clients`` (auto | on | off) and the plug-ins that change local training (name -> why)."""
        from fedsafe.errors import ConfigError
        from fedsafe.fl.batched import BATCHED_CLIENTS

        if batched_clients not in BATCHED_CLIENTS:
            raise ConfigError(f"fl.batched_clients must be one of {', '.join(BATCHED_CLIENTS)}, "
                              f"got {batched_clients!r}")
        self.batched_clients = batched_clients
        self.sequential_plugins = dict(sequential_plugins or {})

    def why_sequential(self, client_ids: list[str], rc: RoundConfig) -> str | None:
        """Why this round's clients train one at a time, or None when they train as one batched pass."""
        from fedsafe.fl.batched import why_sequential

        if self.batched_clients == "off":
            return "fl.batched_clients=off"
        if self.sequential_plugins:
            return "; ".join(f"{name}: {why}" for name, why in self.sequential_plugins.items())
        trainer = self._inner()[0]
        if self.batched_clients == "auto":
            from fedsafe.fl.batched import CPU_REASON

            param = next(iter(trainer.model.parameters()), None)
            if param is None or param.device.type == "cpu":
                return CPU_REASON
        return why_sequential(trainer, rc, len(client_ids))

    def _inner(self):
        """The local trainer and the client_update hooks that follow it (fedsafe.plugins.ClientPipeline)."""
        from fedsafe.plugins import ClientPipeline

        if isinstance(self.trainer, ClientPipeline):
            return self.trainer.trainer, self.trainer.plugins
        return self.trainer, []

    def fit(self, client_ids: list[str], global_vec: torch.Tensor, rc: RoundConfig,
            on_result=None, on_step=None) -> list[ClientResult]:
        """Train each listed client from ``global_vec``; ``on_result`` is called after each one, ``on_step(client_id,
        step, loss)`` after each local optimizer step where the trainer reports steps (progress only)."""
        reason = self.why_sequential(client_ids, rc)
        self.training_path = {"training_path": "sequential" if reason else "batched", "training_path_reason": reason}
        if reason is None:
            return self._fit_batched(client_ids, global_vec, rc, on_result, on_step)
        steps = on_step is not None and "on_step" in inspect.signature(self.trainer.fit).parameters
        results = []
        for cid in client_ids:
            state = self.client_states.setdefault(cid, {})
            kwargs = {"on_step": lambda step, loss, cid=cid: on_step(cid, step, loss)} if steps else {}
            res = self.trainer.fit(self.clients[cid], global_vec, rc, state, **kwargs)
            results.append(res)
            if on_result is not None:
                on_result(res)
        return results

    @property
    def update_cache(self):
        """The local trainer's :class:`fedsafe.fl.update_cache.UpdateCache` (a grid's), or None."""
        return getattr(self.trainer, "update_cache", None)

    def _fit_batched(self, client_ids, global_vec, rc, on_result, on_step=None) -> list[ClientResult]:
        from fedsafe.fl.batched import BatchedTrainer

        trainer, hooks = self._inner()
        clients = [self.clients[cid] for cid in client_ids]
        for cid in client_ids:
            self.client_states.setdefault(cid, {})
        cache = getattr(trainer, "update_cache", None)
        if cache is not None and cache.is_open:
            from fedsafe.fl.update_cache import why_not_cached

            if why_not_cached(trainer, rc) is None:  # e.g. a FedEx residual in the base weights: trained, not keyed
                return self._fit_batched_cached(cache, trainer, hooks, clients, global_vec, rc, on_result, on_step)
            cache.not_cached += len(clients)

        def after_each(k: int, result: ClientResult) -> ClientResult:
            for p in hooks:  # as ClientPipeline.fit does after each client's training
                result = p.client_update(result, clients[k], global_vec, rc, trainer)
            if on_result is not None:
                on_result(result)
            return result

        return BatchedTrainer(trainer).fit_many(clients, global_vec, rc, after_each=after_each, on_step=on_step)

    def _fit_batched_cached(self, cache, trainer, hooks, clients, global_vec, rc, on_result, on_step):
        """The batched round through the update cache: stored clients are read, only the others train (one batched
        pass, or the sequential trainer for a single one); the client_update hooks then run client by client in
        order with the global RNG each client's training left, as without the cache. Each step's losses reach
        ``on_step`` after the pass, client by client within a step, the order the batched pass reports them in."""
        from fedsafe.fl.batched import BatchedTrainer
        from fedsafe.fl.update_cache import default_generator, restore_rng, update_key

        keys = [update_key(trainer, c, global_vec, rc, "batched") for c in clients]
        done: dict[int, tuple] = {}  # k -> (result, step losses, RNG state after its training)
        for k, (c, (key, _fields)) in enumerate(zip(clients, keys)):
            found = cache.get(key, c.client_id)
            if found is not None:
                done[k] = found
        missing = [k for k in range(len(clients)) if k not in done]
        if len(missing) >= 2:
            losses: dict[str, list[float]] = {clients[k].client_id: [] for k in missing}

            def after_each(j: int, result: ClientResult) -> ClientResult:  # the RNG as that client's training left it
                k = missing[j]
                rng = default_generator(trainer.device).get_state()
                cache.put(keys[k][0], keys[k][1], result, losses[clients[k].client_id], rng)
                done[k] = (result, losses[clients[k].client_id], rng)
                return result

            BatchedTrainer(trainer).fit_many([clients[k] for k in missing], global_vec, rc, after_each=after_each,
                                             on_step=lambda cid, step, loss: losses[cid].append(loss))
        elif missing:  # one client: the sequential trainer (through the cache, which stores it)
            k = missing[0]
            step_losses: list[float] = []
            result = trainer.fit(clients[k], global_vec, rc, self.client_states[clients[k].client_id],
                                 on_step=lambda step, loss: step_losses.append(loss))
            done[k] = (result, step_losses, default_generator(trainer.device).get_state())
        for k in missing:
            done[k][0].metrics["update_cache"] = "miss"
        if on_step is not None:
            for step in range(1, rc.local_steps + 1):
                for k, c in enumerate(clients):
                    if step <= len(done[k][1]):
                        on_step(c.client_id, step, done[k][1][step - 1])
        out = []
        for k, c in enumerate(clients):
            result, _losses, rng = done[k]
            restore_rng(trainer.device, derive_seed(rc.seed, rc.round, c.client_id), rng)
            for p in hooks:  # as ClientPipeline.fit does after each client's training
                result = p.client_update(result, c, global_vec, rc, trainer)
            if on_result is not None:
                on_result(result)
            out.append(result)
        return out

    def state_dict(self) -> dict:
        return {cid: dict(s) for cid, s in self.client_states.items()}

    def load_state_dict(self, state: dict) -> None:
        self.client_states = {cid: dict(s) for cid, s in state.items()}
