"""Atomic writes: a file is written whole to a temp file in its folder, fsynced, then renamed into place.

A crash, a full disk or a read-only file system never leaves a half-written file: the old file stays, and the
error names the file being written. Every file gets one mode, ``0o666 & ~umask`` (:func:`default_file_mode`),
unless a secret asks for ``mode=0o600``. A leaf module (standard library only; torch only inside
:func:`atomic_torch_save`), so the run directory, the model card, the trackers, the results and every plug-in
write through it without importing each other.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not atomic across threads, but only read here)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode of every file fedsafe writes in a run directory: ``0o666 & ~umask`` (0644 under the usual
    umask 022), as ``open()`` would give. Files written through a temp file (``mkstemp`` makes them 0600) are
    given this mode before the rename, so adapters, reports, checkpoints and metrics.jsonl (also after a
    resume) all have one mode. For private runs set a stricter umask (``umask 077``). Secrets (the clients'
    CKKS context, node keys) pass an explicit ``mode=0o600`` instead."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """The mode of directories fedsafe makes: ``0o777 & ~umask`` (what ``mkdir`` gives; ``mkdtemp`` gives 0700)."""
    return 0o777 & ~current_umask()


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename into it survives a power loss (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Write a file via a temp file in the same folder, fsync and an atomic rename; mode
    :func:`default_file_mode` unless ``mode`` is given."""
    atomic_write_bytes(Path(path), text.encode("utf-8"), mode=mode)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write bytes via a temp file in the same folder and an atomic rename; the file gets permissions ``mode``
    (default :func:`default_file_mode`).

    The temp file is created 0600 and only then given ``mode``, so a secret (``mode=0o600``) is never
    readable by others, not even for a moment.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise error_naming(exc, path) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk or a read-only file system: the old file is untouched
        raise error_naming(exc, path) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def error_naming(exc: OSError, path) -> OSError:
    """``exc`` naming the file being written (a failed write to an open file names none; a failed temp file
    names the temp file, which the user never sees)."""
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` through a temp file, fsync and an atomic rename (mode :func:`default_file_mode`)."""
    import torch

    buf = io.BytesIO()  # serialised in memory: a full disk is then an OSError of the write, naming the path
    torch.save(obj, buf)
    atomic_write_bytes(Path(path), buf.getvalue())
