"""Offline helpfulness PROXY: perplexity of held-out reference answers (lower is better).

This is not MT-Bench. It is what fedsafe reports when no LLM judge is available: the exponentiated
token-mean cross-entropy of the model on reference answers of held-out normal instructions (loss on
the answer tokens only, chat template applied). It tracks how much a model's helpful behaviour
drifted, e.g. after a safety fine-tune, and is labelled ``helpfulness_proxy`` everywhere.
Safety rows (harmful request + refusal / harmful answer) are skipped, so that the proxy measures
normal answers only.
"""

from __future__ import annotations

import math

from fedsafe.data.format import mean_loss, tokenize_rows

PROXY_LABEL = "helpfulness proxy: perplexity of held-out reference answers (lower is better)"
SAFETY_CATEGORIES = frozenset({"aligned", "unaligned", "harmful", "refusal", "malicious", "unsafe", "safety"})


def normal_rows(rows: list[dict]) -> list[dict]:
    """Held-out rows that are not safety data (their category is not a safety category)."""
    return [r for r in rows if str(r.get("category") or "").lower() not in SAFETY_CATEGORIES]


def answer_perplexity(model, tokenizer, rows: list[dict], max_length: int, system: str | None = None,
                      batch_size: int = 8) -> float:
    """exp(mean cross-entropy on the reference answers of ``rows``); NaN when no row is usable."""
    examples = tokenize_rows(tokenizer, rows, max_length, system)
    if not examples:
        return float("nan")
    return math.exp(mean_loss(model, examples, tokenizer.pad_token_id, batch_size=batch_size))
