"""The fedsafe Flower app for a real deployment (SuperLink + SuperNodes + ``flwr run``).

``fedsafe flower app DIR --config CONFIG`` writes a Flower app directory whose components point here.
Run config keys (``[tool.flwr.app.config]``, override with ``flwr run -c``):

- ``config-yaml``: the experiment config as YAML (the app writer embeds it, so the server machine needs
  no copy of the file);
- ``set``: extra ``key=value`` overrides separated by ``;`` (e.g. ``"fl.rounds=2;seed=1"``);
- ``resume``: a run directory on the server machine to continue (empty: a new run);
- ``he-context``: with ``secure_agg.enabled``, the server's public CKKS context (``server.ctx`` of
  ``fedsafe flower keys``) on the server machine; a file holding the secret key is refused.

SuperNode node config (``flower-supernode --node-config``): ``partition-id=N`` (the config's client N)
or ``client-id="client_NN"``; optionally ``data-path="/my/data.jsonl"`` (train on the node's own file,
with ``instruction-field`` / ``response-field`` / ``role``); with ``secure_agg.enabled``,
``he-context="/keys/clients.ctx"`` (the clients' secret-key file of the same key set); ``worker-dir="/dir"``
(set by ``fedsafe flower supernode``): the private directory of the node's warm worker.

Flower starts a new process for every message, so the ClientApp here is a thin handler: ``train`` and
``decrypt`` go to the SuperNode's warm worker (:mod:`fedsafe.engines.flower.worker`), which keeps the model loaded
across rounds; ``query`` needs no model and is answered here. Neither torch nor transformers is imported at
module level; only without a worker does a message build the model in this process (with a log line).
"""

from __future__ import annotations

from fedsafe.engines.flower import trace as _trace

_trace.mark("proc_start", at=_trace.process_start_time())
_trace.mark("app_import_start")

import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsafe.engines.flower.node import HE_CONTEXT, WORKER_DIR, query_reply  # noqa: E402  (no torch: see below)
from fedsafe.engines.flower.worker import forward  # noqa: E402

_trace.mark("app_import_end")

log = logging.getLogger("fedsafe")

client_app = ClientApp()


def _in_this_process(kind: str, context: Context) -> None:
    if context.node_config.get(WORKER_DIR):
        return  # forward() logged why the worker could not be used
    log.warning("fedsafe: no warm worker on this SuperNode (node config %s): the %s message loads the model in "
                "this ClientApp process", WORKER_DIR, kind)


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Local training of the client this SuperNode holds: on the node's warm worker, else in this process."""
    if context.node_config.get(WORKER_DIR):
        reply = forward("train", message, context)
        if reply is not None:
            return reply
    _in_this_process("train", context)
    from fedsafe.engines.flower.client_app import handle_train

    return handle_train(message, context)


@client_app.query()
def query(message: Message, context: Context) -> Message:
    """Which client this SuperNode holds (needs no model: neither torch nor transformers is imported)."""
    return Message(query_reply(message.content, context.node_config), reply_to=message)


@client_app.query("decrypt")
def decrypt(message: Message, context: Context) -> Message:
    """secure_agg: decrypt the round's encrypted sum with this node's secret key (on the warm worker if any)."""
    if context.node_config.get(WORKER_DIR):
        reply = forward("decrypt", message, context)
        if reply is not None:
            return reply
    from fedsafe.engines.flower.client_app import handle_decrypt

    return handle_decrypt(message, context)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the fedsafe pipeline with local training on the SuperNodes."""
    from fedsafe.config import load_config
    from fedsafe.engines.flower.server import FlowerEngine, server_keys
    from fedsafe.pipeline import run_experiment
    from fedsafe.rundir import RunDir

    if not log.handlers:  # the SuperLink streams this process's output to `flwr run --stream`
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("fedsafe %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    run_config = context.run_config
    resume = str(run_config.get("resume", "") or "") or None
    if resume is not None:
        cfg = load_config(RunDir.open(resume).config_path)
    else:
        overrides = [s.strip() for s in str(run_config.get("set", "") or "").split(";") if s.strip()]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "experiment.yaml"
            path.write_text(str(run_config["config-yaml"]))
            cfg = load_config(path, overrides)
    from fedsafe.plugins import check_config

    check_config(cfg, engine_may_be_flower=True)  # e.g. an omniscient adaptive attack is simulation only
    keys = server_keys(cfg, str(run_config.get(HE_CONTEXT, "") or "") or None)  # public CKKS context or None
    result = run_experiment(None if resume else cfg, resume=resume, progress=False,
                            he_server_context=keys.context if keys else None,
                            engine_factory=lambda trainer, clients: FlowerEngine(
                                grid, cfg, clients, he_key_id=keys.key_id if keys else None))
    log.info("fedsafe run directory: %s", result.run_dir)
    print(f"fedsafe run directory: {result.run_dir}", flush=True)
