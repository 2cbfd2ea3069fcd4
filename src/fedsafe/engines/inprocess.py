"""The default engine: every client trains in this process on one shared model, one after another."""

from __future__ import annotations

import torch

from fedsafe.fl.client import ClientData, ClientResult, LocalTrainer, RoundConfig


class InProcessEngine:
    """Runs sampled clients sequentially with one :class:`LocalTrainer` (LoRA weights swapped per client)."""

    name = "inprocess"

    def __init__(self, trainer: LocalTrainer, clients: list[ClientData]):
        self.trainer = trainer
        self.clients = {c.client_id: c for c in clients}
        self.client_states: dict[str, dict] = {}  # client-side state that persists (SCAFFOLD's c_i)

    def fit(self, client_ids: list[str], global_vec: torch.Tensor, rc: RoundConfig,
            on_result=None) -> list[ClientResult]:
        """Train each listed client from ``global_vec``; ``on_result`` is called after each one."""
        results = []
        for cid in client_ids:
            state = self.client_states.setdefault(cid, {})
            res = self.trainer.fit(self.clients[cid], global_vec, rc, state)
            results.append(res)
            if on_result is not None:
                on_result(res)
        return results

    def state_dict(self) -> dict:
        return {cid: dict(s) for cid, s in self.client_states.items()}

    def load_state_dict(self, state: dict) -> None:
        self.client_states = {cid: dict(s) for cid, s in state.items()}
