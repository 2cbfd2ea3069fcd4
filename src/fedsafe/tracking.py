"""Experiment trackers: stream every metrics.jsonl record to TensorBoard, MLflow or Weights & Biases.

``metrics.jsonl`` stays the source of truth. :meth:`fedsafe.rundir.RunDir.log` writes each record there
first and then hands it to the run's tracker, so the tracker sees exactly the records of the file, in order,
as they are written (round, client, eval, dp, posthoc, heldout, ...). A tracker that fails is reported once
and switched off; the run and its metrics.jsonl go on.

Each record becomes scalars at step ``record["round"]``. The tag is the record's type, then the values of the
keys that say whose numbers they are (``method``, ``defense``), then the field, with nested dicts flattened: an
eval record ``{"type": "eval", "method": "fedavg", "defense": "none", "rule": 0.9}`` gives
``eval/fedavg/none/rule``. A client record puts the field before the client, ``clients/<field>/<client_id>``:
``{"type": "client", "round": 2, "client_id": "c3", "loss": 1.2}`` gives ``clients/loss/c3 = 1.2`` at step 2, so
the clients' values of one field sort together (MLflow and wandb group by prefix) and TensorBoard's Custom
Scalars tab draws one chart per field with a line per client, not one chart per client and field. A
``train`` record (the clients' mean loss after each local step) gives ``train/loss`` at its ``step``, the local
step counted over the rounds. The ``heldout`` record (written after training) puts ``heldout/before`` at step 0,
where it was measured, and ``heldout/after`` at its round. Strings, lists and booleans are not scalars and are
skipped (they stay in metrics.jsonl).

Offline by default: TensorBoard event files go to ``<run_dir>/tensorboard``; MLflow writes to a SQLite store
``<output_dir>/mlflow.db`` beside the run directories (one store for all runs, so ``mlflow ui`` compares
them), artifacts under ``<output_dir>/mlflow-artifacts``; wandb writes ``<run_dir>/wandb`` in offline mode
unless it has credentials (``WANDB_API_KEY`` or a login), and falls back to offline when the network fails.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

# backend -> (module that must import, the pip extra that installs it)
BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
            "wandb": ("wandb", "wandb")}
# keys whose values name the thing a record's numbers are about; they become part of the tag
IDENTITY_KEYS = ("client_id", "method", "defense")
# (record type, field) measured at step 0 whatever the record's round: the held-out loss before training
STEP_ZERO_FIELDS = {("heldout", "before")}


def missing_package_message(backend: str) -> str | None:
    """None when ``backend``'s package is importable, else the message that tells how to install it."""
    module, extra = BACKENDS[backend]
    try:
        if importlib.util.find_spec(module) is not None:
            return None
    except ValueError:  # already imported without a spec (a stand-in): it is there
        return None
    return (f"tracking.backend={backend} needs the {module} package, which is not installed: "
            f"pip install 'fedsafe[{extra}]' (or set tracking.backend: none)")


def record_points(record: dict) -> list[tuple[int, dict[str, float]]]:
    """[(step, {tag: value})] of one metrics record, by step; see the module docstring for the naming."""
    kind = str(record.get("type", "record"))
    step = record.get("step", record.get("round", 0))  # a per-step train record counts local steps
    step = int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else 0
    skip = {"type", "round", "step", "local_step", "seed", *IDENTITY_KEYS}
    fields = {k: v for k, v in record.items() if k not in skip}
    at_zero = {k: fields.pop(k) for k in list(fields) if (kind, k) in STEP_ZERO_FIELDS}
    points = [(0, _tags(kind, record, at_zero))] if at_zero else []
    points.append((step, _tags(kind, record, fields)))
    return [(s, scalars) for s, scalars in points if scalars]


def _tags(kind: str, record: dict, fields: dict) -> dict[str, float]:
    if kind == "client" and record.get("client_id") is not None:  # clients/<field>/<client>: a chart per field
        client = _tag_part(record["client_id"])
        return {f"clients{path}/{client}": v for path, v in _flatten("", fields)}
    prefix = "/".join([kind] + [_tag_part(record[k]) for k in IDENTITY_KEYS if record.get(k) is not None])
    return dict(_flatten(prefix, fields))


def _flatten(prefix: str, obj: Any) -> Iterable[tuple[str, float]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(f"{prefix}/{_tag_part(k)}", v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        yield prefix, float(obj)
    elif hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        yield from _flatten(prefix, obj.item())


def _tag_part(value: Any) -> str:
    # MLflow accepts alphanumerics, _ - . space and /; keep tags identical across backends
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in str(value))


def _flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in config.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flat_config(v, key))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return out


