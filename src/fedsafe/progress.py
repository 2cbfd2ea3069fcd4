"""The one rich progress setup: every long loop in fedsafe shows the same bar (description, bar, done/total,
elapsed time and, where the rate is steady enough to mean something, an ETA).

- :func:`progress_bar` builds the :class:`rich.progress.Progress` (the run's federated rounds, the alignment
  pass): a caller that adds and updates tasks itself.
- :func:`track` yields items under a bar, counting one per item or ``size(item)`` per item (prompts in a batch).
- :func:`progress_task` is a context manager around one task that yields an ``advance(n)`` callable; it
  shows nothing when disabled or when another live display (a run's own bars) is already on screen.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

T = TypeVar("T")


def progress_columns(unit: str | None = None, eta: bool = False) -> list[ProgressColumn]:
    """The columns of every fedsafe bar: description, bar, done/total [unit], elapsed [, eta remaining]."""
    columns: list[ProgressColumn] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    columns.append(TimeElapsedColumn())
    if eta:
        columns += [TextColumn("eta"), TimeRemainingColumn()]
    return columns


def progress_bar(unit: str | None = None, eta: bool = False, console: Console | None = None,
                 transient: bool = True, disable: bool = False) -> Progress:
    """A :class:`rich.progress.Progress` with :func:`progress_columns` (``transient``: erased when done)."""
    return Progress(*progress_columns(unit, eta), console=console, transient=transient, disable=disable)


def track(items: Sequence[T], description: str, size: Callable[[T], int] | None = None, unit: str | None = None,
          eta: bool = False, console: Console | None = None) -> Iterator[T]:
    """Yield ``items`` under a transient bar that advances by ``size(item)`` per item (default 1)."""
    with progress_bar(unit, eta, console) as prog:
        task = prog.add_task(description, total=sum(map(size, items)) if size else len(items))
        for item in items:
            yield item
            prog.advance(task, size(item) if size else 1)


@contextmanager
def progress_task(description: str, total: int, enabled: bool = True, unit: str | None = None, eta: bool = False,
                  console: Console | None = None) -> Iterator[Callable[[int], None]]:
    """One task's ``advance(n=1)``; a no-op when ``enabled`` is False or another live display is running."""
    from rich.errors import LiveError

    def nothing(advance: int = 1) -> None:
        return None

    if not enabled:
        yield nothing
        return
    prog = progress_bar(unit, eta, console if console is not None else Console(stderr=True))
    try:
        prog.start()
    except LiveError:  # inside someone else's live display: no bar rather than a crash
        yield nothing
        return
    task = prog.add_task(description, total=total)
    try:
        yield lambda advance=1: prog.advance(task, advance)
    finally:
        prog.stop()


__all__ = ["progress_bar", "progress_columns", "progress_task", "track"]
