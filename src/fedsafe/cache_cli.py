"""``fedsafe cache info`` / ``fedsafe cache clear --updates``: what fedsafe's on-disk caches hold, and clearing the
grids' client-update caches.

Two kinds of cache: ``$FEDSAFE_CACHE`` (default ``~/.cache/fedsafe``: the dequantised and aligned base models,
generated attack data), shared by every run; and each grid's or run's ``cache/`` folder: ``cache/updates``, the
client trainings a grid shares across its runs (:mod:`fedsafe.fl.update_cache`, at most 4 GiB by default,
``$FEDSAFE_UPDATE_CACHE_LIMIT``), and ``cache/generations``, the evaluation's generations by adapter hash.
Paths given on the command line are grid or run directories, their ``cache/updates`` folder, or a folder of them
(default ``runs``, where grids and runs go unless ``output_dir`` says otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedsafe.errors import ConfigError, FedsafeError

console = Console(stderr=True)
cache_app = typer.Typer(no_args_is_help=True, add_completion=False,
                        help="What fedsafe's caches hold (info) and clearing the grids' client-update caches (clear).")

PATHS_HELP = "grid or run directories, a cache/updates folder, or folders of them (default: runs)"


def _dir_size(path: Path) -> tuple[int, int]:
    """(files, bytes) under ``path``."""
    files = size = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                files += 1
                size += p.stat().st_size
        except OSError:  # removed meanwhile
            continue
    return files, size


def find_cache_dirs(paths: list[Path]) -> list[Path]:
    """The ``cache/`` folders of the grid and run directories in ``paths`` (each path itself or its children)."""
    found: list[Path] = []
    for path in paths:
        if path.name == "updates" and path.parent.name == "cache":
            path = path.parent.parent
        candidates = [path] + (sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else [])
        for cand in candidates:
            if (cand / "cache").is_dir() and (cand / "cache") not in found:
                found.append(cand / "cache")
    return found


def _update_cache(cache_dir: Path):
    """The :class:`~fedsafe.fl.update_cache.UpdateCache` of a grid's ``cache/updates``, with the limit its grid
    last ran with (reuse.json), else the one a new grid would get."""
    from fedsafe.fl.update_cache import UpdateCache

    reuse = cache_dir.parent / "reuse.json"
    try:
        recorded = json.loads(reuse.read_text(encoding="utf-8"))
        if "cache_limit_bytes" in recorded:
            return UpdateCache(cache_dir / "updates", recorded["cache_limit_bytes"])
    except (OSError, json.JSONDecodeError, AttributeError, TypeError):
        pass
    return UpdateCache(cache_dir / "updates")


def cache_rows(paths: list[Path]) -> list[dict]:
    """One row per cache: kind, path, entries (files for a plain folder), size_bytes, limit_bytes (updates only)."""
    from fedsafe.models import cache_dir as fedsafe_cache_dir

    rows = []
    root = fedsafe_cache_dir()
    if root.is_dir():
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            files, size = _dir_size(sub)
            rows.append({"kind": f"$FEDSAFE_CACHE {sub.name}", "path": str(sub), "entries": files,
                         "size_bytes": size, "limit_bytes": None})
    for cache in find_cache_dirs(paths):
        if (cache / "updates").is_dir():
            info = _update_cache(cache).info()
            rows.append({"kind": "client updates", "path": info["path"], "entries": info["entries"],
                         "size_bytes": info["size_bytes"], "limit_bytes": info["limit_bytes"],
                         "oldest_use": info["oldest_use"], "newest_use": info["newest_use"]})
        if (cache / "generations").is_dir():
            files, size = _dir_size(cache / "generations")
            rows.append({"kind": "generations", "path": str(cache / "generations"), "entries": files,
                         "size_bytes": size, "limit_bytes": None})
    return rows


def _default_paths(paths: list[Path] | None) -> list[Path]:
    if paths:
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise ConfigError(f"not found: {', '.join(missing)} (give grid or run directories, or a folder of them)")
        return list(paths)
    return [Path("runs")] if Path("runs").is_dir() else []


@cache_app.command("info")
def info_command(paths: list[Path] = typer.Argument(None, help=PATHS_HELP),
                 json_out: bool = typer.Option(False, "--json", help="one JSON object per cache, sizes in bytes")) -> None:
    """Sizes of $FEDSAFE_CACHE and of the grids' client-update and generation caches, with the update caches' limits."""
    from fedsafe.fl.update_cache import DEFAULT_LIMIT_BYTES, LIMIT_ENV, format_size, resolve_limit

    rows = cache_rows(_default_paths(paths))
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    from fedsafe.models import cache_dir as fedsafe_cache_dir

    table = Table(title="fedsafe caches")
    table.add_column("cache")
    table.add_column("where (its cache/ folder)", overflow="fold")
    for name in ("entries", "size", "limit"):
        table.add_column(name, justify="right", no_wrap=True)
    root = fedsafe_cache_dir()
    for row in rows:
        where = Path(row["path"])
        if where.parent == root:
            kind, shown = where.name, f"$FEDSAFE_CACHE/{where.name}"
        else:
            kind, shown = row["kind"], str(where.parent.parent)
        limit = format_size(row["limit_bytes"]) if row["kind"] == "client updates" else ""
        table.add_row(kind, shown, str(row["entries"]), format_size(row["size_bytes"]), limit)
    Console().print(table)
    print(f"$FEDSAFE_CACHE: {root}")
    total = sum(r["size_bytes"] for r in rows)
    updates = sum(r["size_bytes"] for r in rows if r["kind"] == "client updates")
    print(f"total {format_size(total)}; client updates {format_size(updates)} "
          f"(a new grid's limit: {format_size(resolve_limit())}; {LIMIT_ENV} or --update-cache-limit change it, "
          f"default {format_size(DEFAULT_LIMIT_BYTES)}; `fedsafe cache clear --updates` empties them)")


@cache_app.command("clear")
def clear_command(paths: list[Path] = typer.Argument(None, help=PATHS_HELP),
                  updates: bool = typer.Option(False, "--updates", help="the client-update caches (cache/updates)"),
                  keep: str = typer.Option("0", "--keep", metavar="SIZE",
                                           help="keep the most recently used entries up to this size "
                                                "(e.g. 1GiB) in each cache; default 0, remove all")) -> None:
    """Remove the client updates the grids stored (least recently used first with --keep); a cache a running grid
    holds is left alone."""
    from fedsafe.fl.update_cache import CacheInUse, format_size, parse_size

    if not updates:
        raise ConfigError("say what to clear: --updates (the grids' client-update caches, cache/updates); the "
                          "base models in $FEDSAFE_CACHE are not cleared by fedsafe")
    keep_bytes = parse_size(keep, "--keep")
    if keep_bytes is None:
        raise ConfigError(f"--keep {keep!r}: give a size such as 1GiB, or 0 to remove every entry")
    caches = [c / "updates" for c in find_cache_dirs(_default_paths(paths)) if (c / "updates").is_dir()]
    busy = []
    removed_entries = removed_bytes = 0
    for updates_dir in caches:
        cache = _update_cache(updates_dir.parent)
        try:
            n, size = cache.clear(keep_bytes)
        except CacheInUse:
            busy.append(str(updates_dir))
            continue
        removed_entries += n
        removed_bytes += size
        print(f"{updates_dir}: removed {n} entries ({format_size(size)}), {format_size(cache.size_bytes())} left")
    print(f"removed {removed_entries} entries ({format_size(removed_bytes)}) from {len(caches) - len(busy)} "
          f"update caches")
    if busy:
        raise FedsafeError(f"left alone, in use by a running grid or run: {', '.join(busy)}")
