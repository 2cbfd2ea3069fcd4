"""Secure aggregation of LoRA updates with CKKS homomorphic encryption (FedShield-LLM, done right).

Paper: Mia & Amini, "FedShield-LLM: A Secure and Scalable Federated Fine-Tuned Large Language Model"
(2025). Clients encrypt their LoRA updates with CKKS (Cheon, Kim, Kim, Song, "Homomorphic Encryption for
Arithmetic of Approximate Numbers", ASIACRYPT 2017) via TenSEAL/SEAL, the server adds ciphertexts, and the
key holders decrypt the sum. Per round t, with participating clients k, sample counts n_k and the shared
keep-mask M_t (see :mod:`fedsafe.defenses.secure_aggregation.pruning`):

    w_k        = n_k / sum_j n_j                          (clients learn sum_j n_j from RoundConfig.total_samples)
    c_k        = Enc(w_k * delta_k[M_t])                  (client k; packed N/2 slots per ciphertext)
    C          = sum_k c_k                                (server, slot-wise ciphertext addition)
    delta_t    = scatter(Dec(C) / sum_k w_k, M_t), 0 off M_t   (key holder; sum_k w_k = 1 unless a client dropped)
    global_t+1 = global_t + server_lr * delta_t           (pruned coordinates keep the global value)

Differences from the paper's public code, each one of its flaws fixed:
  * keys: a :class:`KeyHolder` creates the context; clients get the secret key, the server only the
    public context (no secret key), so the server can add and scale ciphertexts but never decrypt;
  * packing: only the kept coordinates are encrypted, N/2 to a ciphertext, so bytes and time shrink with
    the pruning ratio;
  * masks: one mask per round derived from the global adapter, identical at every party, and used when
    scattering the aggregate back;
  * weighting: clients pre-scale by n_k / sum n, so the server's plain sum is the weighted FedAvg.

Use in a run (config section ``secure_agg``, see :class:`fedsafe.defenses.secure_aggregation.SecureAggConfig`)::

    secure_agg:
      enabled: true
      ckks: {poly_modulus_degree: 8192, coeff_mod_bit_sizes: [60, 40, 60], global_scale: 1099511627776.0}
      prune_start: 0.2      # FedShield's linear schedule; 0 and 0 encrypt every coordinate (exact FedAvg)
      prune_end: 0.5
      min_clients: 2        # never decrypt a sum of fewer clients' updates (see "Minimum sum size" below)

The secure_aggregation plug-in (:mod:`fedsafe.defenses.secure_aggregation`) wires it: its ``client_update``
hook encrypts each client's result with a :class:`SecureAggClient` (each client trains, then encrypts), and
its ``aggregate`` hook gives the :class:`fedsafe.fl.server.Server` a :class:`SecureAggServer` (public context
only) whose key-holder callback decrypts the sum. The client/server boundary stays plain data, so
any engine (in-process, Flower) carries it unchanged: under HE a :class:`fedsafe.fl.client.ClientResult` has
an empty ``update`` tensor and ``extra["secure_agg"]`` holds the wire form of :class:`EncryptedUpdate`
(``{"format", "ciphertexts": list[bytes], "length": int, "mask_digest": str, "weight": float}``, only
bytes, ints, floats and strings); a client that could not encrypt sends ``extra["secure_agg_error"]`` (a
string) instead and is dropped with that reason. Flower simulation (``fedsafe run --engine flower``) takes
the same path: the pipeline hands the plug-in trainer to the engine factory, a Flower message carries the
bytes unchanged (round trip tested in tests/test_secure_agg.py), and the pipeline's Server sums them.

A multi-machine Flower deployment has no process that every party shares, so the keys are made ahead of
the run by ``fedsafe flower keys`` (:mod:`fedsafe.defenses.secure_aggregation.keys`): each SuperNode gets the secret-key
file (its ClientApp builds the same client side with :func:`fedsafe.plugins.client_trainer`), the ServerApp
gets the public file (the plug-in's server side then holds no key), and the Flower engine becomes the
key holder through :meth:`SecureAggServer.use_remote_key_holder`: it sends
:meth:`EncryptedAggregate.to_wire` and the round's mask to a key-holding SuperNode, which answers with
:func:`decrypt_aggregate`, the function the in-process key holder calls (see :mod:`fedsafe.engines.flower.client_app`).

What composes with HE (the server only ever computes sum_k c_k, optionally times one plaintext scalar):
  * FedAvg (weighted by sample counts) and FedProx (a client-side proximal term; the server still averages);
  * DP noise added by clients before encryption (``dp.local``, DP-SGD; note that pre-scaling by w_k scales
    the noise), client-side clipping, and the constrained-update losses (``constrained``), all on the client;
  * a server learning rate (global += eta * delta_t, a linear map of the decrypted aggregate);
  * the post-hoc defense, which runs on the decrypted global adapter after the last round;
  * evaluation of the global model (it is published every round, as in any secure aggregation).
What does not (refused by :func:`check_compatible` when the config is built):
  * robust aggregators (median, trimmed mean, Krum, Bulyan, DnC, FoolsGold, residual weighting) and the
    Safe-FedLLM probe: they rank, compare or classify individual plaintext updates, which the server
    never sees; likewise the server-side norm check ``aggregator.max_update_norm`` and DP-FedAvg
    (``dp.client_level``), whose server clips each update to a norm bound it cannot measure;
  * local-model probing: it evaluates individual local models;
  * SCAFFOLD: its per-client control variates travel in plaintext and reveal each update;
  * stateful or non-linear server optimisers (FedAdam, FedYogi, FedAdagrad, and also FedAvgM). Adaptive
    ones divide by a per-coordinate second moment, a non-linear function that cannot run on ciphertexts;
    all of them keep optimiser state built from past plaintext aggregates, which would have to live with
    a key holder, and their momentum would move coordinates pruned this round, breaking "pruned
    coordinates keep the global value". FedAvgM is linear and could be supported later by masking the
    momentum; it is refused for now rather than silently changing the pruning semantics.
The per-client statistics that need plaintext updates (pairwise cosine, server-side update norms) are not
available under HE; the run log leaves them empty. Clients still report their training loss.

Threat model: honest-but-curious server. It learns ciphertexts, the public context, each client's sample
count and weight and, once the new global adapter is published, the aggregate delta_t (as in any secure
aggregation). Every client holds the secret key (the key holder is a designated party or the clients
through a setup step), so this protects updates from the server, not from other clients, and it does not
stop a malicious client from encrypting whatever it likes. In one process, keys are made afresh for every
run (and on resume); in a deployment, the key set of ``fedsafe flower keys`` serves every run that uses
it. The secret key is never written to the run directory and never sent to the server.

Minimum sum size (``secure_agg.min_clients``, default 2): the decryption of a "sum" of one client is that
client's update, so nothing below the minimum is ever decrypted. The server refuses first: with fewer kept
ciphertexts :meth:`SecureAggServer.aggregate` decrypts nothing and returns ``delta=None`` with the reason in
``stats["skipped"]`` (the dropped clients are still listed), and the round leaves the global adapter
unchanged, in process and in a Flower deployment alike. The key holder checks again in
:func:`decrypt_aggregate`: the aggregate carries the number of ciphertexts summed and their client ids,
and a count below the minimum, or a client id named twice, is refused with :class:`DecryptRefused`. A
Flower key-holding SuperNode applies the larger of the config's minimum and its own node config
``he-min-clients`` (default 2), so a server cannot lower it by sending another config. What this does not
stop: a malicious server that lies about the count (it adds one client's ciphertexts and claims several,
or adds the same one twice under two names). The key holder cannot tell how many ciphertexts went into a
CKKS sum; only a threshold scheme, client-signed contributions or a verifiable sum would prevent that. The
check binds an honest-but-curious server, and any honest server's short round, not a malicious one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedsafe.defenses.secure_aggregation.params import (
    HE_COMPATIBLE_AGGREGATORS,
    HE_COMPATIBLE_ALGORITHMS,
    MIN_CLIENTS,
    CKKSParams,
    check_compatible,
    he_security_level,
)
from fedsafe.defenses.secure_aggregation.pruning import MaskSchedule, mask_digest, pruning_mask
from fedsafe.errors import DECRYPT_REFUSED as REFUSED
from fedsafe.errors import ConfigError, DecryptRefused, UpdateRejected

if TYPE_CHECKING:  # tenseal is imported lazily: only runs with secure_agg.enabled need it
    import tenseal as ts

    from fedsafe.data.client_data import ClientData
    from fedsafe.fl.client import ClientResult, RoundConfig

__all__ = [
    "CKKSParams",
    "DecryptRefused",
    "MIN_CLIENTS",
    "check_sum_size",
    "KeyHolder",
    "EncryptedUpdate",
    "EncryptedAggregate",
    "CiphertextSum",
    "SecureAggClient",
    "SecureAggServer",
    "SecureAggregator",
    "client_party",
    "WIRE_KEY",
    "WIRE_ERROR_KEY",
    "HE_COMPATIBLE_AGGREGATORS",
    "HE_COMPATIBLE_ALGORITHMS",
    "he_security_level",
    "load_context",
    "fedavg_weights",
    "encrypt_update",
    "aggregate_encrypted",
    "decrypt_aggregate",
    "check_compatible",
    "fedshield_encrypt",
    "fedshield_aggregate",
    "fedshield_decrypt",
]

WIRE_KEY = "secure_agg"  # ClientResult.extra key of the encrypted update (plain bytes/ints/str)
WIRE_ERROR_KEY = "secure_agg_error"  # ClientResult.extra key when a client could not encrypt
WIRE_FORMAT = "fedsafe.ckks.v1"


class KeyHolder:
    """Creates the CKKS keys; hands the secret-key context to clients and only the public context to the server."""

    def __init__(self, params: CKKSParams | None = None):
        import tenseal as ts

        self.params = params or CKKSParams()
        encryption = (
            ts.ENCRYPTION_TYPE.ASYMMETRIC if self.params.encryption == "asymmetric" else ts.ENCRYPTION_TYPE.SYMMETRIC
        )
        self._context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=self.params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(self.params.coeff_mod_bit_sizes),
            encryption_type=encryption,
        )
        self._context.global_scale = self.params.global_scale
        # No Galois keys are generated (only rotations need them) and relinearisation keys are never shipped:
        # sums and plaintext-scalar products need neither, and both are large.
        self._client_bytes: bytes | None = None
        self._server_bytes: bytes | None = None

    def client_context_bytes(self) -> bytes:
        """Serialised context WITH the secret key: for clients (encrypt and decrypt) only."""
        if self._client_bytes is None:
            self._client_bytes = self._context.serialize(
                save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
            )
        return self._client_bytes

    def server_context_bytes(self) -> bytes:
        """Serialised public context WITHOUT the secret key: the server can add and scale, never decrypt."""
        if self._server_bytes is None:
            self._server_bytes = self._context.serialize(
                save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
            )
        return self._server_bytes


@dataclass(frozen=True)
class EncryptedUpdate:
    """One client's weighted, pruned update: serialised CKKS ciphertexts of N/2 slots each."""

    chunks: tuple[bytes, ...]
    length: int  # number of encrypted values (kept coordinates)
    mask_digest: str
    client_id: str | None = None
    weight: float | None = None  # the w_k the client pre-scaled by (None: not pre-scaled, FedShield baseline)

    @property
    def nbytes(self) -> int:
        """Bytes this client uploads (sum of serialised ciphertexts)."""
        return sum(len(c) for c in self.chunks)

    @property
    def num_ciphertexts(self) -> int:
        """Number of ciphertexts."""
        return len(self.chunks)

    def to_wire(self) -> dict:
        """Plain-data form for ``ClientResult.extra["secure_agg"]`` (bytes, ints, floats, strings only)."""
        return {"format": WIRE_FORMAT, "ciphertexts": list(self.chunks), "length": self.length,
                "mask_digest": self.mask_digest, "weight": self.weight}

    @classmethod
    def from_wire(cls, payload: Any, client_id: str | None = None) -> EncryptedUpdate:
        """Parse :meth:`to_wire` output; a malformed payload raises UpdateRejected naming the client."""
        who = f"client {client_id}" if client_id is not None else "client"
        if not isinstance(payload, dict) or payload.get("format") != WIRE_FORMAT:
            raise UpdateRejected(f"{who}: extra[{WIRE_KEY!r}] is not a {WIRE_FORMAT} payload")
        chunks = payload.get("ciphertexts")
        if not isinstance(chunks, (list, tuple)) or not all(isinstance(c, (bytes, bytearray)) for c in chunks):
            raise UpdateRejected(f"{who}: 'ciphertexts' must be a list of bytes")
        length, digest, weight = payload.get("length"), payload.get("mask_digest"), payload.get("weight")
        if not isinstance(length, int) or not isinstance(digest, str):
            raise UpdateRejected(f"{who}: 'length' (int) and 'mask_digest' (str) are required")
        if weight is not None and not (isinstance(weight, (int, float)) and math.isfinite(weight)
                                       and 0.0 <= weight <= 1.0):
            raise UpdateRejected(f"{who}: 'weight' must be a number in [0, 1], got {weight!r}")
        return cls(tuple(bytes(c) for c in chunks), length, digest, client_id,
                   None if weight is None else float(weight))


