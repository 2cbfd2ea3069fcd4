"""The update cache's size limit (fedsafe.fl.update_cache): least recently used entries are evicted beyond it, an
entry in use by the running round or run is never evicted, an unreadable entry is removed and trained again, and
``fedsafe cache info`` / ``clear --updates`` report and empty it.

Entries are written directly through :meth:`UpdateCache.put` with made-up results (what an entry holds is checked
by tests/test_reuse.py); the eviction order is checked against an independent LRU model of the same operations.
"""

import hashlib
import json
import logging
import os
import random
import time
from collections import OrderedDict

import pytest
import torch

from fedsafe.data.client_data import ClientData
from fedsafe.data.format import TokenizedExample
from fedsafe.errors import ConfigError
from fedsafe.fl.client import ClientResult, LocalTrainer, RoundConfig
from fedsafe.fl.update_cache import (DEFAULT_LIMIT_BYTES, LIMIT_ENV, CacheInUse, UpdateCache, format_size,
                                     parse_size)
from fedsafe.models import attach_lora, byte_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _put(cache: UpdateCache, name: str, numel: int = 1000) -> int:
    """Store a made-up training under ``name``'s key; returns the bytes the entry takes on disk."""
    update = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    cache.put(_key(name), {"name": name}, ClientResult("c0", update, 4, {"seconds": 1.0}, {}), [0.5, 0.25],
              torch.get_rng_state())
    return _entry_bytes(cache, name)


def _entry_bytes(cache: UpdateCache, name: str) -> int:
    key = _key(name)
    return sum((cache.root / key[:2] / f"{key}{ext}").stat().st_size for ext in (".safetensors", ".json"))


def _stored(cache: UpdateCache, names) -> set[str]:
    """Which of ``names`` have a complete entry on disk."""
    return {n for n in names if (cache.root / _key(n)[:2] / f"{_key(n)}.json").exists()}


def _disk_bytes(root) -> int:
    return sum(p.stat().st_size for p in root.glob("*/*") if p.is_file())


def test_sizes_parse_as_documented():
    """4GiB is 4 * 2^30 bytes, 500MB 5 * 10^8, K/M/G/T alone are binary (as du -h prints), none lifts the limit;
    anything else names the setting."""
    assert parse_size("4GiB") == 4 * 2**30 == DEFAULT_LIMIT_BYTES
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("10G") == 10 * 2**30 and parse_size("1.5 MiB") == 3 * 2**19
    assert parse_size("123") == 123 and parse_size(0) == 0
    assert parse_size("none") is None and parse_size("Unlimited") is None
    with pytest.raises(ConfigError, match=LIMIT_ENV):
        parse_size("4 gigs", LIMIT_ENV)
    assert format_size(3 * 2**29) == "1.5 GiB" and format_size(None) == "no limit"


def test_limit_comes_from_the_environment_else_4_gib(tmp_path, monkeypatch):
    monkeypatch.delenv(LIMIT_ENV, raising=False)
    assert UpdateCache(tmp_path).limit_bytes == 4 * 2**30
    monkeypatch.setenv(LIMIT_ENV, "300MiB")
    assert UpdateCache(tmp_path).limit_bytes == 300 * 2**20
    assert UpdateCache(tmp_path, "1KiB").limit_bytes == 1024  # an explicit limit wins
    monkeypatch.setenv(LIMIT_ENV, "none")
    assert UpdateCache(tmp_path).limit_bytes is None
    monkeypatch.setenv(LIMIT_ENV, "lots")
    with pytest.raises(ConfigError, match=LIMIT_ENV):
        UpdateCache(tmp_path)


