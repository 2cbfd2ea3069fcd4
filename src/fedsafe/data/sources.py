"""Load instruction/response rows from local files, hub dataset ids, the starter set or the generator."""

from __future__ import annotations

import functools
import random
from typing import Any

from fedsafe.config import DataSource
# STARTER_SPLITS is not used here: the evaluation runner reads it (and raw_records) from this module
from fedsafe.data.records import STARTER_SPLITS, load_dataset, raw_records  # noqa: F401
from fedsafe.data.split import in_split, normalise_instruction
from fedsafe.errors import DataError

Row = dict[str, Any]  # {"instruction": str, "response": str, "category": str | None}


def _parser(source: DataSource):
    """The function that turns a list of records into rows, chosen by ``source.format``."""
    if source.format == "hh_rlhf_rejected":
        from fedsafe.data.safety_sources import hh_rlhf_rows

        return hh_rlhf_rows
    if source.format == "beavertails_unsafe":
        from fedsafe.data.safety_sources import beavertails_unsafe_rows

        return beavertails_unsafe_rows
    return lambda records: map_fields(records, source)


def _keep(rows, source: DataSource, excluded: set[str] | None) -> list[Row]:
    """The rows that pass the row-wise filters: categories, the held-out split, exclude."""
    if source.categories is not None:
        rows = [r for r in rows if r.get("category") in source.categories]
    if source.holdout is not None:
        rows = [r for r in rows if in_split(r["instruction"], source.holdout, source.holdout_percent)]
    if excluded is not None:
        rows = [r for r in rows if normalise_instruction(r["instruction"]) not in excluded]
    return list(rows)


def _streamed_rows(source: DataSource, seed: int, excluded: set[str] | None) -> list[Row]:
    """Read chunks of the stream until ``max_rows`` rows pass the filters (or the stream ends)."""
    from itertools import islice

    parse, records = _parser(source), iter(load_dataset(source, seed))
    want = source.max_rows or 0
    rows: list[Row] = []
    while len(rows) < want:
        chunk = [dict(r) for r in islice(records, max(64, 2 * want))]
        if not chunk:
            break
        rows.extend(_keep(parse(chunk), source, excluded))
    return rows[:want]


def excluded_instructions(sources) -> set[str]:
    """The normalised instructions of ``sources`` (a data source's ``exclude`` list)."""
    out: set[str] = set()
    for src in sources or ():
        src = src.model_copy(update={"max_rows": None})
        if src.generate is not None or src.streaming:
            rows = load_rows(src)
        else:
            # an excluded set is a list of instructions: a prompt file (XSTest's prompts) has no response field,
            # so its instruction stands in for the response the row parser asks for; read once, row filters only
            records = raw_records(src)
            first = records[0] if records else None
            if isinstance(first, dict) and src.response_field not in first and not _uses_messages(src, set(first)):
                src = src.model_copy(update={"response_field": src.instruction_field})
            rows = _keep(_parser(src)(records), src, excluded_instructions(src.exclude) if src.exclude else None)
            if not rows:
                raise DataError(f"exclude: data source {src.path!r} yields no instructions"
                                + (f" with categories {src.categories}" if src.categories else ""))
        out |= {normalise_instruction(r["instruction"]) for r in rows}
    return out


@functools.lru_cache(maxsize=8)
def _refused(responses: tuple[str, ...]) -> tuple[bool, ...]:
    """``drop_refusals``' verdict per response: a FedIT refusal string or the refusal detector. Kept per process
    for the same responses: a grid loads one attack file for every run and its checks (make demo ran the detector
    over maliciousQA's 3,551 answers three times before)."""
    from fedsafe.evaluation.refusal import detect_refusals
    from fedsafe.evaluation.rule import refusal_flags

    return tuple(a or b for a, b in zip(refusal_flags(list(responses)), detect_refusals(list(responses))))


