"""Differential privacy as a plug-in: client-level DP-FedAvg at the server and/or local DP-SGD at each client.

- client level (McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018): the
  rule becomes DP-FedAvg (hook ``server_view``: clip every update, noise the sum) and a per-round accountant
  logs (epsilon, delta) (hook ``round_end``);
- local DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016): the client's trainer becomes
  Opacus-style per-sample clipping and noise on Poisson-sampled batches (hook ``local_training``).

The mechanisms and accountants live in :mod:`fedsafe.defenses.differential_privacy.mechanism`.
"""

from __future__ import annotations

from fedsafe.defenses.differential_privacy.config import DPConfig
from fedsafe.errors import ConfigError
from fedsafe.plugins import Plugin, register


@register
class DifferentialPrivacy(Plugin):
    """Client-level DP-FedAvg and/or local DP-SGD, with their accountants."""

    name = "differential_privacy"
    kind = "defense"
    section = "dp"
    Config = DPConfig
    order = 20  # after the constrained-update loss terms, which the DP-SGD trainer keeps

    @classmethod
    def is_active(cls, config, setup) -> bool:
        return config.client_level or config.local

    @classmethod
    def check(cls, config, setup) -> None:
        if config.client_level and setup.fl.lora_aggregation == "fedex":
            raise ConfigError("fl.lora_aggregation=fedex cannot be combined with dp.client_level=true: the residual "
                              "is computed from the clients' unclipped, un-noised factors, which the client-level "
                              "epsilon does not cover (use ffa or rolora)")
        if config.client_level and setup.fl.algorithm == "scaffold":
            raise ConfigError("dp.client_level=true cannot be combined with fl.algorithm=scaffold: the server's "
                              "control variate c is built from each client's raw, unclipped delta_c, which the "
                              "client-level epsilon does not cover; use another fl.algorithm or turn "
                              "dp.client_level off")
        if config.client_level and setup.aggregator.name != "fedavg":
            raise ConfigError(f"dp.client_level=true needs aggregator.name=fedavg (the noise is calibrated to the "
                              f"clipped mean), got aggregator.name={setup.aggregator.name!r}")

    @classmethod
    def declares(cls, config) -> set[str]:
        return {"server_clipping"} if config.client_level else set()

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.accountant = None
        if config.client_level and ctx.run_dir is not None:  # the server side of a run
            from fedsafe.defenses.differential_privacy.mechanism import ClientDPAccountant

            self.accountant = ClientDPAccountant(config, ctx.num_clients, ctx.clients_per_round)

    def local_training(self, trainer):
        if not self.config.local:
            return trainer
        from fedsafe.defenses.differential_privacy.mechanism import DPLocalTrainer

        c = self.config
        return DPLocalTrainer(trainer.model, trainer.tokenizer, c.local_clip_norm, c.local_noise_multiplier,
                              c.delta, c.accountant, trainer.loss_terms, secure_noise=c.secure_noise)

    def server_view(self, aggregator):
        if not self.config.client_level:
            return aggregator
        from fedsafe.defenses.differential_privacy.mechanism import wrap_aggregator

        return wrap_aggregator(self.config, aggregator, self.ctx.aggregator.name, self.ctx.seed)

    def round_end(self, round_no: int, record: dict, global_vec) -> None:
        if self.accountant is None:
            return
        dp_record = self.accountant.record(round_no)
        self.ctx.log(dp_record)
        self.ctx.print(f"  client-level DP: epsilon {dp_record['epsilon']:.3f} at delta {dp_record['delta']:.2e}")
