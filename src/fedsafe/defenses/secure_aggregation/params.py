"""CKKS parameters, their security level, and which training rules compose with secure aggregation.

Kept free of torch and tenseal so that :mod:`fedsafe.config` can import it: the ``secure_agg`` config
section validates its CKKS parameters and refuses incompatible rules when the config is built, with
errors that name the field. The HE machinery itself is :mod:`fedsafe.defenses.secure_aggregation.protocol`.

Security levels follow the HomomorphicEncryption.org standard (Albrecht, Chase, Chen, Ding, Goldwasser,
Gorbunov, Halevi, Hoffstein, Laine, Lauter, Lokam, Micciancio, Moody, Morrison, Sahai, Vaikuntanathan,
"Homomorphic Encryption Security Standard", 2018), Table 1: ternary (uniform {-1, 0, 1}) secrets,
classical attacks, the largest total log2(q) for each ring degree N and security level.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedsafe.errors import ConfigError

__all__ = [
    "CKKSParams",
    "HE_STANDARD_MAX_LOG_Q",
    "HE_COMPATIBLE_AGGREGATORS",
    "HE_COMPATIBLE_ALGORITHMS",
    "he_security_level",
    "check_compatible",
]

# N -> {security bits: max total log2 q}. SEAL enforces the 128-bit column by default.
HE_STANDARD_MAX_LOG_Q: dict[int, dict[int, int]] = {
    1024: {128: 27, 192: 19, 256: 14},
    2048: {128: 54, 192: 37, 256: 29},
    4096: {128: 109, 192: 75, 256: 58},
    8192: {128: 218, 192: 152, 256: 118},
    16384: {128: 438, 192: 305, 256: 237},
    32768: {128: 881, 192: 611, 256: 476},
}

# The server only ever computes sum_k Enc(w_k * delta_k): FedAvg is the one rule that is that sum.
MIN_CLIENTS = 2  # default secure_agg.min_clients: a sum of one client's ciphertexts is that client's update
HE_COMPATIBLE_AGGREGATORS = frozenset({"fedavg"})
# fl.algorithm values whose server step is global += server_lr * aggregate (linear, stateless).
HE_COMPATIBLE_ALGORITHMS = frozenset({"fedavg", "fedprox"})


def he_security_level(poly_modulus_degree: int, total_coeff_bits: int) -> int | None:
    """Classical security (256/192/128 bits) of ring degree N with total log q, or None if below 128."""
    if poly_modulus_degree not in HE_STANDARD_MAX_LOG_Q:
        raise ConfigError(
            f"poly_modulus_degree={poly_modulus_degree} is not in the HE standard table "
            f"({sorted(HE_STANDARD_MAX_LOG_Q)})"
        )
    bounds = HE_STANDARD_MAX_LOG_Q[poly_modulus_degree]
    for level in (256, 192, 128):
        if total_coeff_bits <= bounds[level]:
            return level
    return None


class CKKSParams(BaseModel):
    """CKKS encryption parameters (TenSEAL/SEAL); validated once, with errors that name the field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    poly_modulus_degree: int = Field(
        8192, description="Ring degree N (power of two, 1024..32768); a ciphertext packs N/2 values."
    )
    coeff_mod_bit_sizes: tuple[int, ...] = Field(
        (60, 40, 60),
        description="Bit sizes of the coefficient-modulus primes; the last one is SEAL's special prime. "
        "The total must stay within the HE-standard bound for N (218 bits at N=8192 for 128-bit security).",
    )
    global_scale: float = Field(
        2.0**40, description="CKKS encoding scale; its log2 sets the fixed-point precision (2^40: ~1e-8 error)."
    )
    encryption: Literal["asymmetric", "symmetric"] = Field(
        "asymmetric",
        description="'asymmetric' encrypts with the public key; 'symmetric' with the secret key (about 2x "
        "faster, same ciphertext size, and the server context then carries no public key).",
    )

    @model_validator(mode="after")
    def _check(self) -> CKKSParams:
        n = self.poly_modulus_degree
        if n not in HE_STANDARD_MAX_LOG_Q:
            raise ValueError(f"poly_modulus_degree must be one of {sorted(HE_STANDARD_MAX_LOG_Q)}, got {n}")
        bits = self.coeff_mod_bit_sizes
        if len(bits) < 2:
            raise ValueError(
                f"coeff_mod_bit_sizes needs at least 2 primes (data primes plus the special prime), got {list(bits)}"
            )
        # SEAL needs primes = 1 mod 2N (so more than log2(2N) bits) and at most 60 bits each.
        min_bits = int(math.log2(2 * n)) + 2
        for i, b in enumerate(bits):
            if not min_bits <= b <= 60:
                raise ValueError(
                    f"coeff_mod_bit_sizes[{i}]={b} must be between {min_bits} and 60 bits at poly_modulus_degree={n}"
                )
        total = sum(bits)
        limit = HE_STANDARD_MAX_LOG_Q[n][128]
        if total > limit:
            raise ValueError(
                f"coeff_mod_bit_sizes total {total} bits exceeds {limit}, the 128-bit security bound at "
                f"poly_modulus_degree={n} (HE standard); use fewer/smaller primes or a larger N"
            )
        if not (math.isfinite(self.global_scale) and self.global_scale > 1.0):
            raise ValueError(f"global_scale must be a finite number > 1, got {self.global_scale}")
        if self.scale_bits >= bits[0]:
            raise ValueError(
                f"global_scale=2^{self.scale_bits:.1f} leaves no room for the integer part: it must be smaller "
                f"than the first coefficient prime (coeff_mod_bit_sizes[0]={bits[0]} bits)"
            )
        return self

    @property
    def slot_count(self) -> int:
        """Values packed into one ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def total_coeff_bits(self) -> int:
        """Total bits of the coefficient modulus q (special prime included, as the HE standard counts it)."""
        return sum(self.coeff_mod_bit_sizes)

    @property
    def scale_bits(self) -> float:
        """log2 of the encoding scale."""
        return math.log2(self.global_scale)

    @property
    def max_abs_value(self) -> float:
        """Largest |value| a client may encrypt so that the weighted sum still decodes after one rescale."""
        # After a rescale only the first prime q0 is left; |sum| * scale must stay below q0 / 2.
        return 2.0 ** (self.coeff_mod_bit_sizes[0] - self.scale_bits - 2)

    def security_level(self) -> int | None:
        """Classical security bits (256/192/128) per the HE standard, or None when below 128."""
        return he_security_level(self.poly_modulus_degree, self.total_coeff_bits)

    def security_label(self) -> str:
        """Human-readable security level, e.g. '128-bit (N=8192, log q=160)'."""
        level = self.security_level()
        where = f"N={self.poly_modulus_degree}, log q={self.total_coeff_bits}"
        return f"{level}-bit ({where})" if level else f"below 128-bit, insecure ({where})"


def check_compatible(
    aggregator: str,
    algorithm: str | None = "fedavg",
    *,
    max_update_norm: float | None = None,
    probing: bool = False,
    server_clipping: bool = False,
) -> None:
    """Raise ConfigError if a rule needs individual plaintext updates or a non-linear server step under HE.

    What composes: FedAvg, FedProx (a client-side proximal term), DP noise added by clients before they
    encrypt, client-side clipping, a plain server learning rate, and the post-hoc defense after decryption.
    What is refused: robust aggregators and the Safe-FedLLM probe (they rank, compare or classify individual
    updates), server-side norm checks (``aggregator.max_update_norm``), server-side DP-FedAvg clipping
    (``dp.client_level``), local-model probing, SCAFFOLD (its
    per-client control variates travel in plaintext and reveal the update), and server optimisers other
    than plain FedAvg: FedAdam/FedYogi/FedAdagrad are non-linear, and FedAvgM, linear as it is, keeps a
    momentum of past plaintext aggregates that would move coordinates pruned this round. See
    :mod:`fedsafe.defenses.secure_aggregation.protocol` for the reasoning.
    """
    name = (aggregator or "").strip().lower()
    if name not in HE_COMPATIBLE_AGGREGATORS:
        raise ConfigError(
            f"aggregator.name={aggregator!r} cannot run under secure aggregation (secure_agg.enabled=true): it "
            f"needs each client's plaintext update, and the server only sees their encrypted sum. Compatible: "
            f"{sorted(HE_COMPATIBLE_AGGREGATORS)}; or turn secure aggregation off"
        )
    if max_update_norm is not None:
        raise ConfigError(
            f"aggregator.max_update_norm={max_update_norm} cannot run under secure aggregation: the server cannot "
            "measure the norm of an encrypted update. Clip on the clients instead (e.g. DP clipping) and set "
            "aggregator.max_update_norm=null"
        )
    if server_clipping:
        raise ConfigError(
            "dp.client_level=true cannot run under secure aggregation: DP-FedAvg clips each client update at the "
            "server, which cannot measure the norm of an encrypted update. Use local DP (dp.local=true, noise "
            "added by each client before it encrypts) or turn secure_agg off"
        )
    if probing:
        raise ConfigError(
            "local-model probing cannot run under secure aggregation: it evaluates each client's local model, "
            "which the server never sees; disable probing or secure_agg"
        )
    algo = "fedavg" if algorithm is None else algorithm.strip().lower()
    if algo not in HE_COMPATIBLE_ALGORITHMS:
        why = ("its per-client control variates would travel in plaintext and reveal each update"
               if algo == "scaffold" else
               "only a linear, stateless server step (global += server_lr * aggregate) keeps pruned coordinates "
               "at their global value and needs no optimiser state built from plaintext aggregates")
        raise ConfigError(
            f"fl.algorithm={algorithm!r} cannot run under secure aggregation: {why}. Compatible: "
            f"{sorted(HE_COMPATIBLE_ALGORITHMS)}"
        )
