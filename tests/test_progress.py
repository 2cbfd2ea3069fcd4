"""fedsafe.progress: the one rich progress setup every long loop uses (issue 34 item 10)."""

import re
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

import fedsafe.progress as fp

SRC = Path(fp.__file__).resolve().parent


def _describe(columns) -> list:
    return [(type(c).__name__, getattr(c, "text_format", None)) for c in columns]


def test_columns_are_the_setups_they_replace():
    # the run's bar (pipeline) and the per-prompt evaluation bar (generation) before the helper existed
    run_bar = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    prompts_bar = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    plain_bar = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    assert _describe(fp.progress_columns(eta=True)) == _describe(run_bar)
    assert _describe(fp.progress_columns(unit="prompts", eta=True)) == _describe(prompts_bar)
    assert _describe(fp.progress_columns()) == _describe(plain_bar)


class _Spy(Progress):
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _Spy.made.append(self)


@pytest.fixture
def spy(monkeypatch):
    _Spy.made = []
    monkeypatch.setattr(fp, "Progress", _Spy)
    return _Spy.made


def test_track_counts_items_or_their_size(spy):
    batches = [["a", "b", "c"], ["d"], ["e", "f", "g"]]
    console = Console(file=open("/dev/null", "w"))
    assert list(fp.track(batches, "answers", size=len, unit="prompts", console=console)) == batches
    (task,) = spy[0].tasks
    assert (task.description, task.total, task.completed) == ("answers", 7, 7)  # prompts, not batches
    assert list(fp.track(batches, "batches", console=console)) == batches
    assert (spy[1].tasks[0].total, spy[1].tasks[0].completed) == (3, 3)


def test_progress_task_advances_and_stays_quiet_when_disabled_or_nested(spy):
    console = Console(file=open("/dev/null", "w"))
    with fp.progress_task("responses", 5, console=console) as advance:
        advance(2)
        advance()
    assert (spy[0].tasks[0].total, spy[0].tasks[0].completed) == (5, 3)
    with fp.progress_task("responses", 5, enabled=False) as advance:
        advance(4)  # a no-op
    assert len(spy) == 1  # disabled: no bar built
    with fp.progress_bar(console=console) as outer:  # a run's live bars already on screen
        outer.add_task("rounds", total=1)
        with fp.progress_task("responses", 5, console=console) as advance:
            advance(5)  # rich >= 14 stacks the bars; rich 13 raises LiveError and the task shows nothing
    inner = spy[-1]
    assert inner is not spy[-2] and not inner.live.is_started and [t.completed for t in inner.tasks] in ([], [5])


def test_one_progress_setup_in_the_package():
    # every bar is built by fedsafe.progress
    pattern = re.compile(r"\bProgress\(")
    builders = sorted(p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
                      if pattern.search(p.read_text(encoding="utf-8")))
    assert set(builders) <= {"progress.py"}, builders
