"""The ``server_view`` section of the honest-but-curious server attack (light: a config validates without torch)."""

from __future__ import annotations

from pydantic import Field

from fedsafe.schema import DataSource, Strict


class ServerViewConfig(Strict):
    """The honest-but-curious server's attacks on the updates it sees (membership inference, reconstruction)."""

    enabled: bool = Field(False, description="attack what the server sees of each round's updates")
    every: int = Field(1, ge=1, description="attack every k-th round")
    max_clients: int = Field(2, ge=1, description="individual updates attacked per round (the first sampled)")
    mia: bool = Field(True, description="update-level membership inference (AUC members vs non-members)")
    n_nonmembers: int = Field(32, ge=1, description="held-out non-member texts for the membership AUC")
    nonmembers: list[DataSource] | None = Field(None, description="non-member data (default: data.heldout)")
    reconstruction: bool = Field(True, description="DAGER-style token / sequence reconstruction from LoRA A "
                                                   "factors (needs fl.local_steps=1 and fl.optimizer=sgd to work)")
    sequences: bool = Field(True, description="also search sequences (DAGER's layer-2 check, else LM-ordered)")
    tau: float | None = Field(None, gt=0, lt=1, description="span check: relative residual below which an input is "
                                                            "in the span of the update's A rows (None: tau_rel x "
                                                            "the vocabulary's median residual)")
    tau_rel: float = Field(0.5, gt=0, lt=1, description="adaptive token threshold, as a share of the median residual")
    seq_tau_rel: float = Field(0.1, gt=0, lt=1, description="adaptive threshold of the sequence search (layer 1)")
    rank_tol: float = Field(1e-6, gt=0, lt=1, description="singular values above rank_tol * the largest span "
                                                          "the A rows")
    max_len: int | None = Field(None, ge=2, description="longest sequence searched (default: data.max_length)")
    max_sequences: int = Field(4, ge=1, description="LM-ordered reconstructions per view (when DAGER's sequence "
                                                    "search cannot run)")
    max_beams: int = Field(32, ge=1, description="partial sequences kept per step of the sequence search")
    dp_view: bool = Field(True, description="with client-level DP, also attack each update clipped and noised "
                                            "on its own")
    batch_size: int = Field(16, ge=1, description="scoring batch size")
    save_updates: bool = Field(False, description="save each attacked round's views under server_view/ in the run "
                                                  "directory (ServerViewAttack.attack_saved re-runs the attacks)")
