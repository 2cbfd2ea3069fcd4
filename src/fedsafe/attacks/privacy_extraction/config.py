"""The ``privacy`` section of the privacy-extraction attack (canaries, extraction, membership inference); light:
a config validates without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fedsafe.schema import DataSource, Strict


class CanaryConfig(Strict):
    """Random secrets inserted into victims' data (Carlini et al., "The Secret Sharer", USENIX Security 2019)."""

    n: int = Field(4, ge=1, description="number of distinct canaries")
    repeats: int = Field(5, ge=1, description="copies of each canary in its victim's data")
    digits: int = Field(6, ge=1, le=18, description="random digits of each secret (|R| = 10^digits)")
    instruction: str = Field("What is the account number of {name}?",
                             description="canary instruction; {name} is a seeded made-up name")
    template: str = Field("The account number of {name} is {secret}.",
                          description="canary response; must contain {secret} (and may contain {name})")
    n_candidates: int = Field(1000, ge=10, description="random candidate secrets for the exposure rank")
    n_samples: int = Field(8, ge=0, description="sampled completions per canary for the extraction rate "
                                                "(plus one greedy)")

    @field_validator("template")
    @classmethod
    def _has_secret(cls, v: str) -> str:
        if "{secret}" not in v:
            raise ValueError("must contain the placeholder {secret}")
        return v


class PrivacyConfig(Strict):
    """Training-data extraction attacks by a participating client on the global model.

    Guo et al., "Can Federated Learning Safeguard Private Data in LLM Training?" (Findings of EMNLP 2025):
    zero-input generation, partial-input completion, multi-round tracking, loss-based membership inference.
    """

    enabled: bool = Field(False, description="run the attacks on the final global model (and every k rounds)")
    every: int = Field(0, ge=0, description="also attack every k rounds during training (0: only at the end)")
    victim_roles: list[str] | None = Field(None, description="roles whose data the attacker targets "
                                                             "(default: every non-malicious role)")
    variants: list[Literal["plain", "logit_contrast", "param_contrast"]] = Field(
        default_factory=lambda: ["plain", "logit_contrast", "param_contrast"],
        description="plain: theta_t; logit_contrast: z_t + alpha (z_t - z_{t-k}); "
                    "param_contrast: theta_t + alpha (theta_t - theta_{t-k})")
    k: int = Field(1, ge=1, description="multi-round tracking: compare round t with round t-k (round 0 = init)")
    alpha: float = Field(1.0, ge=0, description="multi-round tracking: contrast strength")
    n_zero_input: int = Field(64, ge=0, description="zero-input generations from BOS (0: skip)")
    max_new_tokens: int = Field(64, ge=1, description="zero-input generation length")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling threshold")
    prefix_fractions: list[float] = Field(default_factory=lambda: [0.3, 0.8],
                                          description="partial-input completion: prefix shares (the paper: 30%, 80%)")
    n_partial: int = Field(32, ge=0, description="victim samples completed per prefix share (0: skip)")
    partial_greedy: bool = Field(True, description="complete prefixes greedily (else sample)")
    n_mia: int = Field(64, ge=0, description="members and non-members for membership inference (0: skip); "
                                             "members are drawn from the victim examples trained on by then")
    nonmembers: list[DataSource] | None = Field(None, description="non-member data for membership inference "
                                                                  "(default: data.heldout)")
    canaries: CanaryConfig | None = Field(None, description="insert random secrets into victims' data")
    candidates: int = Field(8, ge=1, description="leakage: training texts scored per generation after the "
                                                 "n-gram prefilter (the best-match ROUGE-L is then a lower "
                                                 "bound: a best match sharing no trigram or rare word is missed)")
    exhaustive: bool = Field(False, description="leakage: score every generation against every training text "
                                                "(exact best-match ROUGE-L, |gen| x |train| LCS computations) "
                                                "instead of the n-gram prefilter's candidates")
    bertscore_model: str | None = Field(None, description="local encoder for optional BERTScore of the "
                                                          "best matches")
    batch_size: int = Field(16, ge=1, description="generation / scoring batch size")
    seed: int | None = Field(None, description="attack sampling seed (default: seed)")
