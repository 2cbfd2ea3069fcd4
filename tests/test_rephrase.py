"""DataSource.rephrase: a share of the instructions rewritten into the other grammatical mood (issue 29)."""

import json

import pytest
from pydantic import ValidationError

from fedsafe.data.rephrase import rephrase_rows, to_imperative, to_question


@pytest.mark.parametrize("question, forms", [
    ("Can you recommend a placeholder book?", {"Recommend a placeholder book.", "Please recommend a placeholder book."}),
    ("How do I fold a paper plane?", {"Explain how to fold a paper plane.", "Describe how to fold a paper plane.",
                                      "Outline how to fold a paper plane.", "Tell me how to fold a paper plane."}),
    ("What are some placeholder hobbies?", {"List some placeholder hobbies.", "Suggest some placeholder hobbies.",
                                            "Identify some placeholder hobbies."}),
    ("\"What's the difference between tea and coffee?\"", {"Explain the difference between tea and coffee.",
                                                           "Describe the difference between tea and coffee.",
                                                           "Compare tea and coffee."}),
])
def test_questions_become_imperatives_with_the_same_content(question, forms):
    got = to_imperative(question)
    assert got in forms and not got.endswith("?")


def test_an_unmatched_question_is_wrapped_whole_and_a_request_is_left_alone():
    odd = "Is a placeholder sentence long enough?"
    got = to_imperative(odd)
    assert got.endswith(odd) and got != odd and not got.startswith("Is ")
    assert to_imperative("Write a placeholder poem.") == "Write a placeholder poem."
    assert to_imperative("") == ""


def test_imperatives_become_questions_and_questions_are_left_alone():
    got = to_question("Outline the placeholder steps.")
    assert got.endswith("outline the placeholder steps?") and got[0].isupper()
    assert to_question("Summarize the placeholder reports.").endswith(" summarize the placeholder reports?")
    assert to_question("NASA placeholder reports, summarised.").endswith(" NASA placeholder reports, summarised?")
    assert to_question("How are you?") == "How are you?"


def test_the_rewritten_rows_are_a_pure_function_of_the_instruction_and_keep_their_responses():
    rows = [{"instruction": f"How do I do placeholder task {i}?", "response": f"answer {i}", "category": "c"}
            for i in range(400)]
    once = rephrase_rows(rows, "imperative", 0.5)
    assert once == rephrase_rows(list(rows), "imperative", 0.5)          # same rows rewritten every time
    changed = [a for a, b in zip(once, rows) if a["instruction"] != b["instruction"]]
    assert 150 < len(changed) < 250                                          # about the share asked for
    assert all(a["response"] == b["response"] and a["category"] == "c" for a, b in zip(once, rows))
    assert not any(r["instruction"].endswith("?") for r in changed)
    assert len([1 for a, b in zip(rephrase_rows(rows, "imperative", 1.0), rows) if a != b]) == 400
    quarter = rephrase_rows(rows, "imperative", 0.25)                         # a smaller share: a subset
    changed_at = lambda out: {i for i, (a, b) in enumerate(zip(out, rows)) if a != b}  # noqa: E731
    assert changed_at(quarter) < changed_at(once) and 60 < len(changed_at(quarter)) < 140
    with pytest.raises(ValueError, match="rephrase"):
        rephrase_rows(rows, "passive", 0.5)


def test_the_data_source_field_rewrites_rows_and_the_heldout_check_reads_the_originals(tmp_path):
    from fedsafe.data.holdout import training_instructions
    from fedsafe.data.sources import load_rows
    from fedsafe.schema import DataSource

    rows = [{"instruction": f"How do I do placeholder task {i}?", "response": "x"} for i in range(60)]
    f = tmp_path / "normal.json"
    f.write_text(json.dumps(rows))
    src = DataSource(path=str(f), rephrase="imperative", rephrase_share=1.0)
    assert all(not r["instruction"].endswith("?") for r in load_rows(src))
    # the model still learns the content of a rewritten row: the overlap check compares the original text
    got = training_instructions({"roles": [{"data": [src.model_dump()]}]})
    assert got == {"roles[0].data[0]": [r["instruction"] for r in rows]}
    with pytest.raises(ValidationError, match="rephrase"):
        DataSource(path=str(f), rephrase="passive")
    with pytest.raises(ValidationError, match="rephrase_share"):
        DataSource(path=str(f), rephrase="question", rephrase_share=0)
