"""Data people already have (issue 34 item 4): chat ``messages`` records, files read through ``datasets``
(data_files), hub datasets with split / data_files / streaming (``datasets.load_dataset`` monkeypatched: no hub)."""

import json

import pytest

from fedsafe.data.format import format_example, tokenize_rows
from fedsafe.data.sources import load_rows, messages_row
from fedsafe.errors import DataError
from fedsafe.models import byte_tokenizer
from fedsafe.schema import DataSource


def _chat(i, system=None):
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"},
                    {"role": "user", "content": f"follow-up {i}"}, {"role": "assistant", "content": f"more {i}"}]


def test_messages_first_user_turn_and_following_answer():
    assert messages_row(_chat(3)) == {"instruction": "question 3", "response": "answer 3"}
    assert messages_row(_chat(3, system="be brief")) == {"instruction": "question 3", "response": "answer 3",
                                                         "system": "be brief"}
    # ShareGPT-style turns and content given as text parts read the same way
    assert messages_row([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]) == {
        "instruction": "q", "response": "a"}
    assert messages_row([{"role": "user", "content": [{"type": "text", "text": "q"}]},
                         {"role": "assistant", "content": "a"}]) == {"instruction": "q", "response": "a"}
    # a user turn with no answer after it gives no row
    assert messages_row([{"role": "user", "content": "q"}]) is None
    assert messages_row([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]) is None


def test_messages_files_auto_detected_in_every_format(tmp_path):
    records = [{"messages": _chat(i, system="sys" if i == 0 else None), "topic": f"t{i % 2}"} for i in range(4)]
    jl = tmp_path / "chat.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in records))
    js = tmp_path / "chat.json"
    js.write_text(json.dumps(records))
    pq = tmp_path / "chat.parquet"
    import pandas as pd

    pd.DataFrame(records).to_parquet(pq)
    for path in (jl, js, pq):
        rows = load_rows(DataSource(path=str(path), category_field="topic"))
        assert [r["instruction"] for r in rows] == [f"question {i}" for i in range(4)], path
        assert [r["response"] for r in rows] == [f"answer {i}" for i in range(4)]
        assert rows[0]["system"] == "sys" and "system" not in rows[1]
        assert [r["category"] for r in rows] == ["t0", "t1", "t0", "t1"]
    # another field name, format given explicitly
    other = tmp_path / "conv.jsonl"
    other.write_text(json.dumps({"instruction": "unused", "conversation": _chat(7)}) + "\n")
    rows = load_rows(DataSource(path=str(other), format="messages", messages_field="conversation"))
    assert rows == [{"instruction": "question 7", "response": "answer 7", "category": None}]
    with pytest.raises(DataError, match="messages_field='messages' is not a field"):
        load_rows(DataSource(path=str(other), format="messages"))


def test_flat_file_with_chat_column_hints_at_messages(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"conversation": _chat(0)}) + "\n")
    with pytest.raises(DataError, match="format: messages"):
        load_rows(DataSource(path=str(p)))


def test_row_system_prompt_reaches_the_chat_template():
    tok = byte_tokenizer()
    [with_own] = tokenize_rows(tok, [{"instruction": "q", "response": "a", "system": "row sys"}], 512,
                               system="config sys")
    [with_config] = tokenize_rows(tok, [{"instruction": "q", "response": "a"}], 512, system="config sys")
    assert with_own.input_ids.tolist() == format_example(tok, "q", "a", 512, system="row sys").input_ids.tolist()
    assert with_config.input_ids.tolist() == format_example(tok, "q", "a", 512, "config sys").input_ids.tolist()
    assert with_own.input_ids.tolist() != with_config.input_ids.tolist()


def test_local_files_through_datasets_data_files(tmp_path):
    for i in range(3):
        (tmp_path / f"part{i}.jsonl").write_text("".join(
            json.dumps({"instruction": f"i{i}-{j}", "response": f"r{i}-{j}"}) + "\n" for j in range(2)))
    (tmp_path / "t.csv").write_text("prompt,answer\nhello,world\nfoo,bar\n")
    rows = load_rows(DataSource(path="json", data_files=str(tmp_path / "part*.jsonl")))
    assert sorted(r["instruction"] for r in rows) == sorted(f"i{i}-{j}" for i in range(3) for j in range(2))
    rows = load_rows(DataSource(path="csv", data_files=[str(tmp_path / "t.csv")], instruction_field="prompt",
                                response_field="answer"))
    assert [(r["instruction"], r["response"]) for r in rows] == [("hello", "world"), ("foo", "bar")]


def test_streaming_a_local_file_takes_max_rows(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text("".join(json.dumps({"messages": _chat(i)}) + "\n" for i in range(50)))
    rows = load_rows(DataSource(path=str(p), streaming=True, max_rows=5), seed=1)
    assert len(rows) == 5 and len({r["instruction"] for r in rows}) == 5
    assert all(r["instruction"].startswith("question ") for r in rows)


def test_streaming_needs_max_rows():
    with pytest.raises(ValueError, match="streaming: true needs max_rows"):
        DataSource(path="org/chat", streaming=True)


def test_hub_dataset_call_split_data_files_streaming(monkeypatch):
    """The hub call carries split, data_files and streaming; a stream is read only as far as needed."""
    import datasets

    pulled = []
    calls = []

    def endless():  # a dataset far larger than what is asked: it must never be materialised
        i = 0
        while True:
            pulled.append(i)
            yield {"messages": _chat(i)}
            i += 1

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        if kwargs.get("streaming"):
            return datasets.IterableDataset.from_generator(endless)
        return datasets.Dataset.from_list([{"prompt": "p0", "completion": "c0"}, {"prompt": "p1", "completion": "c1"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_rows(DataSource(path="someone/chat-1m", split="train[:10%]", data_files="data/*.parquet",
                                streaming=True, max_rows=8), seed=0)
    assert calls[-1] == ("someone/chat-1m", None, {"split": "train[:10%]", "data_files": "data/*.parquet",
                                                   "streaming": True})
    assert len(rows) == 8 and len({r["instruction"] for r in rows}) == 8
    assert len(pulled) < 5000  # the shuffle buffer (1000) and a chunk or two, not the whole stream
    rows = load_rows(DataSource(path="someone/flat", split="test", subset="en", instruction_field="prompt",
                                response_field="completion"))
    assert calls[-1] == ("someone/flat", "en", {"split": "test"})
    assert [r["response"] for r in rows] == ["c0", "c1"]
