"""The ``probe`` section of the Safe-FedLLM probe (Tao et al., ACL 2026): light, a config validates without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedsafe.schema import DataSource, Strict


class ProbeFeaturesConfig(Strict):
    """Which part of a LoRA update the probe reads (Safe-FedLLM: LoRA B of the first layer, L2-normalised)."""

    layers: Literal["first", "all"] | list[int] = Field(
        "first", description="transformer layers: 'first' (lowest index), 'all', or a list of indices")
    kind: Literal["A", "B", "both"] = Field("B", description="LoRA factor(s) to read")
    project_dim: int | None = Field(None, ge=1, description="seeded Gaussian random projection to this "
                                                            "dimension (None: no projection)")
    normalize: bool = Field(True, description="L2-normalise each feature vector")


class ProbeConfig(Strict):
    """Safe-FedLLM probe (Tao et al., ACL 2026) trained on the server's own shadow clients (no oracle).

    Used when ``aggregator.name`` is ``probe`` or ``probe+<rule>``; see fedsafe.aggregators.probe.
    """

    benign: list[DataSource] | None = Field(None, description="benign shadow data (normal + aligned rows) "
                                                              "held by the server")
    malicious: list[DataSource] | None = Field(None, description="malicious shadow data (unaligned rows: "
                                                                 "generated or a public dataset)")
    benign_shadows: int = Field(4, ge=1, description="benign shadow clients per refit")
    malicious_shadows: int = Field(4, ge=1, description="malicious shadow clients per refit")
    samples_per_shadow: int = Field(32, ge=1, description="examples drawn (seeded) for each shadow client")
    steps: int | None = Field(None, ge=1, description="local steps of a shadow client (default: fl.local_steps)")
    refit_every: int = Field(1, ge=0, description="re-run shadows and refit every k rounds (0: fit once, "
                                                  "in round 1; a late attacker may then be missed)")
    history: int = Field(1, ge=1, description="fit on the shadow batches of the last this-many refits")
    features: ProbeFeaturesConfig = Field(default_factory=ProbeFeaturesConfig)
    C: float = Field(100.0, gt=0, description="inverse L2 regularisation of the logistic regression (features "
                                              "are unit-norm, so a weak penalty lets p reach the threshold)")
    mode: Literal["exclude", "probability", "trust"] = Field(
        "exclude", description="exclude: weight 0 if p >= threshold; probability: weight 1-p; trust: "
                               "Beta trust score over rounds with decay")
    threshold: float = Field(0.8, gt=0, le=1, description="probability at which a client is flagged")
    decay: float = Field(0.9, ge=0, le=1, description="trust mode: forgetting factor of past evidence")
    min_weight: float = Field(0.0, ge=0, le=1, description="soft modes: clients below this weight are excluded")
    skip_below: float = Field(0.0, ge=0, le=1, description="skip the round (no update) when the mean client "
                                                           "weight falls below this")
    level: Literal["client", "step"] = Field(
        "client", description="client: the final update; step: clients also report every local step's "
                              "update features (trusts the client's report)")
    seed: int | None = Field(None, ge=0, lt=2 ** 32, description="shadow sampling/training and projection seed "
                                                          "(default: seed)")
    # issue 19: decision rules without oracle labels and shadow realism (fedsafe.aggregators.probe_decision)
    decision: Literal["fixed", "fpr", "mad", "gap", "calibrated"] = Field(
        "fixed", description="fixed: p >= threshold (Safe-FedLLM); fpr: conformal threshold on held-out benign "
                             "shadow logits at rate fpr; mad: within-round median/MAD z-score >= z; gap: "
                             "within-round two-group split, gap/range >= min_gap; calibrated: Platt/isotonic "
                             "calibration on held-out shadows, then threshold")
    fpr: float = Field(0.05, gt=0, lt=1, description="decision=fpr: target benign false-positive rate")
    z: float = Field(3.5, gt=0, description="decision=mad: modified z-score at which a client is flagged")
    min_gap: float = Field(0.6, gt=0, le=1, description="decision=gap: least gap/range of the split (0.6: ~3% "
                                                        "of benign clients flagged at 5 Gaussian scores)")
    calibration: Literal["platt", "isotonic"] = Field("platt", description="decision=calibrated: the map")
    holdout: float | None = Field(None, ge=0, lt=1, description="share of each class's shadows kept out of the "
                                                                "fit to set the threshold (default: 0.5 for fpr "
                                                                "and calibrated, else 0)")
    match_clients: bool = Field(False, description="shadows train like the round's clients: fl.local_steps, lr, "
                                                   "batch and data.samples_per_client (overrides steps, "
                                                   "samples_per_shadow)")
    malicious_per_source: bool = Field(False, description="each malicious shadow trains on one malicious source "
                                                          "(round robin) instead of the pooled rows")
    log_decisions: bool = Field(True, description="log which clients every other decision rule would flag")


def uses_probe(aggregator_name: str) -> bool:
    """Whether a rule name selects the probe (``probe`` or ``probe+<rule>``)."""
    return aggregator_name == "probe" or aggregator_name.startswith("probe+")