def test_least_recently_used_is_evicted_first_and_a_read_counts_as_use(tmp_path):
    """A, B, C, D stored in turn (a round each), A read again; storing E past the limit evicts B (the least recently
    used), then F evicts C. The last use is on disk (the JSON's mtime), so a new cache object (the next process)
    follows the same order."""
    names = "ABCDEF"
    probe = UpdateCache(tmp_path / "probe", None)
    size = max(_put(probe, n) for n in names)  # every entry has the same size, up to a digit of the JSON's time
    cache = UpdateCache(tmp_path / "u", int(4.5 * size))
    for name in "ABCD":
        with cache.opened():
            _put(cache, name)
    with cache.opened():
        assert cache.get(_key("A"), "c0") is not None
    assert _stored(cache, names) == set("ABCD") and cache.evicted == 0
    b_bytes = _entry_bytes(cache, "B")  # this entry's own size (the JSON's time can differ by a digit elsewhere)
    with cache.opened():
        _put(cache, "E")
    assert _stored(cache, names) == set("ACDE")
    assert (cache.evicted, cache.evicted_bytes) == (1, b_bytes)

    again = UpdateCache(tmp_path / "u", int(4.5 * size))
    with again.opened():
        _put(again, "F")
    assert _stored(again, names) == set("ADEF")
    assert again.size_bytes() == _disk_bytes(again.root) <= 4.5 * size


def test_limit_is_honoured_after_every_round_as_an_lru_model_predicts(tmp_path, test_seed):
    """Random stores (entries of different sizes) and reads, one round each: after every round the entries kept are
    exactly those an LRU list keeps under the same limit, and they take at most the limit."""
    rng = random.Random(test_seed)
    limit = 60_000
    cache = UpdateCache(tmp_path, limit)
    model: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
    names = [f"e{i}" for i in range(10)]
    evicted = 0
    for _ in range(40):
        name = rng.choice(names)
        with cache.opened():
            found = cache.get(_key(name), "c0")
            assert (found is not None) == (name in model), name
            if found is None:
                model[name] = _put(cache, name, numel=rng.choice([500, 2000, 4000, 8000]))
            model.move_to_end(name)
        while sum(model.values()) > limit:
            model.popitem(last=False)
            evicted += 1
        assert _stored(cache, names) == set(model)
        assert cache.size_bytes() == _disk_bytes(tmp_path) == sum(model.values()) <= limit
    assert evicted > 0 and cache.evicted == evicted


def test_entries_in_use_are_kept_past_the_limit_until_the_run_ends(tmp_path):
    """Inside one in_use block (a grid's training run) nothing it read or wrote is evicted, even past the limit;
    entries of earlier runs are; when the block ends the least recently used go until the limit holds."""
    probe = UpdateCache(tmp_path / "probe", None)
    size = max(_put(probe, n) for n in ("P", "Q", "R", "S", "T"))
    cache = UpdateCache(tmp_path / "u", int(3.5 * size))
    with cache.opened():  # an earlier run
        _put(cache, "P")
        _put(cache, "Q")
    with cache.in_use():
        with cache.opened():  # round 1 reads P, stores R and S: Q (not in use) goes
            assert cache.get(_key("P"), "c0") is not None
            _put(cache, "R")
            _put(cache, "S")
        assert _stored(cache, "PQRS") == set("PRS")
        with cache.opened():  # round 2 stores T: past the limit, but every entry left is the run's
            _put(cache, "T")
        assert _stored(cache, "PQRST") == set("PRST") and cache.size_bytes() > 3.5 * size
    # the run is over: P, the least recently used, goes
    assert _stored(cache, "PQRST") == set("RST") and cache.size_bytes() <= 3.5 * size
    assert cache.evicted == 2


def test_clear_refuses_a_cache_in_use_and_empties_it_after(tmp_path):
    """Another process's clear (a second cache object: its own lock) leaves a cache a run holds alone."""
    running = UpdateCache(tmp_path, None)
    with running.in_use():
        _put(running, "A")
        with pytest.raises(CacheInUse, match="in use"):
            UpdateCache(tmp_path).clear()
        assert _stored(running, "A") == {"A"}
    (tmp_path / _key("A")[:2] / f".{_key('A')}.json.partial").write_text("{")  # a killed write
    entry_bytes = _entry_bytes(running, "A")
    assert UpdateCache(tmp_path).clear() == (1, entry_bytes)
    assert not [p for p in tmp_path.rglob("*") if p.name != ".lock"]


