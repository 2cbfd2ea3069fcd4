"""fedsafe's held-out split: a pure function of the instruction text.

An instruction is *held out* when the first 8 bytes of the SHA-256 of its normalised text (lower case,
whitespace collapsed, surrounding punctuation dropped), read as an integer, fall below ``percent`` % of 2**64.
The split needs no state and no seed and is the same on every machine and in every file, so a data source with
``holdout: train`` and an evaluation set with ``holdout: heldout`` over the same file are disjoint by
construction (:mod:`fedsafe.data.holdout` checks it at run start).
"""

from __future__ import annotations

import hashlib
import re

_SPACE = re.compile(r"\s+")
_EDGE = " \t\n\"'`.,;:!?()[]{}"


def normalise_instruction(text: str) -> str:
    """The text the split and the overlap check compare: lower case, single spaces, no surrounding punctuation."""
    return _SPACE.sub(" ", str(text).lower()).strip(_EDGE)


def is_heldout(instruction: str, percent: float = 20.0) -> bool:
    """True when ``instruction`` falls in the held-out ``percent`` % of fedsafe's split."""
    digest = hashlib.sha256(normalise_instruction(instruction).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < percent / 100.0 * 2**64


def in_split(instruction: str, split: str | None, percent: float = 20.0) -> bool:
    """Whether ``instruction`` belongs to ``split`` ('train', 'heldout' or None = everything)."""
    if split is None:
        return True
    return is_heldout(instruction, percent) == (split == "heldout")
