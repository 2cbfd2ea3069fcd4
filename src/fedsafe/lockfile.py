"""requirements.lock: read the pinned environment and compare it with what is installed (standard library only).

``scripts/lock.py`` writes and checks the lock (``make lock``); ``fedsafe info`` and each run's env.json record
:func:`lock_info`, so a result names the exact environment it came from.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

LOCK_NAME = "requirements.lock"


def canonical_name(name: str) -> str:
    """PEP 503 name: ``Foo_Bar.baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """(pins {canonical name: version}, header {key: value}) of a lock file."""
    pins, header = {}, {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("# ") and ": " in line:
            key, value = line[2:].split(": ", 1)
            header[key.strip()] = value.strip()
        elif line and not line.startswith("#"):
            name, version = line.split("#")[0].strip().split("==")
            pins[canonical_name(name)] = version.strip()
    return pins, header


def find_lock() -> Path | None:
    """The lock of the source tree fedsafe is installed from (editable installs), else None."""
    path = Path(__file__).resolve().parents[2] / LOCK_NAME
    return path if path.is_file() else None


def installed_versions() -> dict[str, str]:
    """{canonical name: version} of every installed distribution."""
    import importlib.metadata as md

    return {canonical_name(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]}


def lock_info(installed: dict[str, str] | None = None) -> dict:
    """The lock's file, SHA-256 and pyproject hash, and every pin the environment does not match."""
    path = find_lock()
    if path is None:
        return {"file": None, "note": "not installed from a source tree with requirements.lock"}
    pins, header = read_lock(path)
    installed = installed_versions() if installed is None else installed
    mismatches = {name: {"locked": version, "installed": installed.get(name)}
                  for name, version in sorted(pins.items()) if installed.get(name) != version}
    return {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "pyproject_deps_sha256": header.get("pyproject-deps-sha256"), "torch": (header.get("torch") or "").split(" (")[0] or None,
            "pins": len(pins), "matches_installed": not mismatches, "mismatches": mismatches}
