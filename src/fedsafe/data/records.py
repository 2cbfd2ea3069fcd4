"""Raw records of a data source: a local file (JSON, JSONL, CSV, Parquet, gzipped), the starter set or a hub dataset.

The lowest layer of ``data/``: it reads records and parses nothing, so the row loader
(:mod:`fedsafe.data.sources`), the data-generation pipeline (:mod:`fedsafe.data.datagen`) and the evaluation
read files the same way without importing each other.
"""

from __future__ import annotations

import csv
import gzip
import json
from importlib import resources
from pathlib import Path

from fedsafe.config import DataSource
from fedsafe.errors import DataError

STARTER_SPLITS = {"starter:train": "starter_train.jsonl", "starter:heldout": "starter_heldout.jsonl"}


def read_records(path: Path) -> list[dict]:
    """Read a JSON list, JSONL (optionally .gz), CSV or Parquet file into a list of dicts (a prompt list may
    also hold plain strings); any other record, such as the numbers of a JSON list of numbers, is an error
    naming the file."""
    records = _read_records(path)
    for i, rec in enumerate(records):
        if not isinstance(rec, (dict, str)):
            raise DataError(f"{path}: record {i + 1} is {str(rec)[:40]} ({type(rec).__name__}), not an object "
                            "with fields (expected a list of {\"instruction\": ..., \"response\": ...} records)")
    return records


def _read_records(path: Path) -> list:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"data file {path} is a directory")
    name = path.name.lower()
    opener = gzip.open if name.endswith(".gz") else open
    stem = name[:-3] if name.endswith(".gz") else name
    try:
        if stem.endswith(".jsonl"):
            with opener(path, "rt", encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if stem.endswith(".json"):
            with opener(path, "rt", encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise DataError(f"{path}: expected a JSON list of records")
                data = lists[0]
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
            return data
        if stem.endswith(".csv"):
            with opener(path, "rt", encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
        if stem.endswith(".parquet"):
            import pandas as pd

            return pd.read_parquet(path).to_dict(orient="records")
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError, gzip.BadGzipFile, csv.Error) as exc:
        raise DataError(f"{path}: could not parse ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except Exception as exc:  # pandas / pyarrow on a damaged Parquet file
        if not stem.endswith(".parquet"):
            raise
        raise DataError(f"{path}: could not parse ({type(exc).__name__}: {str(exc)[:200]})") from None
    raise DataError(f"{path}: unsupported file type (use .json, .jsonl, .csv or .parquet)")


_DATASETS_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_dataset(source: DataSource, seed: int = 0):
    """``datasets.load_dataset`` for a hub id, a builder (json, csv, parquet) with ``data_files``, or a local
    file read as a stream: with ``streaming`` an iterable of records shuffled in a buffer, else the split."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a core dependency
        raise DataError("loading hub datasets needs the `datasets` package") from exc
    path, data_files = source.path, source.data_files
    local = Path(path).expanduser()
    if data_files is None and local.is_file():  # a local file streamed through datasets' own reader
        suffix = "".join(local.suffixes[-2:-1]) if local.suffix == ".gz" else local.suffix
        if suffix.lower() not in _DATASETS_BUILDERS:
            raise DataError(f"{local}: unsupported file type (use .json, .jsonl, .csv or .parquet)")
        path, data_files = _DATASETS_BUILDERS[suffix.lower()], str(local)
    kwargs: dict[str, Any] = {"data_dir": source.subset} if source.subset and "/" in source.subset else {}
    name = None if kwargs else source.subset
    if data_files is not None:
        kwargs["data_files"] = data_files
    if source.streaming:
        kwargs["streaming"] = True
    what = f"dataset {source.path!r} (split={source.split!r}" + (f", data_files={data_files!r}" if data_files else "")
    try:
        ds = datasets.load_dataset(path, name, split=source.split, **kwargs)
    except Exception as exc:  # network errors, missing ids, missing splits or files
        raise DataError(f"could not load {what}): {exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}. Without hub access, download it "
                        "elsewhere and give a local file path.") from exc
    if source.streaming:
        # a buffer of a few times the rows asked for: a random sample near the stream's start, never the whole set
        return ds.shuffle(seed=seed, buffer_size=max(1000, 10 * (source.max_rows or 0)))
    return ds


def _hub_records(source: DataSource) -> list[dict]:
    return [dict(r) for r in load_dataset(source)]


def raw_records(source: DataSource) -> list[dict]:
    """The unparsed records of a file-, starter- or hub-backed source (the whole split; see streaming)."""
    assert source.path is not None
    if source.path in STARTER_SPLITS:
        path = Path(str(resources.files("fedsafe.resources") / STARTER_SPLITS[source.path]))
        return read_records(path)
    p = Path(source.path).expanduser()
    if source.data_files is not None:
        return _hub_records(source)
    if p.exists():
        return read_records(p)
    looks_local = source.path.startswith((".", "/", "~")) or Path(source.path).suffix in (
        ".json", ".jsonl", ".csv", ".parquet", ".gz")
    if looks_local:
        raise DataError(f"data file not found: {p}")
    return _hub_records(source)