def load_rows(source: DataSource, seed: int = 0, generator_cache: dict | None = None) -> list[Row]:
    """Load one source as normalised rows (instruction, response, category; system when the data has one)."""
    excluded = None
    if source.exclude:
        excluded = excluded_instructions(source.exclude)
    if source.generate is not None:
        rows = _keep(_generated_rows(source, seed, generator_cache), source, excluded)
    elif source.streaming:
        rows = _streamed_rows(source, seed, excluded)
    else:
        rows = _keep(_parser(source)(raw_records(source)), source, excluded)
    if source.drop_refusals:
        refused = _refused(tuple(r["response"] for r in rows))
        rows = [r for r, bad in zip(rows, refused) if not bad]
    if source.rephrase is not None:
        from fedsafe.data.rephrase import rephrase_rows

        rows = rephrase_rows(rows, source.rephrase, source.rephrase_share)
    if not rows:
        raise DataError(f"data source {source.path or source.generate!r} yields no rows"
                        + (f" with categories {source.categories}" if source.categories else "")
                        + (f" in holdout={source.holdout!r}" if source.holdout else ""))
    if source.max_rows is not None and len(rows) > source.max_rows:
        rng = random.Random(seed)
        rows = rng.sample(rows, source.max_rows)
    return rows


def _uses_messages(source: DataSource, fields: set[str]) -> bool:
    return source.format == "messages" or (source.format == "auto" and source.instruction_field not in fields
                                           and source.messages_field in fields)


def _text(content) -> str:
    """A turn's text: a string, or the text parts of a list of {type: text, text: ...} parts."""
    if hasattr(content, "tolist"):
        content = content.tolist()
    if isinstance(content, list):
        return "\n".join(str(p.get("text") or "") if isinstance(p, dict) else str(p) for p in content).strip()
    return str(content or "").strip()


# ShareGPT-style turns ({from: human|gpt, value: ...}) are read as the same roles
_ROLE_NAMES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def messages_row(turns) -> Row | None:
    """A chat record's row: the first user turn is the instruction, the assistant turn right after it the
    response, and a system turn before it (when there is one) the row's ``system`` prompt; later turns are not
    used. None when the conversation has no such pair."""
    if hasattr(turns, "tolist"):  # a Parquet list column read by pandas is a numpy array
        turns = turns.tolist()
    if not isinstance(turns, list):
        return None
    system = None
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return None
        role = str(turn.get("role") or turn.get("from") or "").lower()
        role = _ROLE_NAMES.get(role, role)
        text = _text(turn.get("content", turn.get("value")))
        if role == "system":
            system = text or system
        elif role == "user":
            nxt = turns[i + 1] if i + 1 < len(turns) and isinstance(turns[i + 1], dict) else {}
            nxt_role = str(nxt.get("role") or nxt.get("from") or "").lower()
            if _ROLE_NAMES.get(nxt_role, nxt_role) != "assistant":
                return None
            response = _text(nxt.get("content", nxt.get("value")))
            if not text or not response:
                return None
            row: Row = {"instruction": text, "response": response}
            if system:
                row["system"] = system
            return row
    return None


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
    if _uses_messages(source, fields):
        if source.messages_field not in fields:
            raise DataError(f"data source {source.path!r}: messages_field={source.messages_field!r} is not a "
                            f"field; available fields: {sorted(fields)}")
        rows = []
        for rec in records:
            row = messages_row(rec.get(source.messages_field))
            if row is not None:
                rows.append({**row, "category": rec.get(category_field) if category_field else None})
        return rows
    for role, name in (("instruction_field", source.instruction_field), ("response_field", source.response_field),
                       ("input_field", source.input_field), ("category_field", source.category_field)):
        if name is not None and name not in fields:
            hint = (f" (a chat record? set format: messages and messages_field)"
                    if any(isinstance(records[0].get(f), list) for f in fields) else "")
            raise DataError(f"data source {source.path!r}: {role}={name!r} is not a field; "
                            f"available fields: {sorted(fields)}{hint}")
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
    from fedsafe.data import datagen

    spec = dict(source.generate or {})
    kind = spec.pop("kind", None)
    n = int(spec.pop("n", 100))
    model_name = spec.pop("model", "embedded")
    spec.setdefault("seed", seed)
    if kind not in ("unaligned", "aligned", "normal"):
        raise DataError(f"generate.kind must be unaligned, aligned or normal, got {kind!r}")
    rows = datagen.generate_rows(model_name=model_name, kind=kind, n=n, loaded=cache, **spec)
    return [{"instruction": r["instruction"], "response": r["response"], "category": kind} for r in rows]
