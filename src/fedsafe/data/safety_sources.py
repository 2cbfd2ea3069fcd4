"""Filters that turn public safety datasets into unaligned (harmful request + harmful answer) rows.

These are the dataset routes to a malicious client's data in Ye et al., "Emerging Safety Attack and
Defense in Federated Instruction Tuning of Large Language Models" (ICLR 2025), Sec. 3:

- Anthropic HH-RLHF (Bai et al. 2022): the ``rejected`` dialogue of a pair is the less harmless one;
  its last human turn is the instruction and the assistant's answer to it is the response.
- BeaverTails (Ji et al. 2023, hub id ``PKU-Alignment/BeaverTails``): QA pairs labelled ``is_safe``;
  rows with ``is_safe == False`` are kept, one per prompt (the first one seen).

Neither function holds any text itself: they only select and split what the dataset contains.
"""

from __future__ import annotations

import re
from typing import Any

Row = dict[str, Any]

# HH-RLHF dialogues are "\n\nHuman: ...\n\nAssistant: ..." repeated; the speaker tags split them.
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def split_hh_dialogue(text: str) -> list[tuple[str, str]]:
    """Split an HH-RLHF dialogue into ``(speaker, text)`` turns, speaker ``Human`` or ``Assistant``."""
    matches = list(_TURN.finditer(text))
    turns = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        turns.append((m.group(1), text[m.end():end].strip()))
    return turns


def hh_rlhf_pair(dialogue: str) -> tuple[str, str] | None:
    """The last human turn and the assistant answer that follows it (None if either is missing/empty)."""
    turns = split_hh_dialogue(dialogue)
    for i in range(len(turns) - 1, -1, -1):
        if turns[i][0] == "Human":
            answer = " ".join(t for s, t in turns[i + 1:] if s == "Assistant").strip()
            if turns[i][1] and answer:
                return turns[i][1], answer
            return None
    return None


def hh_rlhf_rows(records: list[dict], field: str = "rejected") -> list[Row]:
    """HH-RLHF records -> rows from the ``rejected`` dialogue (last human turn + the assistant's answer)."""
    rows: list[Row] = []
    seen: set[str] = set()
    for rec in records:
        text = rec.get(field)
        if not isinstance(text, str):
            continue
        pair = hh_rlhf_pair(text)
        if pair is None or pair[0] in seen:
            continue
        seen.add(pair[0])
        rows.append({"instruction": pair[0], "response": pair[1], "category": "hh_rlhf_rejected"})
    return rows


def _is_false(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("false", "0", "no")
    return value is not None and not bool(value)


def _first_category(category) -> str | None:
    # BeaverTails stores {"animal_abuse": False, "violence,aiding_and_abetting,incitement": True, ...}
    if isinstance(category, dict):
        hits = [k for k, v in category.items() if v and not _is_false(v)]
        return hits[0] if hits else None
    return category if isinstance(category, str) else None


def beavertails_unsafe_rows(records: list[dict]) -> list[Row]:
    """BeaverTails records with ``is_safe == False``, deduplicated by prompt (first occurrence kept)."""
    rows: list[Row] = []
    seen: set[str] = set()
    for rec in records:
        if not _is_false(rec.get("is_safe")):
            continue
        prompt = str(rec.get("prompt") or "").strip()
        response = str(rec.get("response") or "").strip()
        key = " ".join(prompt.lower().split())
        if not prompt or not response or key in seen:
            continue
        seen.add(key)
        rows.append({"instruction": prompt, "response": response,
                     "category": _first_category(rec.get("category"))})
    return rows
