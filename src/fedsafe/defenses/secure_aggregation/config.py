"""The ``secure_agg`` section of secure aggregation (CKKS); light: a config validates without torch."""

from __future__ import annotations

from pydantic import Field

from fedsafe.defenses.secure_aggregation.params import CKKSParams
from fedsafe.schema import Strict


class SecureAggConfig(Strict):
    """CKKS secure aggregation with shared-mask LoRA pruning (FedShield-LLM, fixed); see fedsafe.defenses.secure_aggregation.protocol."""

    enabled: bool = Field(False, description="clients encrypt their weighted updates; the server sums ciphertexts "
                                             "with the public context only; a key holder decrypts")
    ckks: CKKSParams = Field(default_factory=CKKSParams, description="CKKS parameters (N, moduli, scale); the "
                                                                     "security level is reported at start")
    prune_start: float = Field(0.2, ge=0, lt=1, description="pruning ratio in round 1 (magnitude of the global "
                                                            "adapter, per LoRA tensor; 0 encrypts every value)")
    prune_end: float = Field(0.5, ge=0, lt=1, description="pruning ratio in the last round (linear in between)")
    min_clients: int = Field(2, ge=1, description="never decrypt a sum of fewer clients' updates (a sum of one is "
                                                  "that client's update): a round with fewer kept ciphertexts "
                                                  "leaves the global adapter unchanged; key holders refuse such "
                                                  "a sum too. 1 turns the protection off")
