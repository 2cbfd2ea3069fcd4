"""Flower engine: the same experiment, with local training sent to Flower ClientApps as Messages.

The fedsafe round logic is untouched. :class:`FlowerEngine` exposes the in-process engine's
``fit(client_ids, global_vec, rc, on_result) -> list[ClientResult]``: it ships (global adapter,
:class:`RoundConfig`) to the SuperNode that holds each sampled client through a Flower ``Grid``
(Message API) and turns the replies back into :class:`ClientResult` objects. The fedsafe ``Server``
(validation, any aggregator, server optimiser), DP, malicious roles, evaluation, the post-hoc defense,
the run directory and the report therefore run exactly as in-process, inside the ServerApp.

Two ways to run it:

- **Simulation** (``fedsafe run CONFIG --engine flower``): Flower's Simulation Runtime (LinkState,
  InMemoryGrid, one virtual SuperNode per client, ``partition-id`` = client index) with a thread backend
  that runs the ClientApp in this process on the pipeline's own model, so no Ray is needed and the
  result equals the in-process engine's.
- **Deployment**: ``flower-superlink``, one ``flower-supernode`` per client and ``flwr run`` on the app
  written by ``fedsafe flower app`` (see :mod:`fedsafe.engines.flower_app` and the README). Each SuperNode's
  warm worker (:mod:`fedsafe.engines.worker`) builds the model and its client's data once per run from the
  experiment config carried in the message (or trains on the node's own ``data-path``); the per-message
  ClientApp process only forwards to it. Without a worker, every ClientApp process builds them itself.

Faults: a client whose reply does not arrive within ``flower.round_timeout_s`` or comes back as a Flower
error is logged as failed (``failed`` in the round record) and the round goes on with the replies that
arrived; below ``flower.min_results`` replies the round leaves the global adapter unchanged. That threshold is
raised to what the round needs anyway (:func:`round_min_results`): the aggregation rule's smallest round (e.g.
2f+3 for Krum, the check the config passed with ``fl.clients_per_round`` at load) or, under secure
aggregation, ``secure_agg.min_clients``, so a round with too few replies is skipped, not a failed rule.

Secure aggregation (``secure_agg.enabled``) in a deployment: ``fedsafe flower keys`` writes the key set
(:mod:`fedsafe.defenses.secure_aggregation.keys`); every SuperNode holds the secret-key file (node config ``he-context``)
and the ServerApp the public one (run config ``he-context``). The pipeline's :class:`fedsafe.fl.server.Server`
sums the ciphertexts as in-process, and its key holder is :meth:`FlowerEngine.decrypt`: a ``query.decrypt``
message carries the encrypted sum and the round's keep-mask to one SuperNode whose client answered this
round, which decrypts it with :func:`fedsafe.defenses.secure_aggregation.protocol.decrypt_aggregate` (no model needed) and
replies with the plaintext aggregate; if it fails, the next key-holding node is asked. The server optimiser
step, the mask schedule, the metrics and the run directory are the in-process code. Every message carries
the server's key id, so a node holding another key set refuses (at connect, so it is never sampled) instead
of encrypting under a key the others cannot use.

A sum of fewer than ``secure_agg.min_clients`` clients is never decrypted. The server does not ask (the
round leaves the global adapter unchanged, reason logged, as in-process), and a key-holding SuperNode
refuses one by the aggregate's client count, with the larger of the config's minimum and its own node config
``he-min-clients`` (default 2), so a server cannot lower it by sending another config; a refusal also leaves
the round's adapter unchanged rather than asking the next node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
import time
import types
import uuid
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # never phone home from experiments

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402

from fedsafe.config import ExperimentConfig, dump_config, load_config  # noqa: E402
from fedsafe.engines import flower_trace as _trace  # noqa: E402
from fedsafe.engines.worker import HE_CONTEXT, model_key, node_client_id, node_keys  # noqa: E402,F401
from fedsafe.errors import FedsafeError  # noqa: E402
from fedsafe.fl.client import ClientData, ClientResult, RoundConfig  # noqa: E402

log = logging.getLogger("fedsafe")

TRAIN = "train"
QUERY = "query"
DECRYPT = "query.decrypt"  # secure_agg: a key-holding SuperNode decrypts the round's encrypted sum
HE_MIN_CLIENTS = "he-min-clients"  # node config key: this key holder decrypts no sum of fewer clients (default 2)
_POLL_S = 0.05

# ------------------------------------------------------------------------------------------------
# Codec: plain fedsafe objects <-> Flower records (tensors -> ArrayRecord, scalars/bytes -> ConfigRecord)
# ------------------------------------------------------------------------------------------------

_SCALARS = (bool, int, float, str, bytes)


def _to_array(t: torch.Tensor) -> Array:
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return Array(np.ascontiguousarray(t.numpy()))


def _is_config_value(v) -> bool:
    if isinstance(v, _SCALARS):
        return True
    if isinstance(v, list) and v and all(isinstance(x, _SCALARS) for x in v):
        return len({type(x) for x in v}) == 1
    return False


_SEP = "::"  # nested dict keys: "outer::inner"


def encode_values(values: dict, arrays: ArrayRecord, config: ConfigRecord, what: str) -> None:
    """Put a (nested) dict of tensors / scalars / bytes / JSON-able values into an ArrayRecord and a ConfigRecord."""
    nulls: list[str] = []
    dicts: list[str] = []

    def put(prefix: str, mapping: dict) -> None:
        for key, v in mapping.items():
            full = prefix + str(key)
            if v is None:
                nulls.append(full)
            elif isinstance(v, dict):
                dicts.append(full)
                put(full + _SEP, v)
            elif isinstance(v, torch.Tensor):
                arrays[full] = _to_array(v)
            elif isinstance(v, np.ndarray):
                arrays[full] = Array(np.ascontiguousarray(v))
            elif _is_config_value(v):
                config[full] = v
            else:
                try:
                    config["json:" + full] = json.dumps(v)
                except TypeError as exc:
                    raise FedsafeError(f"{what}[{full!r}] of type {type(v).__name__} cannot travel in a Flower "
                                       "message (use tensors, bytes, numbers, strings, dicts or JSON-able "
                                       "values)") from exc

    put("", values)
    if nulls:
        config["__none__"] = nulls
    if dicts:
        config["__dicts__"] = dicts


def decode_values(arrays: ArrayRecord | None, config: ConfigRecord | None) -> dict:
    """Inverse of :func:`encode_values` (tensors come back as torch tensors on the CPU)."""
    flat: dict = {}
    config = dict(config or {})
    for key in config.pop("__dicts__", []):
        flat[key] = {}
    for key in config.pop("__none__", []):
        flat[key] = None
    for key, arr in (arrays or {}).items():
        flat[key] = torch.from_numpy(np.array(arr.numpy(), copy=True))
    for key, v in config.items():
        if key.startswith("json:"):
            flat[key[5:]] = json.loads(v)
        else:
            flat[key] = v
    out: dict = {}
    for key in sorted(flat, key=lambda k: k.count(_SEP)):  # parents before children
        *parents, leaf = key.split(_SEP)
        node = out
        for part in parents:
            node = node[part]
        node[leaf] = flat[key]
    return out


def _meta(config_yaml: str, token: str, he_key_id: str | None, **more) -> ConfigRecord:
    """The ``fedsafe`` record every message carries: experiment config, run token, the server's HE key id."""
    meta = {**more, "config": config_yaml, "token": token}
    if he_key_id is not None:
        meta["he_key_id"] = he_key_id
    return ConfigRecord(meta)