def _setup(test_seed):
    tok = byte_tokenizer()
    trainer = LocalTrainer(attach_lora(tiny_llama(tok, seed=test_seed), r=4, alpha=8, dropout=0.0), tok)
    gen = torch.Generator().manual_seed(test_seed)
    examples = [TokenizedExample(ids, ids.clone()) for ids in (torch.randint(3, len(tok), (16,), generator=gen)
                                                               for _ in range(4))]
    rc = RoundConfig(round=1, lr=0.01, local_steps=2, batch_size=2, seed=test_seed)
    return trainer, ClientData("c0", "benign", examples), trainer.flat.get(), rc


@pytest.mark.parametrize("damage", ["tensors cut short", "tensors overwritten", "json cut short",
                                    "json of another key", "json without metrics"])
def test_an_unreadable_entry_is_ignored_removed_and_trained_again(test_seed, tmp_path, caplog, damage):
    """A damaged entry (a disk error, a copy cut short) is a miss with a warning: the training runs again, its
    result equals the first one bit for bit and replaces the entry, which the next lookup reads."""
    trainer, client, start, rc = _setup(test_seed)
    trainer.update_cache = cache = UpdateCache(tmp_path)
    with cache.opened():
        first = trainer.fit(client, start, rc, {})
    (tensors,) = tmp_path.glob("*/*.safetensors")
    meta = tensors.with_suffix(".json")
    if damage == "tensors cut short":
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "tensors overwritten":
        tensors.write_bytes(b"\0" * tensors.stat().st_size)
    elif damage == "json cut short":
        meta.write_text(meta.read_text()[:50])
    elif damage == "json of another key":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "key": _key("other")}))
    else:
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "metrics"}))
    with caplog.at_level(logging.WARNING, logger="fedsafe"), cache.opened():
        again = trainer.fit(client, start, rc, {})
    assert "unreadable entry" in caplog.text
    assert cache.counts()["computed"] == 2 and cache.counts()["reused"] == 0
    assert torch.equal(again.update, first.update) and again.metrics["update_cache"] == "miss"
    with cache.opened():
        hit = trainer.fit(client, start, rc, {})
    assert hit.metrics["update_cache"] == "hit" and torch.equal(hit.update, first.update)


def test_partial_writes_are_not_entries_and_stale_ones_are_removed(tmp_path):
    """A temp file of an atomic write is never an entry; one older than an hour was left by a killed process and
    goes at the next scan, a fresh one (a write in progress) stays."""
    cache = UpdateCache(tmp_path, None)
    size = _put(cache, "A")
    folder = tmp_path / _key("A")[:2]
    stale, fresh = folder / f".{_key('B')}.safetensors.x1", folder / f".{_key('C')}.safetensors.x2"
    stale.write_bytes(b"\0" * 5000)
    fresh.write_bytes(b"\0" * 5000)
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    assert cache.size_bytes() == size
    assert not stale.exists() and fresh.exists()
    assert cache.get(_key("B"), "c0") is None


def _cli(args, env=None):
    from typer.testing import CliRunner

    from fedsafe.cli import _register_optional_commands, app

    _register_optional_commands()
    return CliRunner().invoke(app, args, env=env)


