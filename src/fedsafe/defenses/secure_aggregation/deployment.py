"""Secure aggregation's key ring for a Flower deployment: what the engine does with the CKKS keys and the encrypted
sum, reached through :meth:`fedsafe.plugins.Plugin.deployment_keys` (``DeploymentKeys.keyring``) so that no engine
module imports this plug-in.

Light (no torch, no TenSEAL at import): the thin ClientApp reads a node's key file through it. The key files are
:mod:`fedsafe.defenses.secure_aggregation.keys`'s; decryption is
:func:`fedsafe.defenses.secure_aggregation.protocol.decrypt_aggregate`, imported when a sum is decrypted.
"""

from __future__ import annotations

from pathlib import Path

from fedsafe.defenses.secure_aggregation import keys
from fedsafe.defenses.secure_aggregation.params import MIN_CLIENTS


class CkksKeyRing:
    """The :class:`fedsafe.plugins.KeyRing` of secure aggregation (CKKS key files of ``fedsafe flower keys``)."""

    default_min_clients = MIN_CLIENTS

    def write(self, params, out_dir: str | Path, overwrite: bool = False) -> keys.KeySet:
        """Write a new key set (clients.ctx secret, server.ctx public) for ``params``."""
        return keys.write_key_files(params, out_dir, overwrite=overwrite)

    def read(self, path: str | Path, holder: str, params=None, who: str = "") -> keys.KeyFile:
        """Read and check ``holder``'s key file (``clients``: the secret one, ``server``: the public one)."""
        return keys.read_key_file(path, holder, params, who=who)

    def describe(self, params) -> str:
        """The key parameters in one phrase, with their security level (for the ``fedsafe flower keys`` output)."""
        return f"CKKS {keys.context_summary(params)}, {params.security_label()}"

    def client_key(self, trainer) -> tuple[bytes, int] | None:
        """The secret-key context and minimum sum of the client party inside a client-side trainer (a simulation's
        own keys), or None when this run's clients do not encrypt."""
        from fedsafe.defenses.secure_aggregation.protocol import client_party

        party = client_party(trainer)
        return None if party is None else (party.context, party.min_clients)

    def decrypt(self, secret: bytes, wire, mask, min_clients: int):
        """Decrypt an encrypted sum (its wire form) with a key holder's secret context; a sum of fewer than
        ``min_clients`` clients raises :class:`fedsafe.errors.DecryptRefused`."""
        from fedsafe.defenses.secure_aggregation.protocol import EncryptedAggregate, decrypt_aggregate

        return decrypt_aggregate(secret, EncryptedAggregate.from_wire(wire), mask, min_clients)


KEYRING = CkksKeyRing()
