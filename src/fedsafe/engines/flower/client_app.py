"""The ClientApp's handlers with a model: train a client, answer a query, decrypt a round's encrypted sum.

Run by the simulation's in-process ClientApp (:mod:`fedsafe.engines.flower.simulation`), by a SuperNode's warm
worker (:mod:`fedsafe.engines.flower.worker`) and, without a worker, by the deployed ClientApp itself
(:mod:`fedsafe.engines.flower.app`). The trainer and data come from :mod:`fedsafe.engines.flower.trainer_cache`.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsafe.engines.flower import trace as _trace
from fedsafe.engines.flower import trainer_cache
from fedsafe.engines.flower.codec import decode_train, decode_values, encode_result, encode_values, to_array
from fedsafe.engines.flower.node import (HE_MIN_CLIENTS, encrypted_keys, node_client_id, node_keys, parse_config,
                                         query_reply)
from fedsafe.errors import FedsafeError
from fedsafe.plugins import deployment_keys


def _own_key(token: str, cfg) -> tuple[bytes, int] | None:
    """The simulation's own client party's (secret context, min_clients), through the plug-in's key ring (None on
    a SuperNode, or when this run's clients do not encrypt)."""
    worker = trainer_cache.LOCAL.get(token)
    spec = deployment_keys(cfg) if worker is not None else None
    return spec.keyring.client_key(worker.trainer) if spec is not None and spec.keyring is not None else None


def _secret_context(token: str, config_yaml: str, node_config, he_key_id: str | None):
    """This node's secret-key CKKS context: the simulation's own client party, or the node's key file."""
    cfg = parse_config(config_yaml)
    if token in trainer_cache.LOCAL:
        own = _own_key(token, cfg)
        if own is None:
            raise FedsafeError("asked to decrypt, but this run's clients do not use secure aggregation")
        return own[0]
    if encrypted_keys(cfg) is None:
        raise FedsafeError("asked to decrypt, but no plug-in of the experiment config encrypts updates")
    return node_keys(node_config, cfg, he_key_id)


def handle_query(message: Message, context: Context) -> Message:
    """Reply with the client this SuperNode holds (after checking its CKKS keys when secure_agg is on)."""
    meta = message.content["fedsafe"]
    if meta["token"] in trainer_cache.LOCAL:
        cid = node_client_id(context.node_config, len(trainer_cache.LOCAL[meta["token"]].clients))
        return Message(RecordDict({"fedsafe": ConfigRecord({"client_id": cid})}), reply_to=message)
    return Message(query_reply(message.content, context.node_config), reply_to=message)


def key_holder_min_clients(token: str, config_yaml: str, node_config) -> int:
    """The smallest sum this key holder decrypts: the simulation's own setting, or on a SuperNode the larger of
    the config's minimum (``secure_agg.min_clients``, through :func:`encrypted_keys`) and the node's own
    ``he-min-clients`` (default 2; the config comes from the server, so it may raise the minimum but never lower
    it)."""
    cfg = parse_config(config_yaml)
    own = _own_key(token, cfg)
    if own is not None:
        return own[1]
    spec = deployment_keys(cfg)
    if spec is None or spec.keyring is None:
        raise FedsafeError("asked to decrypt, but no plug-in of the experiment config encrypts updates")
    try:
        floor = int(node_config.get(HE_MIN_CLIENTS, spec.keyring.default_min_clients))
    except (TypeError, ValueError) as exc:
        raise FedsafeError(f"node config {HE_MIN_CLIENTS}={node_config.get(HE_MIN_CLIENTS)!r} is not an integer") \
            from exc
    if floor < 1:
        raise FedsafeError(f"node config {HE_MIN_CLIENTS}={floor} must be >= 1")
    keys = encrypted_keys(cfg)
    return max(keys.min_clients if keys is not None else spec.keyring.default_min_clients, floor)


def handle_decrypt(message: Message, context: Context) -> Message:
    """Key holder: decrypt the round's encrypted sum with this node's secret key; reply with the plaintext aggregate.

    Needs no model: the server sends the round's keep-mask, which :func:`decrypt_aggregate` checks against
    the digest the clients encrypted under. A sum of fewer clients than :func:`key_holder_min_clients` is
    refused (:class:`fedsafe.errors.DecryptRefused`) before anything is decrypted.
    """
    return Message(decrypt_reply(message.content, context.node_config), reply_to=message)


def decrypt_reply(content: RecordDict, node_config) -> RecordDict:
    """The content of :func:`handle_decrypt`'s reply (also run by a SuperNode's warm worker)."""
    meta = content["fedsafe"]
    secret = _secret_context(meta["token"], meta["config"], node_config, meta.get("he_key_id"))
    min_clients = key_holder_min_clients(meta["token"], meta["config"], node_config)
    keyring = deployment_keys(parse_config(meta["config"])).keyring  # _secret_context found it
    wire = decode_values(content["aggregate_arrays"], content["aggregate"])
    mask = torch.from_numpy(np.array(content["mask"]["mask"].numpy(), copy=True))
    delta = keyring.decrypt(secret, wire, mask, min_clients)
    return RecordDict({"delta": ArrayRecord({"vec": to_array(delta)})})


_STATE_KEY = "fedsafe.client_state"


def handle_train(message: Message, context: Context) -> Message:
    """Run local training for the client named in the message; reply with its ClientResult."""
    return Message(train_reply(message.content, context.node_config, context.state, message.metadata.message_id),
                   reply_to=message)


def train_reply(content: RecordDict, node_config, state_records: RecordDict, mid: str | None = None) -> RecordDict:
    """Local training of the client named in a train message's ``content``; the reply's content.

    Client state that persists across rounds (SCAFFOLD's ``c_i``) is read from and written back to
    ``state_records``: the node's ``Context.state``, which Flower keeps for the run (also when the warm worker
    that trained the client is restarted).
    """
    _trace.mark("handler_start", mid=mid)
    global_vec, rc, cid, config_yaml, token = decode_train(content)
    worker = trainer_cache.trainer_for(token, config_yaml, node_config, content["fedsafe"].get("he_key_id"))
    _trace.mark("model_ready", mid=mid)
    if cid not in worker.clients:
        raise FedsafeError(f"this SuperNode does not hold client {cid!r}")
    arrays = state_records.get(f"{_STATE_KEY}.{cid}.arrays")
    config = state_records.get(f"{_STATE_KEY}.{cid}.config")
    state = decode_values(arrays, config)
    _trace.mark("fit_start", mid=mid)
    res = worker.trainer.fit(worker.clients[cid], global_vec, rc, state)
    _trace.mark("fit_end", mid=mid)
    new_arrays, new_config = ArrayRecord(), ConfigRecord()
    encode_values(state, new_arrays, new_config, "client state")
    state_records[f"{_STATE_KEY}.{cid}.arrays"] = new_arrays
    state_records[f"{_STATE_KEY}.{cid}.config"] = new_config
    reply = encode_result(res)
    _trace.mark("handler_end", mid=mid)
    return reply


