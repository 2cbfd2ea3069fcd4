"""Flower engine: the same experiment, with local training sent to Flower ClientApps as Messages.

The fedsafe round logic is untouched. :class:`~fedsafe.engines.flower.server.FlowerEngine` exposes the in-process
engine's ``fit(client_ids, global_vec, rc, on_result) -> list[ClientResult]``: it ships (global adapter,
:class:`RoundConfig`) to the SuperNode that holds each sampled client through a Flower ``Grid`` (Message API) and
turns the replies back into :class:`ClientResult` objects. The fedsafe ``Server`` (validation, any aggregator,
server optimiser), DP, malicious roles, evaluation, the post-hoc defense, the run directory and the report therefore
run exactly as in-process, inside the ServerApp.

Two ways to run it:

- **Simulation** (``fedsafe run CONFIG --engine flower``): Flower's Simulation Runtime (LinkState, InMemoryGrid, one
  virtual SuperNode per client, ``partition-id`` = client index) with a thread backend that runs the ClientApp in
  this process on the pipeline's own model, so no Ray is needed and the result equals the in-process engine's.
- **Deployment**: ``flower-superlink``, one ``flower-supernode`` per client and ``flwr run`` on the app written by
  ``fedsafe flower app`` (see :mod:`fedsafe.engines.flower.app` and the README). Each SuperNode's warm worker
  (:mod:`fedsafe.engines.flower.worker`) builds the model and its client's data once per run from the experiment
  config carried in the message (or trains on the node's own ``data-path``); the per-message ClientApp process only
  forwards to it. Without a worker, every ClientApp process builds them itself.

Faults: a client whose reply does not arrive within ``flower.round_timeout_s`` or comes back as a Flower error is
logged as failed (``failed`` in the round record) and the round goes on with the replies that arrived; below
``flower.min_results`` replies the round leaves the global adapter unchanged. That threshold is raised to what the
round needs anyway (:func:`~fedsafe.engines.flower.server.round_min_results`): the aggregation rule's smallest round
(e.g. 2f+3 for Krum, the check the config passed with ``fl.clients_per_round`` at load) or, under secure
aggregation, ``secure_agg.min_clients``, so a round with too few replies is skipped, not a failed rule.

Secure aggregation (``secure_agg.enabled``) in a deployment: ``fedsafe flower keys`` writes the key set
(:mod:`fedsafe.defenses.secure_aggregation.keys`); the engine reaches the key files and the decryption only through
the plug-in's key ring (:meth:`fedsafe.plugins.Plugin.deployment_keys`, ``DeploymentKeys.keyring``) and imports no
plug-in module. Every SuperNode holds the secret-key file (node config
``he-context``) and the ServerApp the public one (run config ``he-context``). The pipeline's
:class:`fedsafe.fl.server.Server` sums the ciphertexts as in-process, and its key holder is
:meth:`~fedsafe.engines.flower.server.FlowerEngine.decrypt`: a ``query.decrypt`` message carries the encrypted sum
and the round's keep-mask to one SuperNode whose client answered this round, which decrypts it with
:func:`fedsafe.defenses.secure_aggregation.protocol.decrypt_aggregate` (no model needed) and replies with the
plaintext aggregate; if it fails, the next key-holding node is asked. The server optimiser step, the mask schedule,
the metrics and the run directory are the in-process code. Every message carries the server's key id, so a node
holding another key set refuses (at connect, so it is never sampled) instead of encrypting under a key the others
cannot use.

A sum of fewer than ``secure_agg.min_clients`` clients is never decrypted. The server does not ask (the round leaves
the global adapter unchanged, reason logged, as in-process), and a key-holding SuperNode refuses one by the
aggregate's client count, with the larger of the config's minimum and its own node config ``he-min-clients``
(default 2), so a server cannot lower it by sending another config; a refusal also leaves the round's adapter
unchanged rather than asking the next node.

One file per role (this package imports nothing, so the light modules stay light):

- :mod:`~fedsafe.engines.flower.codec`: fedsafe objects <-> Flower records, the message types;
- :mod:`~fedsafe.engines.flower.server`: the engine the pipeline calls in the ServerApp, the server's keys;
- :mod:`~fedsafe.engines.flower.client_app`: the ClientApp's handlers with a model (train, query, decrypt);
- :mod:`~fedsafe.engines.flower.trainer_cache`: the client-side trainer and data, one per run on a node;
- :mod:`~fedsafe.engines.flower.node`: what a SuperNode knows without a model (its client, keys, pinned model);
- :mod:`~fedsafe.engines.flower.worker`: a SuperNode's warm worker process and the thin handler's forwarding;
- :mod:`~fedsafe.engines.flower.simulation`: Flower's Simulation Runtime with a thread backend;
- :mod:`~fedsafe.engines.flower.app`: the deployed ServerApp and thin ClientApp;
- :mod:`~fedsafe.engines.flower.deploy`, :mod:`~fedsafe.engines.flower.cli`: ``fedsafe flower ...`` (keys, certs,
  app, SuperLink, SuperNodes, submit), through :mod:`~fedsafe.engines.flower.superlink` and
  :mod:`~fedsafe.engines.flower.supernode`; :mod:`~fedsafe.engines.flower.trace` times a deployed message.
"""
