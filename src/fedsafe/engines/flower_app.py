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
``he-context="/keys/clients.ctx"`` (the clients' secret-key file of the same key set).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsafe.engines.flower import HE_CONTEXT, FlowerEngine, handle_decrypt, handle_query, handle_train, server_keys

log = logging.getLogger("fedsafe")

client_app = ClientApp()


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Local training of the client this SuperNode holds."""
    return handle_train(message, context)


@client_app.query()
def query(message: Message, context: Context) -> Message:
    """Which client this SuperNode holds."""
    return handle_query(message, context)


@client_app.query("decrypt")
def decrypt(message: Message, context: Context) -> Message:
    """secure_agg: decrypt the round's encrypted sum with this node's secret key."""
    return handle_decrypt(message, context)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the fedsafe pipeline with local training on the SuperNodes."""
    from fedsafe.config import load_config
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
    keys = server_keys(cfg, str(run_config.get(HE_CONTEXT, "") or "") or None)  # public CKKS context or None
    result = run_experiment(None if resume else cfg, resume=resume, progress=False,
                            he_server_context=keys.context if keys else None,
                            engine_factory=lambda trainer, clients: FlowerEngine(
                                grid, cfg, clients, he_key_id=keys.key_id if keys else None))
    log.info("fedsafe run directory: %s", result.run_dir)
    print(f"fedsafe run directory: {result.run_dir}", flush=True)
