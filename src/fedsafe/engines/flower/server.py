"""The Flower engine's server side: :class:`FlowerEngine`, the engine the pipeline calls every round in the ServerApp.

It sends (global adapter, :class:`RoundConfig`) to the SuperNode that holds each sampled client through a Flower
``Grid`` and turns the replies back into :class:`ClientResult` objects; under secure aggregation a key-holding
SuperNode decrypts the round's encrypted sum (:meth:`FlowerEngine.decrypt`). See :mod:`fedsafe.engines.flower`.
"""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np
import torch
from flwr.app import Message, RecordDict

from fedsafe.config import ExperimentConfig, dump_config
from fedsafe.engines.flower import trace as _trace
from fedsafe.engines.flower.codec import DECRYPT, QUERY, TRAIN, decode_result, encode_decrypt, encode_train, run_meta
from fedsafe.engines.flower.node import HE_CONTEXT, encrypted_keys
from fedsafe.errors import DECRYPT_REFUSED, DecryptRefused, FedsafeError
from fedsafe.data.client_data import ClientData
from fedsafe.fl.client import ClientResult, RoundConfig

log = logging.getLogger("fedsafe")

_POLL_S = 0.05  # how often the grid is polled for replies


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
        content = RecordDict({"fedsafe": run_meta(self.config_yaml, self.token, self.he_key_id)})
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
        """Remote key holder of the plug-in that encrypts updates (secure aggregation's server party): a SuperNode
        decrypts the sum.

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
        reasons = []
        for cid, node in order:
            delta, reason = self._decrypt_on(node, aggregate, mask, round, timeout)
            if delta is not None:
                log.info("round %d: SuperNode %d (client %s) decrypted the encrypted sum", round, node, cid)
                return delta
            if DECRYPT_REFUSED in reason:  # the key holder's minimum sum size: the round is skipped, none else asked
                raise DecryptRefused(f"{DECRYPT_REFUSED} (SuperNode {node}, client {cid}): {reason}")
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
    keys = encrypted_keys(cfg)
    if keys is not None:
        rule_need, rule_why = keys.min_clients, f"{keys.section}.min_clients={keys.min_clients}"
    else:
        rule_need = min_clients(cfg.aggregator.name, cfg.aggregator.params)
        rule_why = f"aggregator {cfg.aggregator.name} needs {rule_need}"
    if rule_need > need:
        need, why = rule_need, why + [rule_why]
    return need, "; ".join(why)


def server_keys(cfg: ExperimentConfig, path: str | None):
    """The ServerApp's public CKKS key file (run config ``he-context``) when a plug-in encrypts updates
    (:func:`fedsafe.engines.flower.node.encrypted_keys`, i.e. ``secure_agg.enabled``), else None."""
    keys = encrypted_keys(cfg)
    if keys is None:
        if path:
            log.warning("run config %s=%s is ignored: no plug-in of this config encrypts updates", HE_CONTEXT, path)
        return None
    if not path:
        raise FedsafeError(f"{keys.section}.enabled in a Flower deployment needs the server's public CKKS context: "
                           "`fedsafe flower keys --out DIR --config CONFIG`, then `fedsafe flower app ... "
                           f"--he-context DIR/server.ctx` (or `fedsafe flower submit ... --he-context ...`)")
    return keys.keyring.read(path, "server", keys.params, who=f"run config {HE_CONTEXT}")
