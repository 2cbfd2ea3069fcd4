"""CKKS secure aggregation with shared-mask LoRA pruning as a plug-in (FedShield-LLM, fixed).

Mian et al., "FedShield-LLM: A Secure and Scalable Federated Fine-Tuned Large Language Model" (2025): clients
encrypt their (pruned, pre-weighted) LoRA updates with CKKS; the server sums ciphertexts with the public
context only; a key holder decrypts the sum. Hooks: ``local_training`` sets up this party's keys (fresh keys in
one process; a node's own key file in a Flower ClientApp), ``client_update`` encrypts each result before it is
sent, ``aggregate`` gives the server the ciphertext sum and the key holder. Everything else lives in
:mod:`fedsafe.defenses.secure_aggregation.protocol`.
"""

from __future__ import annotations

from fedsafe.defenses.secure_aggregation.config import SecureAggConfig
from fedsafe.errors import ConfigError
from fedsafe.plugins import CHECKS_ROUND_SIZE, ENCRYPTED_UPDATES, DeploymentKeys, Plugin, declared, register


@register
class SecureAggregation(Plugin):
    """Clients encrypt, the server sums ciphertexts, a key holder decrypts the sum only."""

    name = "secure_aggregation"
    kind = "defense"
    section = "secure_agg"
    Config = SecureAggConfig
    order = 90  # encrypts last: after every other client_update hook (a model-poisoning attack comes first)

    @classmethod
    def declares(cls, config) -> set[str]:
        """The server sees sums only; FedAvg is the one rule, with min_clients as the round-size need."""
        return {ENCRYPTED_UPDATES, CHECKS_ROUND_SIZE}

    @classmethod
    def deployment_keys(cls, config) -> DeploymentKeys:
        """A Flower deployment's CKKS key set (``fedsafe flower keys``): SuperNodes hold the secret key, the ServerApp
        the public one; a key holder decrypts no sum of fewer than ``min_clients`` clients. Its key ring
        (:mod:`fedsafe.defenses.secure_aggregation.deployment`) reads, writes and decrypts for the engine."""
        from fedsafe.defenses.secure_aggregation.deployment import KEYRING

        return DeploymentKeys(cls.section, config.ckks, config.min_clients, keyring=KEYRING)

    @classmethod
    def check(cls, config, setup) -> None:
        from fedsafe.defenses.secure_aggregation.params import check_compatible

        if setup.fl.lora_aggregation == "fedex":
            raise ConfigError("fl.lora_aggregation=fedex cannot be combined with secure_agg.enabled: FedEx-LoRA's "
                              "residual avg(B_i A_i) - avg(B) avg(A) needs every client's plaintext factors, which "
                              "secure aggregation hides (ffa and rolora are linear and work with it)")

        check_compatible(setup.aggregator.name, setup.fl.algorithm, max_update_norm=setup.aggregator.max_update_norm,
                         server_clipping="server_clipping" in declared(setup))
        k = setup.clients_per_round
        if k < config.min_clients:
            got = f"fl.clients_per_round={setup.fl.clients_per_round:g}"
            if k != setup.fl.clients_per_round:
                got += f" ({k} of {setup.num_clients} clients)"
            raise ConfigError(f"secure_agg.min_clients={config.min_clients}: secure aggregation decrypts no sum of "
                              f"fewer clients, got {got}, so every round would be refused; raise "
                              "fl.clients_per_round or lower secure_agg.min_clients")

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.keys = None
        self.he_client = None

    def local_training(self, trainer):
        from fedsafe.defenses.secure_aggregation.protocol import KeyHolder, SecureAggClient

        c = self.config
        if self.ctx.he_client_context is not None:  # a ClientApp: this node's secret-key context
            context = self.ctx.he_client_context
        elif self.ctx.he_server_context is not None:  # a deployment's server: the clients encrypt elsewhere
            return trainer
        else:  # one process: fresh keys; the key holder is a client party here and sees only sums
            self.keys = KeyHolder(c.ckks)
            context = self.keys.client_context_bytes()
        self.he_client = SecureAggClient(context, trainer.flat.specs, c.prune_start, c.prune_end, self.ctx.fl.rounds,
                                         c.min_clients)
        return trainer

    def client_update(self, result, client, global_vec, rc, trainer):
        if self.he_client is None:
            raise ConfigError("secure aggregation: this process holds no client key, so it cannot encrypt")
        return self.he_client.encrypt_result(result, global_vec, rc)

    def aggregate(self, server) -> None:
        from fedsafe.defenses.secure_aggregation.pruning import MaskSchedule
        from fedsafe.defenses.secure_aggregation.protocol import SecureAggServer

        c = self.config
        schedule = MaskSchedule(self.ctx.flat.specs, c.prune_start, c.prune_end, self.ctx.fl.rounds)
        if self.ctx.he_server_context is not None:  # deployment: the key holders are clients
            server.secure = SecureAggServer(self.ctx.he_server_context, None, c.ckks, schedule, c.min_clients)
            engine = self.ctx.engine
            if not hasattr(engine, "decrypt"):
                raise ConfigError(f"secure_agg with a server context needs an engine whose clients hold the keys; "
                                  f"the {getattr(engine, 'name', type(engine).__name__)} engine has none")
            server.secure.use_remote_key_holder(engine.decrypt)
        else:
            server.secure = SecureAggServer(self.keys.server_context_bytes(), self.he_client.decrypt, c.ckks, schedule,
                                            c.min_clients)
        self.ctx.print(server.secure.describe())