@dataclass(frozen=True)
class EncryptedAggregate:
    """The server's slot-wise sum of the clients' ciphertexts (still encrypted)."""

    chunks: tuple[bytes, ...]
    length: int
    mask_digest: str
    num_clients: int
    scale: float | None = None
    client_ids: tuple[str | None, ...] = field(default_factory=tuple)
    weight_sum: float | None = None  # sum of the clients' w_k: the key holder divides by it (dropouts)

    @property
    def nbytes(self) -> int:
        """Bytes the server sends back for decryption."""
        return sum(len(c) for c in self.chunks)

    def to_wire(self) -> dict:
        """Plain-data form to send to a key holder."""
        return {"format": WIRE_FORMAT, "ciphertexts": list(self.chunks), "length": self.length,
                "mask_digest": self.mask_digest, "num_clients": self.num_clients, "scale": self.scale,
                "client_ids": list(self.client_ids), "weight_sum": self.weight_sum}

    @classmethod
    def from_wire(cls, payload: dict) -> EncryptedAggregate:
        """Parse :meth:`to_wire` output."""
        if not isinstance(payload, dict) or payload.get("format") != WIRE_FORMAT:
            raise ConfigError(f"not a {WIRE_FORMAT} aggregate payload")
        return cls(tuple(bytes(c) for c in payload["ciphertexts"]), int(payload["length"]),
                   str(payload["mask_digest"]), int(payload["num_clients"]), payload.get("scale"),
                   tuple(payload.get("client_ids") or ()), payload.get("weight_sum"))