def encode_train(global_vec: torch.Tensor, rc: RoundConfig, client_id: str, config_yaml: str,
                 token: str, he_key_id: str | None = None) -> RecordDict:
    """The content of a train message: global adapter, round config and which client to train."""
    rc_arrays, rc_config = ArrayRecord(), ConfigRecord()
    encode_values({f.name: getattr(rc, f.name) for f in dataclasses.fields(rc)}, rc_arrays, rc_config,
                  "RoundConfig")
    return RecordDict({"global": ArrayRecord({"vec": _to_array(global_vec)}),
                       "rc_arrays": rc_arrays, "rc": rc_config,
                       "fedsafe": _meta(config_yaml, token, he_key_id, client_id=client_id)})


def decode_train(content: RecordDict) -> tuple[torch.Tensor, RoundConfig, str, str, str]:
    """(global_vec, round config, client id, experiment config YAML, run token) from a train message."""
    global_vec = torch.from_numpy(np.array(content["global"]["vec"].numpy(), copy=True))
    known = {f.name for f in dataclasses.fields(RoundConfig)}
    values = decode_values(content["rc_arrays"], content["rc"])
    rc = RoundConfig(**{k: v for k, v in values.items() if k in known})
    meta = content["fedsafe"]
    return global_vec, rc, meta["client_id"], meta["config"], meta["token"]


