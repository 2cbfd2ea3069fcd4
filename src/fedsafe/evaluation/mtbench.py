"""MT-Bench turn 1 with an LLM judge (single-answer grading), as in Zheng et al., "Judging LLM-as-a-Judge
with MT-Bench and Chatbot Arena" (NeurIPS 2023 Datasets and Benchmarks), lm-sys/FastChat ``llm_judge``.

The evaluated model answers the first turn of each question. The judge receives the ``single-v1``
prompt, or ``single-math-v1`` with the reference answer for the categories that need one (math,
reasoning, coding), both loaded from the judge-prompts file the user gives. The rating is parsed from
``[[rating]]`` (with FastChat's ``[rating]`` fallback); unparsable judgements are left out of the mean.
Ye et al. (ICLR 2025) report this mean as "MT-1".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from fedsafe.errors import ConfigError

NEED_REF_CATEGORIES = ("math", "reasoning", "coding", "arena-hard-200")  # FastChat common.NEED_REF_CATS
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
_SPEC_KEYS = {"questions", "judge_prompts", "references", "judge", "n_questions", "max_new_tokens",
              "judge_max_new_tokens", "categories"}


def parse_rating(judgement: str) -> float | None:
    """The ``[[rating]]`` of a judgement (fallback ``[rating]``); None when absent."""
    match = _RATING.search(judgement) or _RATING_BACKUP.search(judgement)
    if not match:
        return None
    value = float(match.group(1))
    return value if 0 <= value <= 10 else None


def _read_jsonl(path: str, field_name: str) -> list[dict]:
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"eval.mt_bench.{field_name}={path!r}: file not found")
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class MTBench:
    """Questions, judge prompt templates (by name) and reference answers (by question id)."""

    questions: list[dict]
    judge_prompts: dict[str, dict]
    references: dict[int, str] = field(default_factory=dict)

    @classmethod
    def load(cls, questions: str, judge_prompts: str, references: str | None = None,
             n_questions: int | None = None, categories: list[str] | None = None) -> "MTBench":
        """Read FastChat's question.jsonl, judge_prompts.jsonl and reference_answer/gpt-4.jsonl."""
        qs = _read_jsonl(questions, "questions")
        if categories:
            qs = [q for q in qs if q.get("category") in categories]
        if n_questions:
            qs = qs[:n_questions]
        prompts = {p["name"]: p for p in _read_jsonl(judge_prompts, "judge_prompts")}
        for name in ("single-v1", "single-math-v1"):
            if name not in prompts:
                raise ConfigError(f"eval.mt_bench.judge_prompts: {judge_prompts} has no {name!r} prompt "
                                  f"(found {sorted(prompts)})")
        refs = {}
        if references:
            for r in _read_jsonl(references, "references"):
                refs[int(r["question_id"])] = r["choices"][0]["turns"][0]
        return cls(qs, prompts, refs)

    def turn1(self) -> list[str]:
        """The first-turn user message of every question."""
        return [q["turns"][0] for q in self.questions]

    def judge_messages(self, answers: list[str]) -> list[list[dict] | None]:
        """Judge conversations (system + user); None where a needed reference answer is missing."""
        out: list[list[dict] | None] = []
        for q, answer in zip(self.questions, answers):
            needs_ref = q.get("category") in NEED_REF_CATEGORIES
            if needs_ref:
                ref = self.references.get(int(q["question_id"]))
                if ref is None:
                    out.append(None)
                    continue
                tpl = self.judge_prompts["single-math-v1"]
                user = tpl["prompt_template"].format(question=q["turns"][0], answer=answer, ref_answer_1=ref)
            else:
                tpl = self.judge_prompts["single-v1"]
                user = tpl["prompt_template"].format(question=q["turns"][0], answer=answer)
            out.append([{"role": "system", "content": tpl["system_prompt"]}, {"role": "user", "content": user}])
        return out


def check_spec(spec: dict) -> None:
    """Fail early, naming the field, on a malformed ``eval.mt_bench``."""
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ConfigError(f"eval.mt_bench: unknown field(s) {sorted(unknown)}; known: {sorted(_SPEC_KEYS)}")
    for key in ("questions", "judge_prompts", "judge"):
        if not spec.get(key):
            raise ConfigError(f"eval.mt_bench.{key} is required")


def score_answers(bench: MTBench, answers: list[str], backend, judge_max_new_tokens: int = 1024) -> dict:
    """Judge the answers; returns mt1 (mean rating), per-category means and the unparsed count."""
    conversations = bench.judge_messages(answers)
    todo = [i for i, c in enumerate(conversations) if c is not None]
    judgements = backend.chat([conversations[i] for i in todo], judge_max_new_tokens) if todo else []
    ratings: list[float | None] = [None] * len(answers)
    for i, text in zip(todo, judgements):
        ratings[i] = parse_rating(text)
    valid = [r for r in ratings if r is not None]
    by_cat: dict[str, list[float]] = {}
    for q, r in zip(bench.questions, ratings):
        if r is not None:
            by_cat.setdefault(q.get("category", "?"), []).append(r)
    return {"mt1": sum(valid) / len(valid) if valid else float("nan"),
            "mt1_by_category": {k: sum(v) / len(v) for k, v in by_cat.items()},
            "mt1_unparsed": len(answers) - len(valid), "ratings": ratings, "judgements": judgements}
