"""The FedIT safety attack: malicious clients train honestly on unaligned data (data poisoning).

Ye et al., "Emerging Safety Attack and Defense in Federated Instruction Tuning of Large Language Models"
(ICLR 2025). The attack is a role whose data is unaligned: ``roles: [{name: malicious, data: [...]}]``, from a
public dataset or written by fedsafe's generation pipeline (``{generate: {kind: unaligned, ...}}``,
:mod:`fedsafe.data.datagen`), so the data itself is where the attack lives. Hook ``client_data`` records who
the attackers are and what they hold (``attack_clients.json`` in the run directory: client, role, examples and
the data sources with their generation settings), which the stealth analysis and the report read as ground truth.
Model-poisoning attacks that change the update itself build on this role (``roles[i].attack``,
:mod:`fedsafe.attacks.adaptive`).
"""

from __future__ import annotations

from fedsafe.plugins import Plugin, register


@register
class DataPoisoning(Plugin):
    """Malicious roles train on unaligned data; records the attackers and their data."""

    name = "data_poisoning"
    kind = "attack"
    section = None
    Config = None
    order = 6

    @classmethod
    def is_active(cls, config, setup) -> bool:
        return any(r.is_malicious for r in setup.roles)

    def client_data(self, clients: list) -> list:
        roles = {r.name: r for r in self.ctx.roles}
        attackers = [{"client_id": c.client_id, "role": c.role, "examples": c.num_samples,
                      "data": [s.model_dump(mode="json", exclude_none=True) for s in roles[c.role].data]
                      if c.role in roles else None}
                     for c in clients if c.malicious]
        if self.ctx.run_dir is not None:
            self.ctx.run_dir.write_json("attack_clients.json", attackers)
        self.ctx.print(f"data poisoning: {len(attackers)} malicious client(s): "
                       + ", ".join(a["client_id"] for a in attackers))
        return clients