class Tracker:
    """A tracker receives each metrics record (:meth:`log`) and is closed at the end of the run."""

    name = "none"

    def log(self, record: dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files under ``<run_dir>/tensorboard`` (``tensorboard --logdir <output_dir>`` shows all runs)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
        self.writer.flush()
        self.config = config
        self.last: dict[str, float] = {}  # the latest value of each run-level scalar: the HPARAMS panel's metrics
        self.client_fields: set[str] = set()  # client fields seen so far (one multi-line chart each)

    def log(self, record: dict) -> None:
        fields = set(self.client_fields)
        for step, scalars in record_points(record):
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
                if tag.startswith("clients/"):
                    fields.add(tag[len("clients/"):tag.rindex("/")])
                else:
                    self.last[tag] = value
        if fields != self.client_fields:  # a new client field: its chart in the Custom Scalars tab
            self.client_fields = fields
            self.writer.add_custom_scalars({"clients": {
                field: ["Multiline", [rf"^clients/{re.escape(field)}/[^/]+$"]] for field in sorted(fields)}})
        self.writer.flush()  # records are few (one per client and round): make each visible at once

    def close(self) -> None:
        """Write the HPARAMS panel (the config's scalar settings against the run's last values), then close."""
        hparams = {k: v for k, v in _flat_config(self.config).items() if len(v) <= 100}
        if hparams and self.last:
            self.writer.add_hparams(hparams, {f"hparams/{k}": v for k, v in self.last.items()}, run_name="hparams")
        self.writer.close()


class MLflowTracker(Tracker):
    """One MLflow run per fedsafe run, in a local SQLite store by default (no server needed)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict, project: str, uri: str | None):
        from mlflow.tracking import MlflowClient

        for noisy in ("mlflow", "alembic"):  # the SQLite store's migrations print INFO lines into the run's console
            logging.getLogger(noisy).setLevel(logging.WARNING)
        run_dir = Path(run_dir).resolve()
        self.run_dir = run_dir
        self.uri = uri or f"sqlite:///{run_dir.parent / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(project)
        if experiment is None:
            artifacts = (run_dir.parent / "mlflow-artifacts").as_uri() if uri is None else None
            experiment_id = self.client.create_experiment(project, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        state = _read_state(run_dir).get("mlflow", {})
        if state.get("uri") == self.uri and state.get("run_id"):  # --resume: continue the same MLflow run
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                         tags={"fedsafe.run_dir": str(run_dir)})
            self.run_id = run.info.run_id
            params = list(_flat_config(config).items())
            from mlflow.entities import Param

            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch, 6000 chars each
                self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in params[i:i + 100]])
            _write_state(run_dir, "mlflow", {"uri": self.uri, "run_id": self.run_id})

    def log(self, record: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, step) for step, scalars in record_points(record)
                   for tag, value in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self) -> None:
        """Upload the run's files as artifacts (config, metrics, results, report, plots, the final and post-hoc
        adapters), then mark the run finished."""
        for name in ("config.yaml", "env.json", "metrics.jsonl", "results.csv", "report.md", "report.html",
                     "gate.json"):
            if (self.run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        for folder, where in (("plots", "plots"), ("adapters/final", "adapters/final"),
                              ("adapters/posthoc", "adapters/posthoc")):
            if (self.run_dir / folder).is_dir():
                self.client.log_artifacts(self.run_id, str(self.run_dir / folder), artifact_path=where)
        self.client.set_terminated(self.run_id)


class WandbTracker(Tracker):
    """A wandb run under ``<run_dir>/wandb``: online with credentials, else (or when that fails) offline."""

    name = "wandb"

    def __init__(self, run_dir: Path, config: dict, project: str, mode: str):
        import wandb

        run_dir = Path(run_dir).resolve()
        self.wandb = wandb
        if mode == "auto":
            mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_has_credentials() else "offline")
        state = _read_state(run_dir).get("wandb", {})
        kwargs = dict(project=project, dir=str(run_dir), name=run_dir.name, config=config,
                      id=state.get("id"), resume="allow" if state.get("id") else None)
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as exc:  # no network or a refused login: keep the numbers locally
            if mode != "online":
                raise
            log.warning("wandb could not start online (%s): logging offline under %s/wandb", exc, run_dir)
            self.run = wandb.init(mode="offline", **kwargs)
        self.run.define_metric("round")
        self.run.define_metric("*", step_metric="round")  # records arrive out of step order after --resume
        _write_state(run_dir, "wandb", {"id": self.run.id})

    def log(self, record: dict) -> None:
        for step, scalars in record_points(record):
            self.run.log({"round": step, **scalars})

    def close(self) -> None:
        self.run.finish()


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def _read_state(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "tracking.json").read_text())
    except (OSError, ValueError):
        return {}


def _write_state(run_dir: Path, backend: str, state: dict) -> None:
    from fedsafe.io import atomic_write_text

    data = _read_state(run_dir)
    data[backend] = state
    atomic_write_text(Path(run_dir) / "tracking.json", json.dumps(data, indent=2))


def open_tracker(tracking, run_dir: Path, config: dict) -> Tracker | None:
    """The tracker that ``tracking`` (a :class:`fedsafe.config.TrackingConfig`) asks for; None for ``none``."""
    from fedsafe.errors import ConfigError

    backend = tracking.backend
    if backend == "none":
        return None
    problem = missing_package_message(backend)
    if problem:
        raise ConfigError(problem)
    if backend == "tensorboard":
        return TensorBoardTracker(run_dir, config)
    if backend == "mlflow":
        return MLflowTracker(run_dir, config, tracking.project, tracking.uri)
    return WandbTracker(run_dir, config, tracking.project, tracking.wandb_mode)
