"""What a SuperNode knows without a model: which client it holds, its CKKS keys, its warm worker's pinned model.

Standard library, PyYAML and Flower's records only (no torch): the thin ClientApp (:mod:`fedsafe.engines.flower.app`)
answers a ``query`` message with :func:`query_reply` in a process that never loads the model, and both the warm
worker (:mod:`fedsafe.engines.flower.worker`) and the client side with a model
(:mod:`fedsafe.engines.flower.client_app`) read the node config through these helpers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedsafe.errors import FedsafeError
from fedsafe.plugins import DeploymentKeys, deployment_keys

WORKER_DIR = "worker-dir"  # node config key: the directory of this SuperNode's warm worker
HE_CONTEXT = "he-context"  # node config / run config key: path of a key file of `fedsafe flower keys`
HE_MIN_CLIENTS = "he-min-clients"  # node config key: this key holder decrypts no sum of fewer clients (default 2)
SETTINGS_NAME = "worker.json"  # in the worker directory: owner (SuperNode) pid, preload config, pinned model
_TINY = "tiny"  # fedsafe.models.TINY_NAME (not imported: it imports torch)


def node_client_id(node_config, num_clients: int) -> str:
    """Which client a SuperNode holds: node config ``client-id`` or ``partition-id`` (index)."""
    if "client-id" in node_config:
        return str(node_config["client-id"])
    if "partition-id" in node_config:
        idx = int(node_config["partition-id"])
        if not 0 <= idx < num_clients:
            raise FedsafeError(f"node config partition-id={idx} is outside the config's {num_clients} clients")
        return f"client_{idx:02d}"
    raise FedsafeError("the SuperNode needs --node-config 'partition-id=N' or 'client-id=\"client_NN\"'")


def encrypted_keys(cfg) -> DeploymentKeys | None:
    """The key set of ``cfg``'s plug-in that encrypts updates when it is on (:meth:`Plugin.deployment_keys`),
    else None: the deployment reads no plug-in's section by name."""
    keys = deployment_keys(cfg)
    return keys if keys is not None and keys.enabled else None


def node_keys(node_config, cfg, he_key_id: str | None) -> bytes:
    """This SuperNode's secret-key CKKS context (node config ``he-context``), checked against the run.

    The file must be the clients' file of ``fedsafe flower keys``, made with the config's key parameters
    (:func:`encrypted_keys`) and, when the server names its key id, from the same key set as the server's public
    context.
    """
    spec = deployment_keys(cfg)
    path = node_config.get(HE_CONTEXT)
    if not path:
        raise FedsafeError(f"{spec.section}.enabled but this SuperNode holds no CKKS keys: start it with "
                           f"--node-config \"{HE_CONTEXT}='/path/clients.ctx'\" (the clients' file of "
                           "`fedsafe flower keys`)")
    keys = spec.keyring.read(str(path), "clients", spec.params, who=f"node config {HE_CONTEXT}")
    if he_key_id is not None and keys.key_id != he_key_id:
        raise FedsafeError(f"node config {HE_CONTEXT} {path} belongs to key set {keys.key_id}, the server's public "
                           f"context to key set {he_key_id}: give every SuperNode the clients.ctx written together "
                           "with the server's server.ctx")
    return keys.context


def model_key(cfg) -> str:
    """What identifies a loaded base model: name, device, dtype, quantization (and the seed of ``tiny``)."""
    m = cfg.model
    ident = {"name": m.name, "device": m.device, "dtype": m.dtype, "quantization": m.quantization,
             "align": m.align.model_dump(mode="json") if getattr(m, "align", None) is not None else None}
    if m.name == _TINY:  # the tiny test model is randomly initialised from the experiment seed
        ident["seed"] = cfg.seed
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(config_yaml: str, node_config, he_key_id: str | None) -> str:
    """The identity of one run's client-side build on one node (the key of its cached trainer and data)."""
    return hashlib.sha256((config_yaml + json.dumps(dict(node_config), sort_keys=True, default=str)
                           + str(he_key_id)).encode()).hexdigest()



def parse_config(config_yaml: str):
    """The experiment config a message carries (as YAML), validated."""
    import yaml

    from fedsafe.config import ExperimentConfig

    return ExperimentConfig.model_validate(yaml.safe_load(config_yaml))


def read_settings(wdir: Path) -> dict:
    """The settings the launcher wrote into a warm worker's directory (empty if none)."""
    try:
        return json.loads((wdir / SETTINGS_NAME).read_text())
    except (OSError, ValueError):
        return {}


def pinned_refusal(settings: dict, cfg) -> str | None:
    """Why a worker pinned to one model (``--config`` at start) refuses a run of ``cfg``; None if it does not."""
    pinned = settings.get("model_key")
    if pinned and pinned != model_key(cfg):
        return (f"this SuperNode's warm worker holds model {settings.get('model_name')!r} (key {pinned}, from "
                f"`fedsafe flower supernode --config {settings.get('config')}`), the run asks for "
                f"{cfg.model.name!r} (key {model_key(cfg)}): restart the SuperNode with this run's config or "
                "without --config")
    return None


def query_reply(content, node_config):
    """Which client this SuperNode holds, after the checks a node can do at connect (keys, pinned model)."""
    from flwr.app import ConfigRecord, RecordDict

    meta = content["fedsafe"]
    cfg = parse_config(meta["config"])
    if encrypted_keys(cfg) is not None:  # refuse at connect, so a node without the right keys is never sampled
        node_keys(node_config, cfg, meta.get("he_key_id"))
    if node_config.get(WORKER_DIR):
        why = pinned_refusal(read_settings(Path(str(node_config[WORKER_DIR]))), cfg)
        if why:
            raise FedsafeError(why)
    cid = node_client_id(node_config, cfg.num_clients)
    return RecordDict({"fedsafe": ConfigRecord({"client_id": cid})})
