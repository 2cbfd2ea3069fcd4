"""Data sources, field mapping, chat formatting with response-only loss, partitioning."""

import json

import pytest

from fedsafe.config import DataSource
from fedsafe.data.format import IGNORE_INDEX, collate, format_example
from fedsafe.data.partition import dirichlet_partition, iid_partition
from fedsafe.data.records import read_records
from fedsafe.data.sources import load_rows
from fedsafe.errors import DataError
from fedsafe.models import byte_tokenizer


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_file_formats_and_field_mapping(tmp_path):
    rows = [{"q": f"question {i}", "ctx": "extra", "a": f"answer {i}", "cat": i % 2} for i in range(5)]
    jl = _write_jsonl(tmp_path / "d.jsonl", rows)
    js = tmp_path / "d.json"
    js.write_text(json.dumps(rows))
    csv = tmp_path / "d.csv"
    csv.write_text("q,ctx,a,cat\n" + "".join(f"question {i},extra,answer {i},{i % 2}\n" for i in range(5)))
    for p in (jl, js, csv):
        out = load_rows(DataSource(path=str(p), instruction_field="q", response_field="a",
                                   input_field="ctx", category_field="cat"))
        assert len(out) == 5
        assert out[0]["instruction"] == "question 0\n\nextra" and out[0]["response"] == "answer 0"


def test_wrong_field_lists_available_fields(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "output": "y"}])
    with pytest.raises(DataError, match=r"instruction_field='instruction' is not a field; available fields: \['output', 'prompt'\]"):
        load_rows(DataSource(path=str(p)))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_rows(DataSource(path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "x.json")


def test_category_filter_and_max_rows(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"i{i}", "response": "r", "category": "a" if i < 3 else "b"}
                                            for i in range(10)])
    rows = load_rows(DataSource(path=str(p), categories=["b"], max_rows=4))
    assert len(rows) == 4 and all(r["category"] == "b" for r in rows)
    with pytest.raises(DataError, match="no rows"):
        load_rows(DataSource(path=str(p), categories=["zzz"]))


def test_loss_only_on_response_tokens():
    tok = byte_tokenizer()
    ex = format_example(tok, "Say hi", "hello", max_length=512)
    labelled = ex.labels[ex.labels != IGNORE_INDEX]
    assert tok.decode(labelled).startswith("hello")
    assert "Say hi" not in tok.decode(labelled)
    prompt_len = int((ex.labels == IGNORE_INDEX).sum())
    assert "Say hi" in tok.decode(ex.input_ids[:prompt_len])


def test_truncation_drops_examples_without_response():
    tok = byte_tokenizer()
    assert format_example(tok, "x" * 200, "answer", max_length=64) is None
    ex = format_example(tok, "q", "a" * 500, max_length=64)
    assert len(ex.input_ids) == 64


def test_collate_pads_right_and_masks():
    tok = byte_tokenizer()
    a = format_example(tok, "q", "short", 128)
    b = format_example(tok, "question", "a longer answer", 128)
    batch = collate([a, b], tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() == len(a.input_ids)
    assert (batch["labels"][0, len(a.input_ids):] == IGNORE_INDEX).all()


def test_iid_partition_is_disjoint_and_sized():
    parts = iid_partition(100, 4, 20, seed=0)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == 80
    assert iid_partition(100, 4, 20, seed=0) == parts
    assert iid_partition(10, 4, 20, seed=0)[0].__len__() == 2


def test_dirichlet_partition_is_disjoint_and_skewed():
    cats = ["a"] * 200 + ["b"] * 200
    parts = dirichlet_partition(cats, 4, 1000, alpha=0.1, seed=1)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == 400
    shares = [sum(1 for i in p if cats[i] == "a") / len(p) for p in parts]
    assert max(shares) - min(shares) > 0.5  # small alpha -> strongly non-IID
    with pytest.raises(DataError, match="category"):
        dirichlet_partition([None, "a"], 2, 1, 0.5, 0)
