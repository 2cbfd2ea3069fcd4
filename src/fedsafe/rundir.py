"""A self-describing run directory with atomic writes.

Layout: config.yaml, env.json, metrics.jsonl, checkpoint/state.pt, adapters/round_XXXX/,
adapters/final/, adapters/posthoc/, results.csv, report.md/.html, plots/.

Files are written whole to a temp file in the same folder, fsynced, then renamed (adapters: a temp folder whose
files and the folder itself are fsynced), so a crash, a full disk or a read-only file system never leaves a
half-written checkpoint or adapter. Every file of a run directory has one mode, ``0o666 & ~umask``, and every
folder ``0o777 & ~umask`` (0644 / 0755 under the usual umask 022; run under ``umask 077`` for 0600 / 0700),
also after a resume. The checkpoint is read with ``torch.load(weights_only=True)`` only: resuming a run
directory someone else wrote never unpickles arbitrary objects.
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
from fedsafe.io import (atomic_torch_save, atomic_write_text, default_dir_mode, default_file_mode, error_naming,
                        fsync_dir)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# The resume checkpoint: torch.load(weights_only=True) only, never a full unpickle
# ------------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "fedsafe-checkpoint/2"
# objects a checkpoint may rebuild besides tensors and plain values: rebuilt from their __getstate__ dict
# (itself restricted to tensors and plain values), never by unpickling; a new stateful class is added here
SAFE_CHECKPOINT_CLASSES = frozenset({"sklearn.linear_model._logistic.LogisticRegression"})
_NDARRAY, _NPSCALAR, _STRARRAY, _SET, _OBJECT = ("__fedsafe_ndarray__", "__fedsafe_npscalar__",
                                                 "__fedsafe_strarray__", "__fedsafe_set__", "__fedsafe_object__")


def _encode_state(obj, where: str):
    """``obj`` as tensors, plain values, lists, tuples and dicts only (what ``weights_only=True`` loads)."""
    import numpy as np

    if isinstance(obj, np.generic):  # before float: np.float64 is a float subclass
        return {_NPSCALAR: torch.from_numpy(np.asarray(obj).copy())}
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor)):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "biufc":
            return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(obj).copy())}
        if obj.dtype.kind in "US":
            return {_STRARRAY: obj.tolist(), "dtype": obj.dtype.str}
        raise TypeError(f"checkpoint: {where} is a numpy array of dtype {obj.dtype}, which cannot be stored safely")
    if isinstance(obj, dict):
        return {k: _encode_state(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_encode_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_encode_state(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, (set, frozenset)):
        return {_SET: [_encode_state(v, where) for v in sorted(obj, key=repr)]}
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if name in SAFE_CHECKPOINT_CLASSES:
        return {_OBJECT: name, "state": _encode_state(obj.__getstate__(), f"{where}.<{name}>")}
    raise TypeError(f"checkpoint: {where} is a {name}, which a weights-only checkpoint cannot hold (give its "
                    "state_dict tensors and plain values, or add the class to rundir.SAFE_CHECKPOINT_CLASSES)")


def _decode_state(obj):
    import numpy as np

    if isinstance(obj, dict):
        if len(obj) == 1 and _NDARRAY in obj:
            return obj[_NDARRAY].numpy()
        if len(obj) == 1 and _NPSCALAR in obj:
            return obj[_NPSCALAR].numpy()[()]
        if len(obj) == 2 and _STRARRAY in obj:
            return np.array(obj[_STRARRAY], dtype=obj["dtype"])
        if len(obj) == 1 and _SET in obj:
            return {_decode_state(v) for v in obj[_SET]}
        if len(obj) == 2 and _OBJECT in obj:
            name = obj[_OBJECT]
            if name not in SAFE_CHECKPOINT_CLASSES:
                raise ConfigError(f"checkpoint: holds a {name!r}, which is not a class a checkpoint may rebuild")
            import importlib

            module, _, cls_name = name.rpartition(".")
            cls = getattr(importlib.import_module(module), cls_name)
            instance = cls.__new__(cls)
            instance.__setstate__(_decode_state(obj["state"]))
            return instance
        return {k: _decode_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_decode_state(v) for v in obj)
    return obj


def save_checkpoint(state: dict, path: Path) -> None:
    """Write a resume checkpoint that loads with ``torch.load(weights_only=True)`` (atomic, fsynced)."""
    atomic_torch_save({**_encode_state(state, "state"), "format": CHECKPOINT_FORMAT}, path)


def load_checkpoint_state(path: Path) -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``: a file that needs a full unpickle (which runs
    whatever code its author put in it) is refused with a message naming it, never unpickled."""
    import pickle

    path = Path(path)
    try:
        payload = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        import re

        found = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:  # not a pickle of disallowed objects: a damaged or foreign file
            raise ConfigError(f"cannot resume from {path}: not a readable checkpoint (damaged, or not written "
                              "by fedsafe)") from None
        why = f" (it names {(found.group(1) or found.group(2)).rstrip('.,')})"
        raise ConfigError(
            f"refusing to resume from {path}: it holds objects that only a full unpickle could load{why}, and "
            "unpickling a file runs whatever code its author put in it. A checkpoint written "
            "by this fedsafe never needs that: this one is from an older fedsafe or was not written by "
            "fedsafe; start the run again instead of resuming it") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else "damaged, or not written by fedsafe"
        raise ConfigError(f"cannot resume from {path}: not a readable checkpoint ({type(exc).__name__}: "
                          f"{detail})") from None
    if not isinstance(payload, dict):
        raise ConfigError(f"cannot resume from {path}: not a fedsafe checkpoint (a {type(payload).__name__})")
    if payload.get("format") == CHECKPOINT_FORMAT:
        return _decode_state({k: v for k, v in payload.items() if k != "format"})
    if "server" in payload:  # an older checkpoint that holds only tensors and plain values
        return payload
    raise ConfigError(f"cannot resume from {path}: not a fedsafe checkpoint (format {payload.get('format')!r})")


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
    try:  # refusal metrics and drop_refusals filters depend on it: a new detector changes both
        from fedsafe.evaluation.refusal import detector_version

        info["refusal_detector"] = detector_version()
    except Exception as exc:  # a missing or damaged detector file must not stop a run that never uses it
        info["refusal_detector"] = f"unavailable: {exc}"
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    if device is not None:
        info["device"] = device
    if seed is not None:
        info["seed"] = seed
    return info


