"""The ``dp`` section: client-level DP-FedAvg and local DP-SGD (light: a config validates without torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedsafe.schema import Strict


class DPConfig(Strict):
    """Differential privacy: client-level DP-FedAvg at the server and/or local DP-SGD at each client."""

    client_level: bool = Field(False, description="DP-FedAvg (McMahan et al., ICLR 2018): clip each client "
                                                  "update to clip_norm, add N(0, (noise_multiplier*clip_norm)^2) "
                                                  "to the sum")
    clip_norm: float = Field(1.0, gt=0, description="client-level: L2 bound C of each client update")
    noise_multiplier: float = Field(1.0, ge=0, description="client-level: sigma (noise std = sigma * C)")
    local: bool = Field(False, description="local DP-SGD (Abadi et al., CCS 2016) on the LoRA parameters "
                                           "via Opacus per-sample gradients, on Poisson-sampled batches (each "
                                           "example with probability batch_size*grad_accum / client samples)")
    local_clip_norm: float = Field(1.0, gt=0, description="local DP-SGD: per-sample gradient bound")
    local_noise_multiplier: float = Field(1.0, ge=0, description="local DP-SGD: sigma (noise std = sigma * "
                                                                 "local_clip_norm on the batch's gradient sum)")
    delta: float = Field(1e-5, gt=0, lt=1, description="target delta of every (epsilon, delta) fedsafe reports "
                                                        "(client-level and local); keep it well below 1/N (N: "
                                                        "clients, or a client's samples for local DP)")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="dp-accounting RDP or PLD (PRV-style) accountant")
    sampling: Literal["auto", "poisson", "without_replacement"] = Field(
        "auto", description="client-level sampling model for the accountant; auto: without_replacement (what "
                            "fedsafe does; replace-one neighbours, sensitivity 2*clip_norm) with rdp, poisson "
                            "(add/remove-one, sensitivity clip_norm; an approximation of fedsafe's fixed-size "
                            "sampling) with pld")
    secure_noise: bool = Field(False, description="draw DP noise (and local DP-SGD's Poisson batches) from the OS's "
                                                  "randomness instead of the experiment seed: needed in a real "
                                                  "deployment, where the seed in config.yaml is public (seeded noise "
                                                  "can be regenerated and subtracted); runs are then not "
                                                  "reproducible")
