"""The client side's trainer and data on a node, one per run: the simulation's own, or built once per process.

In a simulation the ClientApps run in the pipeline's process and train on its model (:func:`register_local`); on
a SuperNode the warm worker (:mod:`fedsafe.engines.flower.worker`), or without one each ClientApp process, builds
the model and its client's data from the experiment config the message carries (:func:`trainer_for`), once per
run, reusing a base model the warm worker loaded at start (:data:`PRELOADED`).
"""

from __future__ import annotations

import dataclasses
import threading

from fedsafe.engines.flower.node import (config_hash, encrypted_keys, model_key, node_client_id, node_keys,
                                         parse_config)
from fedsafe.errors import FedsafeError
from fedsafe.data.client_data import ClientData


@dataclasses.dataclass
class NodeTrainer:
    """A run's client-side trainer (plug-in hooks included) and the clients this node holds."""

    trainer: object
    clients: dict[str, ClientData]


LOCAL: dict[str, NodeTrainer] = {}  # run token -> the pipeline's own trainer (simulation in this process)
BUILT: dict[str, NodeTrainer] = {}  # config hash -> the trainer this process built (deployment)
_BUILD_LOCK = threading.Lock()
PRELOADED: dict[str, object] = {}  # model_key -> LoadedModel a warm worker loaded at start (used by one build)


def register_local(token: str, trainer, clients: list[ClientData]) -> None:
    """Let ClientApps in this process train on the pipeline's model and clients (simulation)."""
    LOCAL[token] = NodeTrainer(trainer, {c.client_id: c for c in clients})


def unregister_local(token: str) -> None:
    """Forget a simulation's trainer (the run ended)."""
    LOCAL.pop(token, None)


def build(config_yaml: str, node_config, he_key_id: str | None = None) -> NodeTrainer:
    """Model + this node's client data, built from the experiment config (one per process and config)."""
    from fedsafe.data import build_clients
    from fedsafe.data.format import tokenize_rows
    from fedsafe.models import attach_lora
    from fedsafe.plugins import client_trainer
    from fedsafe.run_model import load_model

    cfg = parse_config(config_yaml)
    # the keys first: a node without them fails before the model load
    client_context = node_keys(node_config, cfg, he_key_id) if encrypted_keys(cfg) else None
    loaded = PRELOADED.pop(model_key(cfg), None)  # a warm worker's base model, loaded before the run
    if loaded is None:
        loaded = load_model(cfg.model, seed=cfg.seed)
    peft_model = attach_lora(loaded.model, cfg.lora.r, int(cfg.lora.alpha), cfg.lora.dropout,
                             cfg.lora.target_modules, seed=cfg.seed)
    # the same client side as in-process: the plug-ins' local_training and client_update hooks (e.g. train, then
    # encrypt with this node's secret key)
    trainer = client_trainer(cfg, peft_model, loaded.tokenizer, he_client_context=client_context)
    cid = node_client_id(node_config, cfg.num_clients)
    data_path = node_config.get("data-path")
    if data_path:  # the node's own data: one client, trained with the experiment's formatting
        from fedsafe.config import DataSource
        from fedsafe.data.sources import load_rows

        src = DataSource(path=str(data_path),
                         instruction_field=str(node_config.get("instruction-field", "instruction")),
                         response_field=str(node_config.get("response-field", "response")))
        rows = load_rows(src, seed=cfg.seed)
        examples = tokenize_rows(loaded.tokenizer, rows, cfg.data.max_length, cfg.data.system_prompt)
        if not examples:
            raise FedsafeError(f"node data-path {data_path}: no usable example")
        role = str(node_config.get("role", "benign"))
        clients = [ClientData(cid, role, examples, role.lower().startswith("malicious"))]
    else:  # a simulated client: rebuild its partition from the config (same seeds as the server)
        generator_cache = {"model": peft_model, "tokenizer": loaded.tokenizer, "name": cfg.model.name}
        clients = [c for c in build_clients(cfg, loaded.tokenizer, generator_cache) if c.client_id == cid]
        if not clients:
            raise FedsafeError(f"client {cid!r} is not defined by the experiment config")
    return NodeTrainer(trainer, {c.client_id: c for c in clients})


def trainer_for(token: str, config_yaml: str, node_config, he_key_id: str | None = None) -> NodeTrainer:
    """The simulation's trainer of run ``token``, or the one this process built for this config and node."""
    if token in LOCAL:
        return LOCAL[token]
    key = config_hash(config_yaml, node_config, he_key_id)
    with _BUILD_LOCK:
        if key not in BUILT:
            BUILT.clear()  # one run at a time per node: free the previous run's model first
            BUILT[key] = build(config_yaml, node_config, he_key_id)
        return BUILT[key]


