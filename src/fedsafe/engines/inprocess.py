"""The default engine: every client trains in this process on one shared model.

The clients of a round train as adapters of one batched pass (fedsafe.fl.batched) when nothing changes local
training, else one after another; :attr:`InProcessEngine.training_path` says which path the last round took and
why, and the round record carries it.
"""

from __future__ import annotations

import inspect

import torch

from fedsafe.fl.client import ClientData, ClientResult, LocalTrainer, RoundConfig


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
        """``fl.batched_clients`` (auto | off) and the plug-ins that change local training (name -> why)."""
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
        return why_sequential(self._inner()[0], rc, len(client_ids))

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

    def _fit_batched(self, client_ids, global_vec, rc, on_result, on_step=None) -> list[ClientResult]:
        from fedsafe.fl.batched import BatchedTrainer

        trainer, hooks = self._inner()
        clients = [self.clients[cid] for cid in client_ids]
        for cid in client_ids:
            self.client_states.setdefault(cid, {})

        def after_each(k: int, result: ClientResult) -> ClientResult:
            for p in hooks:  # as ClientPipeline.fit does after each client's training
                result = p.client_update(result, clients[k], global_vec, rc, trainer)
            if on_result is not None:
                on_result(result)
            return result

        return BatchedTrainer(trainer).fit_many(clients, global_vec, rc, after_each=after_each, on_step=on_step)

    def state_dict(self) -> dict:
        return {cid: dict(s) for cid, s in self.client_states.items()}

    def load_state_dict(self, state: dict) -> None:
        self.client_states = {cid: dict(s) for cid, s in state.items()}
