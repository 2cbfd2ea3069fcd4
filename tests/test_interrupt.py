"""Waiting blind (issue 34 item 6): SIGTERM says what was kept, and partly generated attack data is cached batch
by batch so that a rerun continues it (with the same result as an uninterrupted run). Neutral placeholders."""

import os
import signal
import sys

import pytest
import typer

from fedsafe.data import datagen


@pytest.fixture
def loaded(tiny):
    model, tok = tiny
    return {"model": model, "tokenizer": tok, "name": "tiny"}


def _fake_model(calls, stop_at=None):
    """A deterministic fake generator: its text depends only on the call's seed and the prompt's position;
    the ``stop_at``-th call is interrupted (as SIGTERM would, from the handler) before it returns."""

    def fake_generate(model, tok, prompts, seed=None, **kw):
        if stop_at is not None and len(calls) + 1 == stop_at:
            raise KeyboardInterrupt
        calls.append(seed)
        return ["\n".join(f"{k + 1}. placeholder item s{seed} p{j} k{k}?" for k in range(5))
                for j, _ in enumerate(prompts)]

    return fake_generate


@pytest.mark.parametrize("stop_at", [2, 5])  # during the instruction lists; during the responses
def test_interrupted_generation_resumes_where_it_stopped(loaded, monkeypatch, tmp_path, stop_at):
    kwargs = dict(model_name="tiny", kind="unaligned", n=12, loaded=loaded, seed=0, batch_size=2, per_prompt=5,
                  progress=False)
    full_calls: list = []
    monkeypatch.setenv("FEDSAFE_CACHE", str(tmp_path / "uninterrupted"))
    datagen._MODEL_CACHE.clear()
    monkeypatch.setattr("fedsafe.generation.generate", _fake_model(full_calls))
    expected = datagen.generate_rows(**kwargs)
    assert len(full_calls) > stop_at

    monkeypatch.setenv("FEDSAFE_CACHE", str(tmp_path / "interrupted"))
    datagen._MODEL_CACHE.clear()
    first: list = []
    monkeypatch.setattr("fedsafe.generation.generate", _fake_model(first, stop_at=stop_at))
    with pytest.raises(KeyboardInterrupt):
        datagen.generate_rows(**kwargs)
    assert len(first) == stop_at - 1
    partial = list((tmp_path / "interrupted").rglob("*.partial.json"))
    assert partial, "nothing of the finished batches was kept"
    rerun: list = []
    monkeypatch.setattr("fedsafe.generation.generate", _fake_model(rerun))
    assert datagen.generate_rows(**kwargs) == expected
    assert first + rerun == full_calls  # the finished batches were not generated again
    assert not list((tmp_path / "interrupted").rglob("*.partial.json"))  # done: the partial files are gone


def test_sigterm_prints_what_was_kept_and_exits_143(monkeypatch, capsys):
    from fedsafe import cli

    fake = typer.Typer()

    @fake.command()
    def work() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    @fake.command()
    def other() -> None:
        pass

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "app", fake)
    monkeypatch.setattr(cli, "_register_optional_commands", lambda: None)
    monkeypatch.setattr(sys, "argv", ["fedsafe", "work"])
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exc.value.code == 143
    err = " ".join(capsys.readouterr().err.split())
    assert "terminated (SIGTERM)" in err and "--resume" in err and "running the same command again continues it" in err


def test_generation_bar_counts_prompts_not_batches(monkeypatch):
    """The evaluation bar's total and steps are prompts (7 prompts in batches of 3: 3 + 3 + 1)."""
    import rich.progress

    from fedsafe import generation

    seen = {}

    class Recording(rich.progress.Progress):
        def add_task(self, description, total=None, **kw):
            seen["total"] = total
            seen["steps"] = []
            return super().add_task(description, total=total, **kw)

        def advance(self, task_id, advance=1):
            seen["steps"].append(advance)
            return super().advance(task_id, advance)

    import fedsafe.progress

    monkeypatch.setattr(fedsafe.progress, "Progress", Recording)  # every bar is built there
    batches = [[0, 1, 2], [3, 4, 5], [6]]
    assert list(generation._progress(batches, "answers")) == batches
    assert seen == {"total": 7, "steps": [3, 3, 1]}
