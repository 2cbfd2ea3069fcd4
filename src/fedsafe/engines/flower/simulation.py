"""Flower's Simulation Runtime with a thread backend (no Ray): ``fedsafe run CONFIG --engine flower``.

One virtual SuperNode per client (``partition-id`` = client index); the ClientApp runs in this process on the
pipeline's own model (:func:`fedsafe.engines.flower.trainer_cache.register_local`), so the result equals the
in-process engine's.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import types
import uuid
from pathlib import Path

from flwr.app import Context, Message

from fedsafe.config import ExperimentConfig, load_config
from fedsafe.engines.flower.client_app import handle_decrypt, handle_query, handle_train
from fedsafe.engines.flower.server import FlowerEngine
from fedsafe.engines.flower.trainer_cache import register_local, unregister_local
from fedsafe.errors import FedsafeError

log = logging.getLogger("fedsafe")


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

