"""CKKS key files for a multi-machine deployment: the clients' secret-key context and the server's public one.

In one process (``fedsafe run``, Flower simulation) :mod:`fedsafe.defenses.secure_aggregation` makes fresh
keys for every run. A deployment has no process that every party shares, so the keys are made once, before
the run, by ``fedsafe flower keys --out DIR`` (:func:`write_key_files`), and carried to the parties out of band:

- ``clients.ctx``, the context WITH the secret key, written with mode 0600. Each organisation's SuperNode
  gets a copy (node config ``he-context``); its ClientApp encrypts the client's update with it and, when the
  server asks, decrypts the round's encrypted sum.
- ``server.ctx``, the public context WITHOUT the secret key. The ServerApp (the SuperLink machine, run config
  ``he-context``) adds ciphertexts with it and cannot decrypt.

File format (version 1): the line ``fedsafe-ckks-context 1``, one line of JSON (role, key id, CKKS
parameters, SHA-256 of the body), then the TenSEAL-serialised context. Both files of one key set carry
the same key id (a hash of the public context). The server sends its key id with every message, so a
SuperNode holding keys from another ``fedsafe flower keys`` run refuses to train instead of encrypting
under a key that the other parties cannot use. :func:`read_key_file` checks everything a person can get
wrong: a missing, truncated or foreign file, the server's file given to a node, the clients' file given
to the server, and CKKS parameters that differ from the config's ``secure_agg.ckks``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from fedsafe.defenses.secure_aggregation.params import CKKSParams
from fedsafe.errors import ConfigError

log = logging.getLogger("fedsafe")

__all__ = ["CLIENTS_FILE", "SERVER_FILE", "CLIENTS", "SERVER", "KeyFile", "KeySet", "write_key_files",
           "read_key_file", "context_summary"]

CLIENTS_FILE = "clients.ctx"
SERVER_FILE = "server.ctx"
CLIENTS = "clients"  # role of the file with the secret key
SERVER = "server"  # role of the public file
_MAGIC = b"fedsafe-ckks-context 1\n"
_KEYGEN_HINT = "write a key set with `fedsafe flower keys --out DIR --config CONFIG`"


@dataclass(frozen=True)
class KeyFile:
    """A key file, read and checked: its role, key id, CKKS parameters and the serialised TenSEAL context."""

    path: Path
    role: str
    key_id: str
    params: CKKSParams
    context: bytes


@dataclass(frozen=True)
class KeySet:
    """Where :func:`write_key_files` put the two files of one key set."""

    clients: Path
    server: Path
    key_id: str


def _header(role: str, key_id: str, params: CKKSParams, body: bytes) -> bytes:
    meta = {"role": role, "key_id": key_id, "ckks": params.model_dump(mode="json"),
            "body_sha256": hashlib.sha256(body).hexdigest()}
    return _MAGIC + json.dumps(meta, sort_keys=True).encode() + b"\n"


def write_key_files(params: CKKSParams, out_dir: str | Path, *, overwrite: bool = False) -> KeySet:
    """Make one CKKS key set; write ``clients.ctx`` (secret key, mode 0600) and ``server.ctx`` (public) atomically."""
    from fedsafe.defenses.secure_aggregation.protocol import KeyHolder
    from fedsafe.io import atomic_write_bytes

    out = Path(out_dir).expanduser().resolve()
    clients_path, server_path = out / CLIENTS_FILE, out / SERVER_FILE
    existing = [str(p) for p in (clients_path, server_path) if p.exists()]
    if existing and not overwrite:
        # a new key set would silently cut off every party still holding the old one
        raise ConfigError(f"{', '.join(existing)} already exist; pass --force to replace the key set (every "
                          "SuperNode and the server then need the new files)")
    keys = KeyHolder(params)
    server_body, clients_body = keys.server_context_bytes(), keys.client_context_bytes()
    key_id = hashlib.sha256(server_body).hexdigest()[:16]
    atomic_write_bytes(clients_path, _header(CLIENTS, key_id, params, clients_body) + clients_body, mode=0o600)
    atomic_write_bytes(server_path, _header(SERVER, key_id, params, server_body) + server_body, mode=0o644)
    return KeySet(clients_path, server_path, key_id)


def read_key_file(path: str | Path, role: str, params: CKKSParams | None = None, *, who: str = "") -> KeyFile:
    """Read a key file written by :func:`write_key_files` and check it is ``role``'s file (and has ``params``).

    ``role`` is ``"server"`` (the public file; a file holding the secret key is refused before it is
    loaded) or ``"clients"`` (the secret-key file). ``who`` names the setting in error messages, e.g.
    ``"node config he-context"``. Raises :class:`ConfigError` with the path and what to do.
    """
    import tenseal as ts

    if role not in (CLIENTS, SERVER):
        raise ValueError(f"role must be {CLIENTS!r} or {SERVER!r}, got {role!r}")
    path = Path(path).expanduser()
    label = f"{who} {path}".strip()
    wanted = CLIENTS_FILE if role == CLIENTS else SERVER_FILE
    if not path.is_file():
        raise ConfigError(f"{label}: no such file; {_KEYGEN_HINT} and use its {wanted}")
    raw = path.read_bytes()
    if not raw.startswith(_MAGIC):
        raise ConfigError(f"{label} is not a fedsafe CKKS key file ({_KEYGEN_HINT})")
    header_end = raw.find(b"\n", len(_MAGIC))
    try:
        meta = json.loads(raw[len(_MAGIC):header_end]) if header_end > 0 else None
        file_role, key_id = meta["role"], str(meta["key_id"])
        file_params = CKKSParams.model_validate(meta["ckks"])
        body_sha256 = str(meta["body_sha256"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{label}: the key file's header is damaged ({exc}); copy it again") from exc
    body = raw[header_end + 1:]
    if hashlib.sha256(body).hexdigest() != body_sha256:
        raise ConfigError(f"{label} is damaged (truncated or modified: its checksum does not match); copy it again")
    if file_role != role:
        if role == SERVER:
            raise ConfigError(f"{label} holds the secret key (the clients' file); the server must only get the "
                              f"public {SERVER_FILE}, and {CLIENTS_FILE} must never reach the server machine")
        raise ConfigError(f"{label} is the server's public context, which cannot decrypt; a SuperNode needs the "
                          f"{CLIENTS_FILE} of the same key set")
    try:
        context = ts.context_from(body)
    except Exception as exc:  # SEAL raises plain ValueError/RuntimeError on garbage
        raise ConfigError(f"{label}: the CKKS context does not load ({exc}); copy the file again") from exc
    if context.is_private() != (role == CLIENTS):
        raise ConfigError(f"{label}: the context {'lacks' if role == CLIENTS else 'holds'} the secret key, "
                          f"unlike a {wanted} ({_KEYGEN_HINT})")
    _check_context_matches(context, file_params, label)
    if params is not None and file_params != params:
        raise ConfigError(f"{label} was made with CKKS {context_summary(file_params)} but the config's "
                          f"secure_agg.ckks is {context_summary(params)}; {_KEYGEN_HINT} (the same config as "
                          "the run)")
    if role == CLIENTS and os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s holds the secret key but other users can read it; chmod 600 %s", label, path)
    return KeyFile(path, role, key_id, file_params, body)


def context_summary(params: CKKSParams) -> str:
    """The parameters that must agree, in one short phrase (for error messages)."""
    return (f"N={params.poly_modulus_degree}, coeff_mod_bit_sizes={list(params.coeff_mod_bit_sizes)}, "
            f"global_scale=2^{params.scale_bits:g}, {params.encryption}")


def _check_context_matches(context, params: CKKSParams, label: str) -> None:
    """The header's parameters describe the context in the body (ring degree, prime count, scale)."""
    data = context.seal_context().data
    degree = data.key_context_data().parms().poly_modulus_degree()
    primes, level = 0, data.key_context_data()
    while level is not None:
        primes, level = primes + 1, level.next_context_data()
    if (degree, primes, float(context.global_scale)) != (params.poly_modulus_degree, len(params.coeff_mod_bit_sizes),
                                                          float(params.global_scale)):
        raise ConfigError(f"{label}: its header says CKKS {context_summary(params)} but the context holds N={degree}, "
                          f"{primes} primes, scale {context.global_scale:g}; the file was modified ({_KEYGEN_HINT})")
