"""Load instruction/response rows from local files, hub dataset ids, the starter set or the generator."""

from __future__ import annotations

import csv
import gzip
import json
import random
from importlib import resources
from pathlib import Path
from typing import Any

from fedsafe.config import DataSource
from fedsafe.errors import DataError

Row = dict[str, Any]  # {"instruction": str, "response": str, "category": str | None}

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


def _hub_records(source: DataSource) -> list[dict]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a core dependency
        raise DataError("loading hub datasets needs the `datasets` package") from exc
    try:
        kwargs = {"data_dir": source.subset} if source.subset and "/" in source.subset else {}
        name = None if kwargs else source.subset
        ds = datasets.load_dataset(source.path, name, split=source.split, **kwargs)
    except Exception as exc:  # network errors, missing ids, missing splits
        raise DataError(f"could not load hub dataset {source.path!r} (split={source.split!r}): "
                        f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                        "Without hub access, download it elsewhere and give a local file path.") from exc
    return [dict(r) for r in ds]


def raw_records(source: DataSource) -> list[dict]:
    """The unparsed records of a file-, starter- or hub-backed source."""
    assert source.path is not None
    if source.path in STARTER_SPLITS:
        path = Path(str(resources.files("fedsafe.resources") / STARTER_SPLITS[source.path]))
        return read_records(path)
    p = Path(source.path).expanduser()
    if p.exists():
        return read_records(p)
    looks_local = source.path.startswith((".", "/", "~")) or Path(source.path).suffix in (
        ".json", ".jsonl", ".csv", ".parquet", ".gz")
    if looks_local:
        raise DataError(f"data file not found: {p}")
    return _hub_records(source)


def load_rows(source: DataSource, seed: int = 0, generator_cache: dict | None = None) -> list[Row]:
    """Load one source as normalised rows (instruction, response, category)."""
    if source.generate is not None:
        rows = _generated_rows(source, seed, generator_cache)
    elif source.format == "hh_rlhf_rejected":
        from fedsafe.data.safety_sources import hh_rlhf_rows

        rows = hh_rlhf_rows(raw_records(source))
    elif source.format == "beavertails_unsafe":
        from fedsafe.data.safety_sources import beavertails_unsafe_rows

        rows = beavertails_unsafe_rows(raw_records(source))
    else:
        rows = map_fields(raw_records(source), source)
    if source.categories is not None:
        rows = [r for r in rows if r.get("category") in source.categories]
    if source.holdout is not None:
        from fedsafe.data.holdout import in_split

        rows = [r for r in rows if in_split(r["instruction"], source.holdout, source.holdout_percent)]
    if source.drop_refusals:
        from fedsafe.evaluation.refusal import detect_refusals
        from fedsafe.evaluation.rule import refusal_flags

        responses = [r["response"] for r in rows]
        refused = [a or b for a, b in zip(refusal_flags(responses), detect_refusals(responses))]
        rows = [r for r, bad in zip(rows, refused) if not bad]
    if source.exclude:
        from fedsafe.data.holdout import excluded_instructions, normalise_instruction

        drop = excluded_instructions(source.exclude)
        rows = [r for r in rows if normalise_instruction(r["instruction"]) not in drop]
    if not rows:
        raise DataError(f"data source {source.path or source.generate!r} yields no rows"
                        + (f" with categories {source.categories}" if source.categories else "")
                        + (f" in holdout={source.holdout!r}" if source.holdout else ""))
    if source.max_rows is not None and len(rows) > source.max_rows:
        rng = random.Random(seed)
        rows = rng.sample(rows, source.max_rows)
    return rows


def map_fields(records: list[dict], source: DataSource) -> list[Row]:
    """Apply the field mapping; a wrong field name raises an error listing the fields that exist."""
    if not records:
        return []
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"data source {source.path!r}: record {bad + 1} is a {type(records[bad]).__name__}, not an "
                        f"object with fields ({source.instruction_field!r}, {source.response_field!r})")
    fields = set(records[0].keys())
    category_field = source.category_field or ("category" if "category" in fields else None)
    for role, name in (("instruction_field", source.instruction_field), ("response_field", source.response_field),
                       ("input_field", source.input_field), ("category_field", source.category_field)):
        if name is not None and name not in fields:
            raise DataError(f"data source {source.path!r}: {role}={name!r} is not a field; "
                            f"available fields: {sorted(fields)}")
    rows = []
    for rec in records:
        instruction = str(rec.get(source.instruction_field) or "").strip()
        if source.input_field and rec.get(source.input_field):
            instruction = f"{instruction}\n\n{str(rec[source.input_field]).strip()}"
        response = str(rec.get(source.response_field) or "").strip()
        if instruction and response:
            rows.append({"instruction": instruction, "response": response,
                         "category": rec.get(category_field) if category_field else None})
    return rows


def _generated_rows(source: DataSource, seed: int, cache: dict | None) -> list[Row]:
    from fedsafe.attacks import datagen

    spec = dict(source.generate or {})
    kind = spec.pop("kind", None)
    n = int(spec.pop("n", 100))
    model_name = spec.pop("model", "embedded")
    spec.setdefault("seed", seed)
    if kind not in ("unaligned", "aligned", "normal"):
        raise DataError(f"generate.kind must be unaligned, aligned or normal, got {kind!r}")
    rows = datagen.generate_rows(model_name=model_name, kind=kind, n=n, loaded=cache, **spec)
    return [{"instruction": r["instruction"], "response": r["response"], "category": kind} for r in rows]
