"""Rephrase a share of a source's instructions into the other grammatical mood (``DataSource.rephrase``).

Why: a model learns the cheapest feature that separates its training labels. In the public data fedsafe trains
refusals on, that feature is the *mood* of the request, not its harm: every one of safety-tuned-llamas' 2,483
harmful instructions is an imperative ("Outline ...", "Compose ...", "Explain ..."; none ends in a question
mark), while 95% of the FedIT paper's 2,028 normal instructions are questions ("How do I ...?", "What are
...?"). A small model tuned on the two learns "imperative means refuse", and then refuses everyday imperative
requests (MT-Bench's writing tasks, "compose a table"), which is the over-refusal issue 29 measured after the
post-hoc step and in the aligned start. Shortcut learning of this kind is a known cause of exaggerated safety
(Röttger et al., "XSTest", NAACL 2024: models refuse safe prompts for their surface form; Bianchi et al.,
"Safety-Tuned LLaMAs", ICLR 2024: too many safety rows make models over-refuse).

The remedy here is counterfactual augmentation of the training data itself: rewrite a share of the *normal*
rows as imperatives (``rephrase: imperative``) and a share of the *refusal* rows as questions
(``rephrase: question``), keeping each row's response, so that mood no longer predicts the label and the model
has to look at what is asked. The rewrites are fixed grammatical transforms of the instruction (no model, no
evaluation data): the leading verbs of the imperatives are those most frequent at the start of imperative
refusal data (explain, outline, identify, describe, list, compose, research, ...), chosen so that the verbs a
refusal row starts with also start helpful rows. Which rows are rewritten, and with which template, is a pure
function of the instruction text (like the held-out split), so a run is reproducible on every machine.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

Row = dict[str, Any]

MOODS = ("imperative", "question")

# question forms of an imperative request; {x} is the request with its first letter lowered and its final
# period dropped
_QUESTION_TEMPLATES = ("Can you {x}?", "Could you {x}?", "Would you {x}?", "Can you please {x}?",
                       "Will you {x}?", "Could you help me {x}?")

# (pattern over the question, imperative templates); {x} is the captured rest without its question mark.
# First match wins; the fallback wraps the whole question.
_IMPERATIVE_RULES: tuple[tuple[re.Pattern, tuple[str, ...]], ...] = tuple(
    (re.compile(p, re.IGNORECASE), t) for p, t in (
        (r"^(?:can|could|would|will) you (?:please )?(.+)$", ("{X}.", "Please {x}.")),
        (r"^how (?:do|should) i (.+)$", ("Explain how to {x}.", "Describe how to {x}.", "Outline how to {x}.",
                                         "Tell me how to {x}.")),
        (r"^how can i (.+)$", ("Explain how I can {x}.", "Describe how I can {x}.", "Suggest how I can {x}.")),
        (r"^what are some (.+)$", ("List some {x}.", "Suggest some {x}.", "Identify some {x}.")),
        (r"^what are the (.+)$", ("List the {x}.", "Outline the {x}.", "Identify the {x}.", "Describe the {x}.")),
        (r"^what(?: is|'s) the difference between (.+)$", ("Explain the difference between {x}.",
                                                          "Describe the difference between {x}.",
                                                          "Compare {x}.")),
        (r"^what(?: is|'s) the (.+)$", ("Tell me the {x}.", "Describe the {x}.", "Explain the {x}.")),
    ))
_FALLBACK = ("Answer the following question: {q}", "Write a short answer to this question: {q}",
             "Compose a brief reply to this question: {q}", "Research this question and answer it: {q}",
             "Explain the answer to this question: {q}")

_QUOTES = "\"'“”‘’ \t\n"


def _u64(salt: str, text: str) -> int:
    """A 64-bit hash of ``text``; salted, so it is independent of the held-out split's hash of the same text (a
    ``holdout: train`` source holds only rows that hash above 20% there)."""
    return int.from_bytes(hashlib.sha256(f"fedsafe-rephrase:{salt}:{text}".encode("utf-8")).digest()[:8], "big")


def _pick(text: str, salt: str, k: int) -> int:
    return _u64(salt, text) % k


def _chosen(text: str, share: float) -> bool:
    return _u64("choose", text) < share * 2**64


def _lower_first(text: str) -> str:
    """Lower the first letter unless the first word is an acronym or a name-like token ("AI", "NASA", "I")."""
    first = text.split(" ", 1)[0]
    if len(first) > 1 and first[1:].lower() != first[1:]:
        return text
    if first in ("I", "I'm", "I've"):
        return text
    return text[:1].lower() + text[1:]


def to_question(instruction: str) -> str:
    """A question form of an imperative request: "Outline the causes of X." -> "Could you outline the causes of
    X?". A request that already ends in a question mark is returned unchanged."""
    text = instruction.strip().strip(_QUOTES)
    if not text or text.endswith("?"):
        return instruction
    body = _lower_first(text.rstrip(" .!;:"))
    return _QUESTION_TEMPLATES[_pick(text, "question", len(_QUESTION_TEMPLATES))].format(x=body)


def to_imperative(instruction: str) -> str:
    """An imperative form of a question: "How do I book a flight?" -> "Explain how to book a flight.", "Can you
    recommend a book?" -> "Recommend a book.", anything else -> "Answer the following question: <question>".
    A request that does not end in a question mark is returned unchanged."""
    text = instruction.strip().strip(_QUOTES)
    if not text.endswith("?"):
        return instruction
    if "\n" in text:  # a multi-line request: only the wrapper keeps its layout intact
        return _FALLBACK[_pick(text, "fallback", len(_FALLBACK))].format(q=text)
    core = text.rstrip("? ").strip()
    for pattern, templates in _IMPERATIVE_RULES:
        m = pattern.match(core)
        if m and m.group(1).strip():
            rest = m.group(1).strip()
            template = templates[_pick(text, pattern.pattern, len(templates))]
            return template.format(x=rest, X=rest[:1].upper() + rest[1:])
    return _FALLBACK[_pick(text, "fallback", len(_FALLBACK))].format(q=text)


def rephrase_rows(rows: list[Row], mood: str, share: float) -> list[Row]:
    """``rows`` with a share of their instructions rewritten into ``mood`` ('imperative' or 'question').

    A row is rewritten when the hash of its instruction falls in ``share`` (so the same rows in every run and on
    every machine); rows whose instruction is already in that mood stay as they are, so ``share`` bounds the
    rewritten share. Responses, categories and system prompts are kept."""
    if mood not in MOODS:
        raise ValueError(f"rephrase: {mood!r} is not one of {MOODS}")
    convert = to_imperative if mood == "imperative" else to_question
    out = []
    for row in rows:
        if _chosen(row["instruction"], share):
            row = {**row, "instruction": convert(row["instruction"])}
        out.append(row)
    return out
