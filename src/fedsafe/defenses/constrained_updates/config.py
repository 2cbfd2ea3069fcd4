"""The ``constrained`` section: the constrained-update loss terms' weights (light)."""

from __future__ import annotations

from pydantic import Field

from fedsafe.schema import Strict


class ConstrainedConfig(Strict):
    """Regularisation-constrained local updates (a privacy defense in Guo et al. 2025)."""

    l2_mu: float = Field(0.0, ge=0, description="coefficient of mu/2 ||theta - theta_global||^2 on the LoRA "
                                                "parameters (0: off)")
    kl_beta: float = Field(0.0, ge=0, description="coefficient of KL(p_global || p_local) on the client's "
                                                  "response tokens (0: off; one extra forward per batch)")
    kl_temperature: float = Field(1.0, gt=0, description="softmax temperature of both distributions in the KL")