def test_cache_info_prints_the_sizes_and_clear_empties_the_updates(tmp_path, monkeypatch):
    """``fedsafe cache info`` gives each grid's update cache (entries, bytes, limit) and its generations; ``clear
    --updates --keep`` keeps the most recently used entries, ``clear --updates`` the rest."""
    monkeypatch.setenv("FEDSAFE_CACHE", str(tmp_path / "home"))
    (tmp_path / "home" / "models").mkdir(parents=True)
    (tmp_path / "home" / "models" / "w.bin").write_bytes(b"\0" * 3000)
    grid = tmp_path / "runs" / "g-1"
    (grid / "cache" / "generations").mkdir(parents=True)
    (grid / "cache" / "generations" / "a.jsonl").write_text("x" * 700)
    cache = UpdateCache(grid / "cache" / "updates", None)
    sizes = {}
    for name in "ABC":
        with cache.opened():
            sizes[name] = _put(cache, name, numel=4000)
    total = sum(sizes.values())

    result = _cli(["cache", "info", "--json", str(tmp_path / "runs")], env={LIMIT_ENV: "2MiB"})
    assert result.exit_code == 0, result.output
    rows = {row["kind"]: row for row in json.loads(result.stdout)}
    assert rows["client updates"]["entries"] == 3 and rows["client updates"]["size_bytes"] == total
    assert rows["client updates"]["limit_bytes"] == 2 * 2**20
    assert rows["generations"]["size_bytes"] == 700 and rows["$FEDSAFE_CACHE models"]["size_bytes"] == 3000

    result = _cli(["cache", "info", str(grid)], env={LIMIT_ENV: "2MiB"})
    assert result.exit_code == 0, result.output
    assert format_size(total) in result.stdout and "2.0 MiB" in result.stdout and "700 B" in result.stdout

    result = _cli(["cache", "clear", str(grid)])
    assert result.exit_code != 0 and "--updates" in str(result.exception)
    result = _cli(["cache", "clear", "--updates", "--keep", str(sizes["C"]), str(grid)])
    assert result.exit_code == 0, result.output
    assert _stored(cache, "ABC") == {"C"} and "removed 2 entries" in result.stdout
    result = _cli(["cache", "clear", "--updates", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert _stored(cache, "ABC") == set() and "removed 1 entries" in result.stdout
    assert (grid / "cache" / "generations" / "a.jsonl").exists()


def test_a_grid_run_keeps_its_entries_and_reuse_json_says_what_was_evicted(tmp_path):
    """The grid holds the cache for each training run (fedsafe.grid._Reuse): a run's own entries stay while it
    runs; at its end the least recently used go, and reuse.json and the printed line give the count and bytes."""
    from fedsafe.grid import _Reuse

    probe = UpdateCache(tmp_path / "probe", None)
    limit = int(2.5 * max(_put(probe, n) for n in "ABCD"))
    reuse = _Reuse(tmp_path, True, limit)
    sizes = {}
    with reuse.run("first") as cache:
        for name in "ABC":
            with cache.opened():
                sizes[name] = _put(cache, name)
        assert _stored(cache, "ABC") == set("ABC")  # past the limit while the run holds them
    assert _stored(cache, "ABC") == set("BC")  # the run is over: A, the least recently used, goes
    with reuse.run("second") as cache:
        with cache.opened():
            assert cache.get(_key("B"), "c0") is not None
            _put(cache, "D")  # C is now the least recently used
    record = json.loads((tmp_path / "reuse.json").read_text())
    assert record["cache_limit_bytes"] == limit
    assert record["runs"]["first"]["evicted"] == 1 and record["runs"]["second"]["evicted"] == 1
    assert record["totals"]["evicted"] == 2 and record["totals"]["evicted_bytes"] == sizes["A"] + sizes["C"]
    assert _stored(cache, "ABCD") == set("BD") and record["cache_bytes"] <= limit


def test_a_bad_update_cache_limit_fails_before_the_grid_directory_exists(tmp_path):
    """``--update-cache-limit`` reaches the grid; a value that is not a size names the field, and no grid
    directory is made."""
    import yaml

    (tmp_path / "normal.jsonl").write_text(json.dumps({"instruction": "Explain item 1.", "response": "A placeholder."}))
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "name": "g", "output_dir": str(tmp_path / "out"),
        "config": {"model": {"name": "tiny"}, "roles": [{"name": "benign", "clients": 2,
                                                          "data": [{"path": "normal.jsonl"}]}],
                   "eval": {"prompts": None}},
        "matrix": {"a": {"x": {}}}}))
    result = _cli(["grid", str(grid_file), "--no-progress", "--update-cache-limit", "a lot"])
    assert isinstance(result.exception, ConfigError), result.output
    assert "update_cache_limit" in str(result.exception)
    assert not (tmp_path / "out").exists()