class RunDir:
    """Paths and writers of one run directory."""

    current: Path | None = None  # the run directory this process last created or opened (named in CLI errors)

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
        RunDir.current = path
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """Open an existing run directory (for --resume and report)."""
        p = Path(path)
        if not (p / "config.yaml").exists():
            raise ConfigError(f"{p} is not a fedsafe run directory (no config.yaml)")
        RunDir.current = p
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
        """Append one JSON record to metrics.jsonl (flushed and fsynced; a torn last line is skipped on read)."""
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=_json_default) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise error_naming(exc, self.metrics_path) from exc
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
        """Write a PEFT-loadable adapter for ``vec`` through PEFT's ``save_pretrained`` (adapter_config.json,
        safetensors and a README.md model card with the run's facts), atomically.

        ``base_model_name_or_path`` is the base model's hub id where there is one (fedsafe.hub), not this
        machine's cache path; the card's ``fedsafe`` metadata keeps the local path."""
        from fedsafe.hub import CARD_FILE, model_card, portable_base_id, set_card_base_model

        target = self.adapter_dir(tag)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        except OSError as exc:
            raise error_naming(exc, target) from exc
        cfg = peft_model.peft_config["default"]
        local_base = cfg.base_model_name_or_path
        aligned = bool(((self.config_dict() or {}).get("model") or {}).get("align"))
        base_id = local_base if aligned else portable_base_id(local_base)
        try:
            # PEFT's names carry the adapter name (lora_A.default.weight); FlatLoRA's specs follow the same order
            names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
            state = dict(zip(names, flat.state_dict(vec).values())) if len(names) == len(flat.specs) else None
            if state is None or any(n.replace(".default.", ".") != s.name for n, s in zip(names, flat.specs)):
                raise RuntimeError("the model's trainable parameters changed since FlatLoRA was built")
            atomic_write_text(tmp / CARD_FILE, model_card(str(tag), base_id, local_base, self.path))
            cfg.base_model_name_or_path = base_id
            try:
                peft_model.save_pretrained(str(tmp), selected_adapters=["default"], state_dict=state,
                                           save_embedding_layers=False, safe_serialization=True)
            except Exception as exc:  # safetensors reports a full disk as its own error, not an OSError
                err = _as_os_error(exc, tmp / "adapter_model.safetensors")
                if err is exc:
                    raise
                raise err from exc
            finally:
                cfg.base_model_name_or_path = local_base
            set_card_base_model(tmp, base_id if base_id != local_base or not local_base else None)
            file_mode = default_file_mode()
            for f in tmp.iterdir():  # one mode for every file (PEFT's writes and ours differ), on disk
                os.chmod(f, file_mode)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            os.chmod(tmp, default_dir_mode())  # mkdtemp made it 0700
            fsync_dir(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except OSError as exc:  # a full disk or a read-only file system: the previous adapter stays as it was
            raise error_naming(exc, target) from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def config_dict(self) -> dict | None:
        """The run's config.yaml as a dict (None before it is written)."""
        import yaml

        try:
            data = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return None
        return data if isinstance(data, dict) else None


def _as_os_error(exc: Exception, path: Path) -> Exception:
    """An OSError for a write that failed in a library (safetensors: ``IoError(Os { code: 28, ... })``)."""
    import errno
    import re

    if isinstance(exc, OSError):
        return exc
    code = re.search(r"code: (\d+)", str(exc))
    if code:
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path))
    if "No space left" in str(exc):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return exc


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
