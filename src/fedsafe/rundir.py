"""A self-describing run directory with atomic writes.

Layout: config.yaml, env.json, metrics.jsonl, checkpoint/state.pt, adapters/round_XXXX/,
adapters/final/, adapters/posthoc/, results.csv, report.md/.html, plots/.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fedsafe.errors import ConfigError

log = logging.getLogger(__name__)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file via a temp file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write bytes via a temp file in the same folder and an atomic rename; the file gets permissions ``mode``.

    The temp file is created 0600 and only then given ``mode``, so a secret (``mode=0o600``) is never
    readable by others, not even for a moment.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` through a temp file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def environment_info(seed: int | None = None, device: str | None = None) -> dict:
    """Package versions (the main ones, then all), the lock's hash, device and seed (what env.json records)."""
    from fedsafe.lockfile import canonical_name, installed_versions, lock_info

    installed = installed_versions()
    versions = {pkg: installed.get(canonical_name(pkg)) for pkg in (
        "fedsafe", "torch", "transformers", "peft", "datasets", "accelerate", "flwr", "tenseal", "opacus",
        "dp-accounting", "pydantic", "numpy")}
    info = {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "lock": lock_info(installed), "installed": dict(sorted(installed.items())),
            "cuda_available": torch.cuda.is_available(), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    if device is not None:
        info["device"] = device
    if seed is not None:
        info["seed"] = seed
    return info


class RunDir:
    """Paths and writers of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tracker = None  # a fedsafe.tracking.Tracker that sees every record log() writes

    def start_tracking(self, tracking, config: dict) -> None:
        """Stream every record that :meth:`log` writes to the tracker ``tracking`` names (config.tracking)."""
        from fedsafe.tracking import open_tracker

        # on --resume the tracker continues its run (tracking.json): records before the checkpoint are there
        self.tracker = open_tracker(tracking, self.path, config)

    def close_tracking(self) -> None:
        """Finish the tracker's run (artifacts, status); records stay in metrics.jsonl either way."""
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            try:
                tracker.close()
            except Exception as exc:  # the run's own outputs are complete; a tracker must not fail it
                log.warning("tracking: closing %s failed: %s", tracker.name, exc)

    def _track(self, record: dict) -> None:
        try:
            self.tracker.log(record)
        except Exception as exc:
            log.warning("tracking: %s failed (%s: %s); it is switched off, metrics.jsonl has every record",
                        self.tracker.name, type(exc).__name__, exc)
            self.tracker = None

    @classmethod
    def create(cls, output_dir: str | Path, name: str) -> "RunDir":
        """Make ``<output_dir>/<name>-<YYYYmmdd-HHMMSS>`` (suffixed if it exists)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(output_dir) / f"{name}-{stamp}"
        path, i = base, 1
        while path.exists():
            path = Path(f"{base}-{i}")
            i += 1
        path.mkdir(parents=True)
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """Open an existing run directory (for --resume and report)."""
        p = Path(path)
        if not (p / "config.yaml").exists():
            raise ConfigError(f"{p} is not a fedsafe run directory (no config.yaml)")
        return cls(p)

    # --- files -----------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint" / "state.pt"

    def adapter_dir(self, tag: str | int) -> Path:
        """``adapters/round_0003`` for ints, ``adapters/<tag>`` for names (final, posthoc)."""
        return self.path / "adapters" / (f"round_{tag:04d}" if isinstance(tag, int) else tag)

    def write_json(self, name: str, obj) -> None:
        atomic_write_text(self.path / name, json.dumps(obj, indent=2, default=str))

    def log(self, record: dict) -> None:
        """Append one JSON record to metrics.jsonl (flushed and fsynced)."""
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tracker is not None:  # after the file: metrics.jsonl is the source of truth
            self._track(json.loads(json.dumps(record, default=_json_default)))

    def records(self, kind: str | None = None) -> list[dict]:
        """Parsed metrics records (a torn last line from a crash is skipped)."""
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or rec.get("type") == kind:
                out.append(rec)
        return out

    def truncate_metrics_after(self, round_done: int) -> None:
        """On resume: drop records of rounds beyond the checkpoint (the round that was interrupted)."""
        keep = [r for r in self.records() if r.get("round", 0) <= round_done or r.get("type") == "run"]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))

    def save_adapter(self, peft_model, flat, vec: torch.Tensor, tag: str | int) -> Path:
        """Write a PEFT-loadable adapter (adapter_config.json + safetensors) for ``vec``, atomically."""
        from safetensors.torch import save_file

        target = self.adapter_dir(tag)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            cfg = peft_model.peft_config["default"]
            cfg.save_pretrained(str(tmp))
            state = {k: v.contiguous() for k, v in flat.state_dict(vec).items()}
            save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target


def grid_run_dirs(grid_dir: Path) -> list[Path]:
    """The runs of a grid directory (``GRID/runs/*`` holding a config.yaml), sorted; [] for anything else."""
    runs = Path(grid_dir) / "runs"
    return sorted(p for p in runs.iterdir() if (p / "config.yaml").is_file()) if runs.is_dir() else []


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)