def encode_result(res: ClientResult) -> RecordDict:
    """A client's reply: update vector, extra (tensors/bytes), metrics and sample count."""
    extra_arrays, extra_config = ArrayRecord(), ConfigRecord()
    encode_values(res.extra, extra_arrays, extra_config, "ClientResult.extra")
    numeric = {k: float(v) if isinstance(v, float) else v for k, v in res.metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    other = {k: v for k, v in res.metrics.items() if k not in numeric}
    return RecordDict({"update": ArrayRecord({"vec": _to_array(res.update)}),
                       "extra_arrays": extra_arrays, "extra": extra_config,
                       "metrics": MetricRecord(numeric),
                       "result": ConfigRecord({"client_id": res.client_id, "num_samples": int(res.num_samples),
                                               "metrics_json": json.dumps(other, default=str)})})


def decode_result(content: RecordDict) -> ClientResult:
    """Inverse of :func:`encode_result`; raises KeyError/ValueError on a malformed reply."""
    update = torch.from_numpy(np.array(content["update"]["vec"].numpy(), copy=True))
    meta = content["result"]
    metrics = dict(content["metrics"]) if "metrics" in content else {}
    metrics.update(json.loads(meta.get("metrics_json", "{}")))
    extra = decode_values(content.get("extra_arrays"), content.get("extra"))
    return ClientResult(str(meta["client_id"]), update, int(meta["num_samples"]), metrics, extra)


# ------------------------------------------------------------------------------------------------
# Server side: the engine the pipeline calls every round
# ------------------------------------------------------------------------------------------------

class FlowerEngine:
    """Runs sampled clients on Flower SuperNodes through a ``Grid`` (simulation or deployment)."""

    name = "flower"

    def __init__(self, grid, cfg: ExperimentConfig, clients: list[ClientData], token: str | None = None,
                 he_key_id: str | None = None):
        self.grid = grid
        self.cfg = cfg
        self.settings = cfg.flower
        self.clients = {c.client_id: c for c in clients}
        self.config_yaml = dump_config(cfg)
        self.token = token or uuid.uuid4().hex
        self.he_key_id = he_key_id  # key id of the server's public CKKS context (secure_agg in a deployment)
        self.node_of: dict[str, int] = {}  # client id -> SuperNode id
        self.last_failures: list[dict] = []  # {client_id, reason} of the last round
        self.min_results, self._min_results_why = round_min_results(cfg)
        self._last_answered: list[str] = []  # clients whose training reply arrived in the last round
        self._connected = False

    # -- connection ------------------------------------------------------------------------------
    def connect(self) -> None:
        """Wait for ``min_available_clients`` SuperNodes and learn which client each one holds."""
        need = self.settings.min_available_clients or min(self.cfg.clients_per_round, len(self.clients))
        deadline = time.monotonic() + self.settings.connect_timeout_s
        while len(self._node_ids()) < need and time.monotonic() < deadline:
            time.sleep(0.5)
        nodes = self._node_ids()
        if len(nodes) < need:
            log.warning("flower: only %d SuperNodes connected after %.0f s (flower.min_available_clients=%d); "
                        "going on with them", len(nodes), self.settings.connect_timeout_s, need)
        self._map_nodes(deadline)
        self._connected = True
        log.info("flower: %d SuperNodes hold clients %s", len(self.node_of), sorted(self.node_of))

    def _node_ids(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def _map_nodes(self, deadline: float | None = None) -> None:
        """Ask SuperNodes not yet mapped which client they hold (a ``query`` message)."""
        nodes = set(self._node_ids())
        self.node_of = {c: n for c, n in self.node_of.items() if n in nodes}
        unmapped = sorted(nodes - set(self.node_of.values()))
        if not unmapped:
            return
        content = RecordDict({"fedsafe": _meta(self.config_yaml, self.token, self.he_key_id)})
        # at connect: what is left of connect_timeout_s; later (a node joined or came back): a short wait
        timeout = max(5.0, (deadline - time.monotonic()) if deadline else
                      min(self.settings.connect_timeout_s, self.settings.round_timeout_s))
        msgs = [Message(content, dst_node_id=n, message_type=QUERY, group_id="connect", ttl=timeout + 60)
                for n in unmapped]
        pushed = self._push(msgs)
        replies = self._collect(pushed, timeout)
        for mid in set(pushed) - set(replies):
            log.warning("flower: SuperNode %d did not answer within %.0f s", pushed[mid].metadata.dst_node_id,
                        timeout)
        for reply in replies.values():
            if reply.has_error():
                log.warning("flower: SuperNode %d did not say which client it holds: %s",
                            reply.metadata.src_node_id, reply.error.reason)
                continue
            cid = str(reply.content["fedsafe"]["client_id"])
            if cid not in self.clients:
                log.warning("flower: SuperNode %d holds %r, which is not a client of this config (%d clients)",
                            reply.metadata.src_node_id, cid, len(self.clients))
                continue
            if cid in self.node_of and self.node_of[cid] != reply.metadata.src_node_id:
                log.warning("flower: client %s is held by two SuperNodes; using %d", cid, self.node_of[cid])
                continue
            self.node_of[cid] = reply.metadata.src_node_id

    def _push(self, msgs: list[Message]) -> dict[str, Message]:
        """Push messages one by one; {message id: message} for those the SuperLink accepted."""
        pushed = {}
        for msg in msgs:
            mid = next(iter(self.grid.push_messages([msg])), None)
            if mid:
                pushed[mid] = msg
        return pushed

    def _collect(self, message_ids, timeout_s: float, on_reply=None) -> dict[str, Message]:
        """Pull replies until every message has one or ``timeout_s`` passed; {message id: reply}."""
        pending, replies = set(message_ids), {}
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    replies[mid] = reply
                    if on_reply is not None:
                        on_reply(mid, reply)
            if pending:
                time.sleep(_POLL_S)
        return replies

    # -- one round -------------------------------------------------------------------------------
    def fit(self, client_ids: list[str], global_vec: torch.Tensor, rc: RoundConfig,
            on_result=None) -> list[ClientResult]:
        """Train the listed clients on their SuperNodes; returns the results that arrived, in ``client_ids`` order."""
        if not self._connected:
            self.connect()
        elif any(c not in self.node_of for c in client_ids):
            self._map_nodes()
        failures, msgs = [], []
        for cid in client_ids:
            node = self.node_of.get(cid)
            if node is None:
                failures.append({"client_id": cid, "reason": "no connected SuperNode holds this client"})
                continue
            msgs.append(Message(encode_train(global_vec, rc, cid, self.config_yaml, self.token, self.he_key_id),
                                dst_node_id=node, message_type=TRAIN, group_id=str(rc.round),
                                ttl=self.settings.round_timeout_s + 60))
        pushed = self._push(msgs)
        client_of = {mid: msg.content["fedsafe"]["client_id"] for mid, msg in pushed.items()}
        for mid, cid in client_of.items():
            _trace.mark("server_push", mid=mid, round=rc.round, client_id=cid)
        accepted = {id(m) for m in pushed.values()}
        for msg in msgs:
            if id(msg) not in accepted:
                failures.append({"client_id": msg.content["fedsafe"]["client_id"],
                                 "reason": "the SuperLink did not accept the message"})
        by_client: dict[str, ClientResult] = {}

        def on_reply(mid: str, reply: Message) -> None:
            cid = client_of[mid]
            _trace.mark("server_reply", mid=mid)
            if reply.has_error():
                failures.append({"client_id": cid, "reason": f"Flower error {reply.error.code}: {reply.error.reason}"})
                return
            try:
                res = decode_result(reply.content)
            except (KeyError, ValueError, TypeError) as exc:
                failures.append({"client_id": cid, "reason": f"malformed reply: {exc!r}"})
                return
            if res.client_id != cid:
                failures.append({"client_id": cid, "reason": f"reply names client {res.client_id!r}"})
                return
            by_client[cid] = res
            if on_result is not None:
                on_result(res)

        replies = self._collect(client_of, self.settings.round_timeout_s, on_reply)
        for mid in set(client_of) - set(replies):
            failures.append({"client_id": client_of[mid],
                             "reason": f"no reply within flower.round_timeout_s={self.settings.round_timeout_s:g}"})
        for f in failures:
            log.warning("round %d: client %s failed: %s", rc.round, f["client_id"], f["reason"])
        self.last_failures = sorted(failures, key=lambda f: f["client_id"])
        results = [by_client[c] for c in client_ids if c in by_client]
        self._last_answered = [r.client_id for r in results]
        if len(results) < self.min_results:
            log.error("round %d: %d of %d clients answered, fewer than %d (%s); the global adapter is left "
                      "unchanged this round", rc.round, len(results), len(client_ids), self.min_results,
                      self._min_results_why)
            reason = f"round below {self.min_results} replies ({self._min_results_why})"
            for r in results:
                self.last_failures.append({"client_id": r.client_id, "reason": reason})
            return []
        return results

    # -- secure aggregation: a key-holding SuperNode decrypts the sum ----------------------------
    def decrypt(self, aggregate, mask: torch.Tensor, round: int) -> torch.Tensor:
        """Remote key holder of :class:`fedsafe.defenses.secure_aggregation.protocol.SecureAggServer`: a SuperNode decrypts the sum.

        Sends the encrypted sum and the round's (public) keep-mask; nodes whose client answered this round
        are asked first, one at a time; a node that fails or does not answer within
        ``flower.decrypt_timeout_s`` is logged and the next one is asked.
        """
        timeout = self.settings.decrypt_timeout_s
        answered = [c for c in self._last_answered if c in self.node_of]
        order, seen = [], set()
        for cid in answered + sorted(c for c in self.node_of if c not in answered):
            if self.node_of[cid] not in seen:
                seen.add(self.node_of[cid])
                order.append((cid, self.node_of[cid]))
        from fedsafe.defenses.secure_aggregation.protocol import REFUSED, DecryptRefused

        reasons = []
        for cid, node in order:
            delta, reason = self._decrypt_on(node, aggregate, mask, round, timeout)
            if delta is not None:
                log.info("round %d: SuperNode %d (client %s) decrypted the encrypted sum", round, node, cid)
                return delta
            if REFUSED in reason:  # the key holder's minimum sum size: the round is skipped, no other node asked
                raise DecryptRefused(f"{REFUSED} (SuperNode {node}, client {cid}): {reason}")
            log.warning("round %d: SuperNode %d (client %s) could not decrypt the encrypted sum: %s", round, node,
                        cid, reason)
            reasons.append(f"{cid}: {reason}")
        raise FedsafeError(f"round {round}: no key-holding SuperNode decrypted the encrypted sum ("
                           + ("; ".join(reasons) or "no SuperNode is connected") + "); finished rounds are "
                           "checkpointed: fix the SuperNodes' he-context files and resume the run")

    def _decrypt_on(self, node: int, aggregate, mask: torch.Tensor, round: int,
                    timeout: float) -> tuple[torch.Tensor | None, str | None]:
        """Ask one SuperNode to decrypt; (delta, None) or (None, why it failed)."""
        content = encode_decrypt(aggregate, mask, round, self.config_yaml, self.token, self.he_key_id)
        pushed = self._push([Message(content, dst_node_id=node, message_type=DECRYPT, group_id=str(round),
                                     ttl=timeout + 60)])
        if not pushed:
            return None, "the SuperLink did not accept the message"
        reply = next(iter(self._collect(pushed, timeout).values()), None)
        if reply is None:
            return None, f"no reply within flower.decrypt_timeout_s={timeout:g}"
        if reply.has_error():
            return None, f"Flower error {reply.error.code}: {reply.error.reason}"
        try:
            delta = torch.from_numpy(np.array(reply.content["delta"]["vec"].numpy(), copy=True))
        except (KeyError, ValueError, TypeError) as exc:
            return None, f"malformed reply: {exc!r}"
        if delta.shape != mask.shape or not bool(torch.isfinite(delta).all()):
            return None, (f"the decrypted sum has shape {tuple(delta.shape)} (expected {tuple(mask.shape)}) "
                          "or non-finite values")
        return delta, None

    def state_dict(self) -> dict:
        # client-side state (SCAFFOLD's c_i) lives in each SuperNode's Context, not in the server checkpoint
        return {}

    def load_state_dict(self, state: dict) -> None:
        if self.cfg.fl.algorithm == "scaffold":
            log.warning("flower: resuming SCAFFOLD restarts the clients' control variates (kept on the nodes)")


def round_min_results(cfg: ExperimentConfig) -> tuple[int, str]:
    """The fewest replies a round is aggregated from, and why: ``flower.min_results``, raised to the rule's
    smallest round (:func:`fedsafe.aggregators.min_clients`) or, under secure aggregation,
    ``secure_agg.min_clients``."""
    from fedsafe.aggregators import min_clients

    need, why = cfg.flower.min_results, [f"flower.min_results={cfg.flower.min_results}"]
    if cfg.secure_agg.enabled:
        rule_need, rule_why = cfg.secure_agg.min_clients, f"secure_agg.min_clients={cfg.secure_agg.min_clients}"
    else:
        rule_need = min_clients(cfg.aggregator.name, cfg.aggregator.params)
        rule_why = f"aggregator {cfg.aggregator.name} needs {rule_need}"
    if rule_need > need:
        need, why = rule_need, why + [rule_why]
    return need, "; ".join(why)


# ------------------------------------------------------------------------------------------------
# Client side: what a ClientApp does with a message (used by fedsafe.engines.flower_app)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Worker:
    trainer: object
    clients: dict[str, ClientData]


_LOCAL_WORKERS: dict[str, _Worker] = {}  # run token -> the pipeline's own trainer (simulation in this process)
_BUILT_WORKERS: dict[str, _Worker] = {}  # config hash -> a worker this process built (deployment)
_BUILD_LOCK = threading.Lock()
_PRELOADED: dict[str, object] = {}  # model_key -> LoadedModel a warm worker loaded at start (used by one build)


def register_local(token: str, trainer, clients: list[ClientData]) -> None:
    """Let ClientApps in this process train on the pipeline's model and clients (simulation)."""
    _LOCAL_WORKERS[token] = _Worker(trainer, {c.client_id: c for c in clients})


def unregister_local(token: str) -> None:
    _LOCAL_WORKERS.pop(token, None)


def server_keys(cfg: ExperimentConfig, path: str | None):
    """The ServerApp's public CKKS key file (run config ``he-context``) when ``secure_agg`` is on, else None."""
    from fedsafe.defenses.secure_aggregation.keys import SERVER, read_key_file

    if not cfg.secure_agg.enabled:
        if path:
            log.warning("run config %s=%s is ignored: secure_agg.enabled is false", HE_CONTEXT, path)
        return None
    if not path:
        raise FedsafeError(f"secure_agg.enabled in a Flower deployment needs the server's public CKKS context: "
                           "`fedsafe flower keys --out DIR --config CONFIG`, then `fedsafe flower app ... "
                           f"--he-context DIR/server.ctx` (or `fedsafe flower submit ... --he-context ...`)")
    return read_key_file(path, SERVER, cfg.secure_agg.ckks, who=f"run config {HE_CONTEXT}")


def _build_worker(config_yaml: str, node_config, he_key_id: str | None = None) -> _Worker:
    """Model + this node's client data, built from the experiment config (one per process and config)."""
    import yaml

    from fedsafe.data import build_clients
    from fedsafe.data.format import tokenize_rows
    from fedsafe.models import attach_lora, load_base_model
    from fedsafe.plugins import client_trainer

    cfg = ExperimentConfig.model_validate(yaml.safe_load(config_yaml))
    # the keys first: a node without them fails before the model load
    client_context = node_keys(node_config, cfg, he_key_id) if cfg.secure_agg.enabled else None
    loaded = _PRELOADED.pop(model_key(cfg), None)  # a warm worker's base model, loaded before the run
    if loaded is None:
        loaded = load_base_model(cfg.model.name, cfg.model.device, cfg.model.dtype, cfg.model.quantization,
                                 seed=cfg.seed, align=cfg.model.align)
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
    return _Worker(trainer, {c.client_id: c for c in clients})


def _worker_for(token: str, config_yaml: str, node_config, he_key_id: str | None = None) -> _Worker:
    if token in _LOCAL_WORKERS:
        return _LOCAL_WORKERS[token]
    key = hashlib.sha256((config_yaml + json.dumps(dict(node_config), sort_keys=True, default=str)
                          + str(he_key_id)).encode()).hexdigest()
    with _BUILD_LOCK:
        if key not in _BUILT_WORKERS:
            _BUILT_WORKERS.clear()  # one run at a time per node: free the previous run's model first
            _BUILT_WORKERS[key] = _build_worker(config_yaml, node_config, he_key_id)
        return _BUILT_WORKERS[key]


def _secret_context(token: str, config_yaml: str, node_config, he_key_id: str | None):
    """This node's secret-key CKKS context: the simulation's own client party, or the node's key file."""
    import yaml

    from fedsafe.defenses.secure_aggregation.protocol import client_party

    worker = _LOCAL_WORKERS.get(token)
    if worker is not None:
        party = client_party(worker.trainer)
        if party is None:
            raise FedsafeError("asked to decrypt, but this run's clients do not use secure aggregation")
        return party.context
    cfg = ExperimentConfig.model_validate(yaml.safe_load(config_yaml))
    if not cfg.secure_agg.enabled:
        raise FedsafeError("asked to decrypt, but the experiment config has secure_agg.enabled=false")
    return node_keys(node_config, cfg, he_key_id)


def handle_query(message: Message, context: Context) -> Message:
    """Reply with the client this SuperNode holds (after checking its CKKS keys when secure_agg is on)."""
    from fedsafe.engines.worker import query_reply

    meta = message.content["fedsafe"]
    if meta["token"] in _LOCAL_WORKERS:
        cid = node_client_id(context.node_config, len(_LOCAL_WORKERS[meta["token"]].clients))
        return Message(RecordDict({"fedsafe": ConfigRecord({"client_id": cid})}), reply_to=message)
    return Message(query_reply(message.content, context.node_config), reply_to=message)


def encode_decrypt(aggregate, mask: torch.Tensor, round: int, config_yaml: str, token: str,
                   he_key_id: str | None = None) -> RecordDict:
    """The content of a ``query.decrypt`` message: the encrypted sum (with its client count), the round's mask."""
    arrays, config = ArrayRecord(), ConfigRecord()
    encode_values(aggregate.to_wire(), arrays, config, "EncryptedAggregate")
    return RecordDict({"mask": ArrayRecord({"mask": _to_array(mask)}), "aggregate_arrays": arrays,
                       "aggregate": config, "fedsafe": _meta(config_yaml, token, he_key_id, round=int(round))})


def key_holder_min_clients(token: str, config_yaml: str, node_config) -> int:
    """The smallest sum this key holder decrypts: the simulation's own setting, or on a SuperNode the larger of
    the config's ``secure_agg.min_clients`` and the node's own ``he-min-clients`` (default 2; the config comes
    from the server, so it may raise the minimum but never lower it)."""
    import yaml

    from fedsafe.defenses.secure_aggregation.protocol import MIN_CLIENTS, client_party

    worker = _LOCAL_WORKERS.get(token)
    if worker is not None and client_party(worker.trainer) is not None:
        return client_party(worker.trainer).min_clients
    cfg = ExperimentConfig.model_validate(yaml.safe_load(config_yaml))
    try:
        floor = int(node_config.get(HE_MIN_CLIENTS, MIN_CLIENTS))
    except (TypeError, ValueError) as exc:
        raise FedsafeError(f"node config {HE_MIN_CLIENTS}={node_config.get(HE_MIN_CLIENTS)!r} is not an integer") \
            from exc
    if floor < 1:
        raise FedsafeError(f"node config {HE_MIN_CLIENTS}={floor} must be >= 1")
    return max(cfg.secure_agg.min_clients, floor)


def handle_decrypt(message: Message, context: Context) -> Message:
    """Key holder: decrypt the round's encrypted sum with this node's secret key; reply with the plaintext aggregate.

    Needs no model: the server sends the round's keep-mask, which :func:`decrypt_aggregate` checks against
    the digest the clients encrypted under. A sum of fewer clients than :func:`key_holder_min_clients` is
    refused (:class:`fedsafe.defenses.secure_aggregation.protocol.DecryptRefused`) before anything is decrypted.
    """
    return Message(decrypt_reply(message.content, context.node_config), reply_to=message)


def decrypt_reply(content: RecordDict, node_config) -> RecordDict:
    """The content of :func:`handle_decrypt`'s reply (also run by a SuperNode's warm worker)."""
    from fedsafe.defenses.secure_aggregation.protocol import EncryptedAggregate, decrypt_aggregate

    meta = content["fedsafe"]
    secret = _secret_context(meta["token"], meta["config"], node_config, meta.get("he_key_id"))
    min_clients = key_holder_min_clients(meta["token"], meta["config"], node_config)
    aggregate = EncryptedAggregate.from_wire(decode_values(content["aggregate_arrays"], content["aggregate"]))
    mask = torch.from_numpy(np.array(content["mask"]["mask"].numpy(), copy=True))
    delta = decrypt_aggregate(secret, aggregate, mask, min_clients)
    return RecordDict({"delta": ArrayRecord({"vec": _to_array(delta)})})


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
    worker = _worker_for(token, config_yaml, node_config, content["fedsafe"].get("he_key_id"))
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


# ------------------------------------------------------------------------------------------------
# Simulation: Flower's Simulation Runtime with a thread backend (no Ray)
# ------------------------------------------------------------------------------------------------

class ThreadBackend:
    """A Flower simulation backend that runs the ClientApp in a thread of this process, one message at a time.

    One worker keeps clients sequential on the shared model, exactly like the in-process engine.
    """

    def __init__(self, backend_config=None):
        self.app_fn = None

    def build(self, app_fn) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        pass

    def process_message(self, message: Message, context: Context):
        from flwr.clientapp.client_app import ClientAppException

        try:
            return self.app_fn()(message=message, context=context), context
        except Exception as exc:
            log.warning("ClientApp raised on node %s: %r", message.metadata.dst_node_id, exc)
            raise ClientAppException(str(exc)) from exc


_RAY_BACKEND_MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"


@contextlib.contextmanager
def _thread_backend():
    """Make Flower 1.41's Simulation Runtime build :class:`ThreadBackend` (its backend choice is fixed to Ray)."""
    from flwr.server.superlink.fleet.vce.backend import Backend

    backend_cls = type("FedsafeThreadBackend", (ThreadBackend, Backend), {})
    previous = sys.modules.get(_RAY_BACKEND_MODULE)
    sys.modules[_RAY_BACKEND_MODULE] = types.SimpleNamespace(RayBackend=backend_cls)
    try:
        yield
    finally:
        if previous is None:
            sys.modules.pop(_RAY_BACKEND_MODULE, None)
        else:
            sys.modules[_RAY_BACKEND_MODULE] = previous


_SIMULATION_LOCK = threading.Lock()


def run_flower_experiment(cfg: ExperimentConfig | None = None, resume: str | Path | None = None,
                          progress: bool = True):
    """Run (or resume) an experiment in Flower's Simulation Runtime, one virtual SuperNode per client."""
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from fedsafe.pipeline import run_experiment
    from fedsafe.rundir import RunDir

    if resume is not None:
        cfg = load_config(RunDir.open(resume).config_path)
    cfg = cfg or ExperimentConfig()
    token = uuid.uuid4().hex
    outcome: dict = {}

    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context):
        def engine_factory(trainer, clients):
            register_local(token, trainer, clients)
            engine = FlowerEngine(grid, cfg, clients, token=token)
            engine.trainer = trainer  # the one in-memory model: the server's LoRA layout (fl.lora_aggregation)
            return engine

        outcome["result"] = run_experiment(None if resume is not None else cfg, resume=resume,
                                           progress=progress, engine_factory=engine_factory)

    client_app = ClientApp()
    client_app.train()(handle_train)
    client_app.query()(handle_query)
    client_app.query("decrypt")(handle_decrypt)

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not log.isEnabledFor(logging.DEBUG):
        flwr_logger.setLevel(logging.WARNING)
    try:
        with _SIMULATION_LOCK, _thread_backend():
            _run_simulation(num_supernodes=cfg.num_clients, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                            client_app=client_app, server_app=server_app, backend_name="fedsafe-thread",
                            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        flwr_logger.setLevel(level)
        unregister_local(token)
    if "result" not in outcome:
        raise FedsafeError("the Flower simulation ended without a result (see the log above)")
    return outcome["result"]