def load_context(context: bytes | ts.Context) -> ts.Context:
    """A TenSEAL context from its serialised bytes (or the context itself)."""
    import tenseal as ts

    if isinstance(context, ts.Context):
        return context
    if not isinstance(context, (bytes, bytearray, memoryview)):
        raise ConfigError(f"expected serialised CKKS context bytes, got {type(context).__name__}")
    try:
        return ts.context_from(bytes(context))
    except Exception as e:  # SEAL raises plain ValueError/RuntimeError on garbage
        raise ConfigError(f"could not load the CKKS context from {len(context)} bytes: {e}") from e


def fedavg_weights(num_samples: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """FedAvg client weights n_k / sum_j n_j (float64)."""
    n = torch.as_tensor(num_samples, dtype=torch.float64).reshape(-1)
    if n.numel() == 0:
        raise ConfigError("num_samples is empty: no clients in this round")
    if not bool(torch.isfinite(n).all()) or bool((n < 0).any()) or float(n.sum()) <= 0:
        raise ConfigError(f"num_samples must be non-negative with a positive sum, got {n.tolist()}")
    return n / n.sum()


def encrypt_update(
    ctx: bytes | ts.Context,
    update: torch.Tensor,
    weight: float,
    mask: torch.Tensor,
    *,
    client_id: str | None = None,
) -> EncryptedUpdate:
    """Client side: encrypt weight * update[mask], packed into ciphertexts of N/2 slots."""
    import tenseal as ts

    who = f"client {client_id}" if client_id is not None else "client"
    if not isinstance(update, torch.Tensor) or update.ndim != 1:
        raise UpdateRejected(f"{who}: update must be a 1-D tensor (the flat LoRA delta)")
    _check_mask(mask, update.numel(), who)
    if not math.isfinite(weight) or weight < 0:
        raise UpdateRejected(f"{who}: weight must be finite and >= 0, got {weight}")
    context = load_context(ctx)
    values = update.detach().to("cpu", torch.float64)[mask.detach().to("cpu")]
    if not bool(torch.isfinite(values).all()):
        raise UpdateRejected(f"{who}: update contains NaN or Inf")
    limit = _max_abs_value(context)
    peak = float(values.abs().max()) if values.numel() else 0.0
    if peak >= limit:
        raise UpdateRejected(
            f"{who}: update has |value| {peak:.3g}, beyond the {limit:.3g} the CKKS parameters can hold; "
            "lower global_scale or clip updates"
        )
    values = (values * weight).numpy()
    slots = _slot_count(context)
    chunks = tuple(
        ts.ckks_vector(context, values[start: start + slots]).serialize() for start in range(0, values.size, slots)
    )
    return EncryptedUpdate(chunks=chunks, length=int(values.size), mask_digest=mask_digest(mask),
                           client_id=client_id, weight=float(weight))


class CiphertextSum:
    """Server side, streaming: adds each client's ciphertexts into a running sum as they arrive.

    Every client is checked in full (mask digest, lengths, slot counts, scale, that each ciphertext loads
    under the public context) before any of its ciphertexts is added, so a rejected client leaves the sum
    untouched and can simply be dropped. Memory: one sum plus one client, whatever the number of clients.
    """

    def __init__(self, server_ctx: bytes | ts.Context, expected_mask_digest: str | None = None):
        self.context = load_context(server_ctx)
        if self.context.is_private():
            raise ConfigError(
                "the server got a context that holds the secret key; it must only get "
                "KeyHolder.server_context_bytes()"
            )
        self.mask_digest = expected_mask_digest
        self.length: int | None = None
        self.num_ciphertexts: int | None = None
        self._totals: list = []
        self._scale = self.context.global_scale
        self._level = self.context.seal_context().data.first_context_data().chain_index() + 1  # data primes
        self.client_ids: list[str | None] = []
        self.weights: list[float | None] = []

    def add(self, update: EncryptedUpdate) -> None:
        """Check one client's ciphertexts and add them; raises UpdateRejected (sum unchanged) if they are bad."""
        import tenseal as ts

        who = f"client {update.client_id if update.client_id is not None else '#' + str(len(self.client_ids))}"
        if self.mask_digest is not None and update.mask_digest != self.mask_digest:
            raise UpdateRejected(
                f"{who}: pruning mask {update.mask_digest} differs from the round's mask {self.mask_digest}"
            )
        slots = _slot_count(self.context)
        expected_cts = math.ceil(update.length / slots) if update.length > 0 else 0
        if update.num_ciphertexts != expected_cts:
            raise UpdateRejected(f"{who}: {update.num_ciphertexts} ciphertexts for {update.length} values, "
                                 f"expected {expected_cts} at {slots} slots each")
        if self.length is not None and update.length != self.length:
            raise UpdateRejected(f"{who}: {update.length} encrypted values, expected {self.length}")
        vectors = []
        for i, chunk in enumerate(update.chunks):
            try:
                vec = ts.ckks_vector_from(self.context, chunk)
            except Exception as e:
                raise UpdateRejected(f"{who}: ciphertext {i} does not load under the server context: {e}") from e
            want = min(slots, update.length - i * slots)
            if vec.size() != want:
                raise UpdateRejected(f"{who}: ciphertext {i} holds {vec.size()} values, expected {want}")
            (ct,) = vec.ciphertext()
            if not math.isclose(ct.scale, self._scale, rel_tol=1e-9) or ct.coeff_modulus_size() != self._level:
                raise UpdateRejected(f"{who}: ciphertext {i} has scale 2^{math.log2(ct.scale):.2f} at "
                                     f"{ct.coeff_modulus_size()} primes, expected a fresh one (2^"
                                     f"{math.log2(self._scale):.2f} at {self._level} primes)")
            vectors.append(vec)
        if self.length is None:
            self.length, self.num_ciphertexts, self.mask_digest = update.length, update.num_ciphertexts, (
                self.mask_digest or update.mask_digest)
            self._totals = vectors
        else:
            for total, vec in zip(self._totals, vectors):
                total.add_(vec)
        self.client_ids.append(update.client_id)
        self.weights.append(update.weight)

    def check_scale(self, scale: float | None) -> None:
        """Refuse a server-side scalar that the parameters cannot apply (it needs a rescale level)."""
        if scale is not None and (not math.isfinite(scale) or _rescale_levels(self.context) < 1):
            raise ConfigError(
                "a server-side scale must be finite and needs a rescale level, i.e. at least 3 "
                "coeff_mod_bit_sizes (e.g. [60, 40, 60])"
            )

    def result(self, scale: float | None = None) -> EncryptedAggregate:
        """The encrypted sum (optionally times one plaintext scalar, which needs a rescale level)."""
        if self.length is None:
            raise ConfigError("no encrypted update was added to the sum")
        self.check_scale(scale)
        chunks = []
        for total in self._totals:
            if scale is not None:
                total = total.mul(float(scale))
            chunks.append(total.serialize())
        weight_sum = None if any(w is None for w in self.weights) else float(sum(self.weights))
        return EncryptedAggregate(chunks=tuple(chunks), length=self.length, mask_digest=self.mask_digest,
                                  num_clients=len(self.client_ids), scale=scale,
                                  client_ids=tuple(self.client_ids), weight_sum=weight_sum)


def aggregate_encrypted(
    server_ctx: bytes | ts.Context,
    encrypted_updates: Sequence[EncryptedUpdate],
    *,
    scale: float | None = None,
    expected_mask_digest: str | None = None,
) -> EncryptedAggregate:
    """Server side: slot-wise sum of the clients' ciphertexts, optionally times one plaintext scalar."""
    total = CiphertextSum(server_ctx, expected_mask_digest)
    if not encrypted_updates:
        raise ConfigError("aggregate_encrypted: no encrypted updates to aggregate")
    total.check_scale(scale)  # before the expensive part
    for update in encrypted_updates:
        total.add(update)
    return total.result(scale)


def check_min_clients(min_clients) -> int:
    """``secure_agg.min_clients`` as an int >= 1."""
    if isinstance(min_clients, bool) or not isinstance(min_clients, int) or min_clients < 1:
        raise ConfigError(f"secure_agg.min_clients must be an integer >= 1, got {min_clients!r}")
    return min_clients


def check_sum_size(agg: EncryptedAggregate, min_clients: int = MIN_CLIENTS) -> None:
    """Key holder: refuse (:class:`DecryptRefused`) a sum of fewer than ``min_clients`` ciphertexts or one that
    names a client twice; the count is the server's claim (see the module docstring for what that binds)."""
    check_min_clients(min_clients)
    ids = list(agg.client_ids)
    if ids and len(ids) != agg.num_clients:
        raise DecryptRefused(f"{REFUSED}: the aggregate claims to sum {agg.num_clients} clients but names {len(ids)}")
    named = [c for c in ids if c is not None]
    twice = sorted({c for c in named if named.count(c) > 1})
    if twice:
        raise DecryptRefused(f"{REFUSED}: the aggregate names client(s) {twice} more than once")
    if agg.num_clients < min_clients:
        raise DecryptRefused(f"{REFUSED} a sum of {agg.num_clients} client update(s), fewer than "
                             f"secure_agg.min_clients={min_clients} (a sum of one client is that client's update)")


def decrypt_aggregate(client_ctx: bytes | ts.Context, agg: EncryptedAggregate, mask: torch.Tensor,
                      min_clients: int = MIN_CLIENTS) -> torch.Tensor:
    """Key-holder side: decrypt the sum, divide by sum_k w_k and scatter onto the kept coordinates (0 elsewhere).

    A sum of fewer than ``min_clients`` clients (by the aggregate's count) is refused before anything is decrypted.
    """
    context = load_context(client_ctx)
    if not context.is_private():
        raise ConfigError(
            "decrypt_aggregate needs the secret-key (client) context; the server's public context cannot decrypt"
        )
    check_sum_size(agg, min_clients)
    _check_mask(mask, mask.numel(), "decrypt_aggregate")
    if mask_digest(mask) != agg.mask_digest:
        raise ConfigError("decrypt_aggregate: the mask differs from the one the aggregate was built with")
    mask_cpu = mask.detach().to("cpu")
    kept = int(mask_cpu.sum())
    if kept != agg.length:
        raise ConfigError(f"decrypt_aggregate: mask keeps {kept} coordinates but the aggregate holds {agg.length}")
    values = _decrypt_chunks(context, agg.chunks)
    if agg.weight_sum is not None:
        if agg.weight_sum <= 0:
            raise ConfigError(f"decrypt_aggregate: the clients' weights sum to {agg.weight_sum}, not > 0")
        values = values / agg.weight_sum
    delta = torch.zeros(mask_cpu.numel(), dtype=torch.float64)
    delta[mask_cpu] = torch.from_numpy(values)
    return delta.to(device=mask.device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# The parties of a run: clients (encrypt; one of them, or a designated party, decrypts) and the server.


class SecureAggClient:
    """Client party under HE: holds the secret-key context; encrypts its update; as key holder, decrypts.

    ``specs`` (the LoRA tensor layout, :attr:`fedsafe.fl.params.FlatLoRA.specs`) makes the pruning
    per tensor (A and B separately); the mask of round t is ``pruning_mask(global_vec, p_t, specs)`` with
    ``p_t = pruning_schedule(t, total_rounds, prune_start, prune_end)``, so all parties agree on it. As key
    holder it decrypts no sum of fewer than ``min_clients`` clients (``secure_agg.min_clients``).
    """

    def __init__(self, context: bytes, specs: Sequence[Any] | None, prune_start: float = 0.2,
                 prune_end: float = 0.5, total_rounds: int = 1, min_clients: int = MIN_CLIENTS):
        self.schedule = MaskSchedule(specs, prune_start, prune_end, total_rounds)
        self.min_clients = check_min_clients(min_clients)
        self.context = load_context(context)
        if not self.context.is_private():
            raise ConfigError("SecureAggClient needs KeyHolder.client_context_bytes() (with the secret key)")

    def ratio(self, round: int) -> float:
        """Pruning ratio of 1-based round ``round``."""
        return self.schedule.ratio(round)

    def mask(self, global_vec: torch.Tensor, round: int) -> torch.Tensor:
        """The round's shared keep-mask, derived from the global adapter."""
        return self.schedule.mask(global_vec, round)

    def encrypt_result(self, result: ClientResult, global_vec: torch.Tensor, rc: RoundConfig) -> ClientResult:
        """Replace the plaintext update of ``result`` by its encrypted wire form in ``extra["secure_agg"]``."""
        from fedsafe.fl.client import ClientResult

        metrics = {k: v for k, v in result.metrics.items() if k != "update_norm"}  # plaintext statistic
        extra = {k: v for k, v in result.extra.items() if k not in (WIRE_KEY, WIRE_ERROR_KEY)}
        t0 = time.perf_counter()
        try:
            if rc.total_samples <= 0:
                raise UpdateRejected("RoundConfig.total_samples is 0: the client cannot pre-weight its update "
                                     "(the engine must send the round's total sample count under HE)")
            weight = result.num_samples / rc.total_samples
            mask = self.mask(global_vec, rc.round)
            enc = encrypt_update(self.context, result.update, weight, mask, client_id=result.client_id)
        except UpdateRejected as e:
            extra[WIRE_ERROR_KEY] = str(e)
        else:
            extra[WIRE_KEY] = enc.to_wire()
            metrics.update({"he_bytes": enc.nbytes, "he_ciphertexts": enc.num_ciphertexts,
                            "he_encrypted_values": enc.length, "he_prune_ratio": self.ratio(rc.round),
                            "he_encrypt_seconds": time.perf_counter() - t0})
        empty = torch.zeros(0, dtype=result.update.dtype)
        return ClientResult(result.client_id, empty, result.num_samples, metrics, extra)

    def decrypt(self, aggregate: EncryptedAggregate | dict, global_vec: torch.Tensor, round: int) -> torch.Tensor:
        """Key holder: decrypt the server's sum into the round's delta (weighted FedAvg; 0 on pruned coordinates).

        Raises :class:`DecryptRefused` for a sum of fewer than ``min_clients`` clients.
        """
        if isinstance(aggregate, dict):
            aggregate = EncryptedAggregate.from_wire(aggregate)
        return decrypt_aggregate(self.context, aggregate, self.mask(global_vec, round), self.min_clients)


class SecureAggServer:
    """Server party under HE: public context only; sums the clients' ciphertexts; a key holder decrypts.

    ``decrypt(aggregate, global_vec, round) -> delta`` is the key holder's side of the exchange (in-process:
    :meth:`SecureAggClient.decrypt`; over a network: send ``aggregate.to_wire()`` to a key-holding client).
    With ``schedule`` (public: the LoRA layout and pruning schedule) the server derives the round's mask
    itself and drops any client that encrypted under another mask; without it, the first client's mask
    is taken as the round's and the key holder checks it when it decrypts.

    With fewer than ``min_clients`` kept ciphertexts nothing is decrypted: :meth:`aggregate` returns
    ``delta=None`` and ``stats["skipped"]`` (the reason), and the round leaves the global adapter unchanged;
    likewise when the key holder refuses (:class:`DecryptRefused`).
    """

    name = "secure_fedavg"

    def __init__(self, server_context: bytes,
                 decrypt: Callable[[EncryptedAggregate, torch.Tensor, int], torch.Tensor] | None,
                 params: CKKSParams | None = None, schedule: MaskSchedule | None = None,
                 min_clients: int = MIN_CLIENTS):
        self.server_context = server_context
        self.schedule = schedule
        self.min_clients = check_min_clients(min_clients)
        if load_context(server_context).is_private():  # also fails at setup, not in round 1, on bad bytes
            raise ConfigError("SecureAggServer must get KeyHolder.server_context_bytes(), not the secret-key context")
        self.decrypt = decrypt
        self.params = params

    def use_remote_key_holder(self, send: Callable[[EncryptedAggregate, torch.Tensor, int], torch.Tensor]) -> None:
        """Key holders on other machines: ``send(aggregate, mask, round) -> delta`` is given the round's mask.

        The mask is public (the global adapter, the LoRA layout and the schedule decide it), so sending it
        spares the key holder the model; there, :func:`decrypt_aggregate` checks it against the digest the
        clients encrypted under before it decrypts.
        """
        if self.schedule is None:
            raise ConfigError("a remote key holder needs the round's mask: build SecureAggServer with a schedule")
        schedule = self.schedule
        self.decrypt = lambda aggregate, global_vec, round: send(aggregate, schedule.mask(global_vec, round), round)

    def describe(self) -> str:
        """One line for the console: security level and context size."""
        level = self.params.security_label() if self.params is not None else "unknown security level"
        return (f"secure aggregation: CKKS {level}, server holds the public context only "
                f"({len(self.server_context):,} bytes)")

    def aggregate(self, results: list[ClientResult], global_vec: torch.Tensor,
                  round: int) -> tuple[torch.Tensor | None, dict]:
        """Sum the encrypted updates, have them decrypted; return (delta, round stats as Server.aggregate).

        ``delta`` is None when the round is refused (fewer than ``min_clients`` kept ciphertexts, or the key
        holder refused): then ``stats["skipped"]`` holds the reason, every client weight is 0, ``kept`` is
        empty and ``dropped`` still lists the clients whose ciphertexts were rejected.
        """
        t0 = time.perf_counter()
        expected = mask_digest(self.schedule.mask(global_vec, round)) if self.schedule is not None else None
        total = CiphertextSum(self.server_context, expected)
        dropped, kept = [], []
        for i, r in enumerate(results):
            try:
                if WIRE_KEY not in r.extra:
                    raise UpdateRejected(r.extra.get(WIRE_ERROR_KEY) or
                                         f"no encrypted update in ClientResult.extra[{WIRE_KEY!r}]")
                total.add(EncryptedUpdate.from_wire(r.extra[WIRE_KEY], r.client_id))
                kept.append(i)
            except UpdateRejected as e:
                dropped.append({"client_id": r.client_id, "reason": str(e)})
        weights_full = [0.0] * len(results)
        info: dict = {"secure_agg": True, "he_min_clients": self.min_clients}
        if len(kept) < self.min_clients:  # decrypt nothing: a sum of so few updates would reveal them
            return None, self._skipped(f"{len(kept)} of {len(results)} encrypted updates kept, fewer than "
                                       f"secure_agg.min_clients={self.min_clients}: nothing is decrypted", results,
                                       dropped, info)
        agg = total.result()
        aggregate_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if self.decrypt is None:
            raise ConfigError("SecureAggServer has no key holder to decrypt the sum (decrypt is unset)")
        try:
            delta = self.decrypt(agg, global_vec, round).to(global_vec.device, global_vec.dtype)
        except DecryptRefused as exc:  # the key holder's own minimum (e.g. a SuperNode's he-min-clients)
            return None, self._skipped(f"the key holder {exc}", results, dropped, info)
        weight_sum = agg.weight_sum or 1.0
        for j, i in enumerate(kept):
            weights_full[i] = float(total.weights[j] or 0.0) / weight_sum
        info.update({"he_kept_values": agg.length, "he_total_values": int(global_vec.numel()),
                     "he_ciphertexts_per_client": total.num_ciphertexts, "he_aggregate_bytes": agg.nbytes,
                     "he_aggregate_seconds": aggregate_s, "he_decrypt_seconds": time.perf_counter() - t1,
                     "he_mask_digest": agg.mask_digest, "he_weight_sum": agg.weight_sum})
        if self.params is not None:
            info["he_security"] = self.params.security_label()
        return delta, {"client_weights": weights_full, "dropped": dropped, "update_norm": float(delta.norm()),
                       "aggregator_info": info, "kept": kept}

    @staticmethod
    def _skipped(reason: str, results: list, dropped: list[dict], info: dict) -> dict:
        """Round stats of a refused round: no client weighted, the reason under ``skipped`` (the Server logs it)."""
        return {"client_weights": [0.0] * len(results), "dropped": dropped, "update_norm": 0.0,
                "aggregator_info": {**info, "skipped": reason}, "kept": [], "skipped": reason}


def client_party(trainer) -> SecureAggClient | None:
    """The CKKS client party inside a client-side trainer (:func:`fedsafe.plugins.client_trainer` with the
    secure_aggregation plug-in), or None when this run's clients do not encrypt."""
    plugin = trainer.plugin("secure_aggregation") if hasattr(type(trainer), "plugin") else None
    return getattr(plugin, "he_client", None)


class SecureAggregator:
    """Weighted FedAvg of pruned LoRA deltas under CKKS, on stacked updates (tests, benchmarks, notebooks).

    Paper: FedShield-LLM (Mia & Amini, 2025), with the fixes listed in the module docstring. Formula:
    delta = scatter_M(Dec(sum_k Enc(w_k * delta_k[M]))), w_k = n_k / sum n, M = pruning_mask(global, p_t),
    p_t = pruning_schedule(t, T, prune_start, prune_end). Hyperparameters: CKKS params, prune_start,
    prune_end, total_rounds, specs (per-tensor pruning; global ranking when None), min_clients (the smallest
    sum that is decrypted; fewer updates raise :class:`DecryptRefused`).

    It runs the same party code as a real run (:class:`SecureAggClient` encrypts each update,
    :class:`SecureAggServer` sums with the public context, the client party decrypts).
    """

    name = "secure_fedavg"

    def __init__(
        self,
        params: CKKSParams | None = None,
        prune_start: float = 0.2,
        prune_end: float = 0.5,
        total_rounds: int = 1,
        specs: Sequence[Any] | None = None,
        key_holder: KeyHolder | None = None,
        min_clients: int = MIN_CLIENTS,
    ):
        self.params = params or CKKSParams()
        if key_holder is not None and key_holder.params != self.params:
            raise ConfigError("SecureAggregator: key_holder was built with different CKKS parameters")
        self.key_holder = key_holder or KeyHolder(self.params)
        self.client = SecureAggClient(self.key_holder.client_context_bytes(), specs, prune_start, prune_end,
                                      total_rounds, min_clients)
        self.server = SecureAggServer(self.key_holder.server_context_bytes(), self.client.decrypt, self.params,
                                      MaskSchedule(specs, prune_start, prune_end, total_rounds), min_clients)

    def aggregate(
        self,
        global_vec: torch.Tensor,
        updates: torch.Tensor,
        num_samples: Sequence[float] | torch.Tensor,
        round: int,
        client_ids: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One round: returns the weighted-FedAvg delta (zeros on pruned coordinates) and cost/figure info."""
        from fedsafe.fl.client import ClientResult, RoundConfig

        if updates.ndim != 2 or global_vec.ndim != 1 or updates.shape[1] != global_vec.numel():
            raise UpdateRejected(f"updates must be [n_clients, {global_vec.numel()}], got {tuple(updates.shape)}")
        n = updates.shape[0]
        samples = [float(s) for s in torch.as_tensor(num_samples, dtype=torch.float64).reshape(-1).tolist()]
        if len(samples) != n:
            raise ConfigError(f"num_samples has {len(samples)} entries for {n} client updates")
        fedavg_weights(samples)  # validates
        ids = list(client_ids) if client_ids is not None else [f"client_{k:02d}" for k in range(n)]
        # the plain data a real round carries: total_samples lets each client pre-weight its update
        rc = RoundConfig(round=round, lr=0.0, local_steps=0, batch_size=1, total_samples=sum(samples))
        results = [self.client.encrypt_result(ClientResult(ids[k], updates[k], samples[k]), global_vec, rc)
                   for k in range(n)]
        delta, stats = self.server.aggregate(results, global_vec, round)
        if stats["dropped"]:
            raise UpdateRejected("; ".join(f"{d['client_id']}: {d['reason']}" for d in stats["dropped"]))
        if delta is None:
            raise DecryptRefused(f"{REFUSED}: {stats['skipped']}")
        info = dict(stats["aggregator_info"])
        info.update({"ratio": self.client.ratio(round), "client_weights": stats["client_weights"],
                     "bytes_per_client": [r.metrics["he_bytes"] for r in results],
                     "encrypt_seconds": [r.metrics["he_encrypt_seconds"] for r in results]})
        return delta, info


# ---------------------------------------------------------------------------------------------------
# FedShield-LLM's original scheme, kept only as the benchmark baseline. Its flaws are deliberate here:
# every client prunes its own update (masks differ), pruned entries are encrypted as zeros (no saving),
# each LoRA tensor is packed separately, and the server takes an unweighted mean.


def fedshield_encrypt(
    ctx: bytes | ts.Context, update: torch.Tensor, ratio: float, specs: Sequence[Any] | None = None
) -> EncryptedUpdate:
    """Flawed baseline (benchmarks only): own-mask pruning, then all d coordinates encrypted, zeros included."""
    import tenseal as ts

    context = load_context(ctx)
    local_mask = pruning_mask(update, ratio, specs)
    values = (update.detach().to("cpu", torch.float64) * local_mask).numpy()
    segments = [(0, values.size)] if specs is None else sorted((int(s.offset), int(s.numel)) for s in specs)
    slots = _slot_count(context)
    chunks = []
    for offset, numel in segments:  # one tensor at a time, as the paper's code encrypts per state-dict entry
        for start in range(offset, offset + numel, slots):
            chunks.append(ts.ckks_vector(context, values[start: min(start + slots, offset + numel)]).serialize())
    return EncryptedUpdate(chunks=tuple(chunks), length=int(values.size), mask_digest="dense")


class FedShieldSum:
    """Flawed baseline (benchmarks only): streaming unweighted mean, sum_k c_k * (1/n), per-tensor ciphertexts."""

    def __init__(self, server_ctx: bytes | ts.Context):
        self.context = load_context(server_ctx)
        self._totals: list | None = None
        self.length = 0
        self.num_clients = 0

    def add(self, update: EncryptedUpdate) -> None:
        """Add one client's ciphertexts (no checks, as in the paper's code)."""
        import tenseal as ts

        vectors = [ts.ckks_vector_from(self.context, c) for c in update.chunks]
        if self._totals is None:
            self._totals, self.length = vectors, update.length
        else:
            for total, vec in zip(self._totals, vectors):
                total.add_(vec)
        self.num_clients += 1

    def result(self) -> EncryptedAggregate:
        """The encrypted unweighted mean."""
        scale = 1.0 / self.num_clients
        chunks = tuple(t.mul(scale).serialize() for t in self._totals or [])
        return EncryptedAggregate(chunks=chunks, length=self.length, mask_digest="dense",
                                  num_clients=self.num_clients, scale=scale)


def fedshield_aggregate(
    server_ctx: bytes | ts.Context, encrypted_updates: Sequence[EncryptedUpdate]
) -> EncryptedAggregate:
    """Flawed baseline (benchmarks only): unweighted mean, sum_k c_k * (1/n), over per-tensor ciphertexts."""
    total = FedShieldSum(server_ctx)
    for update in encrypted_updates:
        total.add(update)
    return total.result()


def fedshield_decrypt(client_ctx: bytes | ts.Context, agg: EncryptedAggregate) -> torch.Tensor:
    """Flawed baseline (benchmarks only): decrypt the dense mean."""
    values = _decrypt_chunks(load_context(client_ctx), agg.chunks)
    if values.size != agg.length:
        raise ConfigError(f"fedshield_decrypt: decrypted {values.size} values, expected {agg.length}")
    return torch.from_numpy(values).float()


# ---------------------------------------------------------------------------------------------------


def _check_mask(mask: torch.Tensor, d: int, who: str) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.ndim != 1 or mask.numel() != d:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ConfigError(f"{who}: mask must be a 1-D bool tensor of length {d}, got {shape}")


def _decrypt_chunks(context: ts.Context, chunks: Sequence[bytes]) -> np.ndarray:
    import tenseal as ts

    parts = [np.asarray(ts.ckks_vector_from(context, c).decrypt(), dtype=np.float64) for c in chunks]
    return np.concatenate(parts) if parts else np.zeros(0)


def _rescale_levels(context: ts.Context) -> int:
    # Rescales left for a fresh ciphertext: the number of data primes minus one.
    return context.seal_context().data.first_context_data().chain_index()


def _slot_count(context: ts.Context) -> int:
    return context.seal_context().data.key_context_data().parms().poly_modulus_degree() // 2


def _max_abs_value(context: ts.Context) -> float:
    # The last level of the modulus chain is the first prime q0 alone (same bound as CKKSParams.max_abs_value).
    first_prime_bits = context.seal_context().data.last_context_data().total_coeff_modulus_bit_count()
    return 2.0 ** (first_prime_bits - math.log2(context.global_scale) - 2)
