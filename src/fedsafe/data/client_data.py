"""A client's data: its identity, simulated role, tokenised examples (built by :func:`fedsafe.data.build_clients`)."""

from __future__ import annotations

from dataclasses import dataclass

from fedsafe.data.format import TokenizedExample


@dataclass
class ClientData:
    """A client's identity, simulated role and tokenised local data."""

    client_id: str
    role: str
    examples: list[TokenizedExample]
    malicious: bool = False

    @property
    def num_samples(self) -> int:
        """How many examples the client holds (its FedAvg weight)."""
        return len(self.examples)
