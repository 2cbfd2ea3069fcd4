"""Evaluate one model state: generate on the harmful prompts (cached), then Rule / Judge / RM / MT-1 /
helpfulness proxy, as configured in ``eval``; over-refusal (and borderline refusal) apply Rule's refusal
strings to the answers to benign (and XSTest-style borderline) prompts, generated and cached separately.

Generations are cached under ``cache_dir/generations`` by (adapter hash, model, prompt set, generation
settings), so re-scoring a run with another judge or rule list never regenerates.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from fedsafe.config import DataSource, EvalConfig, PromptSet
from fedsafe.errors import ConfigError, DataError
from fedsafe.evaluation.rule import rule_score
from fedsafe.io import atomic_write_text

log = logging.getLogger("fedsafe")

PROMPT_FIELDS = ("goal", "prompt", "instruction", "question", "behavior", "text", "turns")
HELDOUT_PROXY_MAX = 64  # held-out answers used by the perplexity proxy
_loaded: dict[str, object] = {}  # judges / reward models / MT-Bench backends, loaded once per process


# ------------------------------------------------------------------------------------------------
# Prompt sets
# ------------------------------------------------------------------------------------------------

def load_prompts(source: str, n: int | None = None) -> list[str]:
    """Harmful prompts from an AdvBench-style CSV (``goal``), JSON/JSONL, ``starter:*`` or a hub id.

    ``starter:*`` keeps only its harmful requests (rows whose category is a safety category).
    The first ``n`` prompts are returned, in file order.
    """
    from fedsafe.data.records import STARTER_SPLITS, raw_records

    if source in STARTER_SPLITS:
        from fedsafe.evaluation.helpfulness import SAFETY_CATEGORIES

        records = raw_records(DataSource(path=source))
        records = [r for r in records if str(r.get("category") or "").lower() in SAFETY_CATEGORIES]
        if not records:
            raise DataError(f"eval.prompts={source!r}: no harmful requests (safety categories) in the starter set")
    else:
        try:
            records = raw_records(DataSource(path=source))
        except DataError as exc:
            raise DataError(f"eval.prompts={source!r}: {exc}") from exc
    prompts = []
    for rec in records:
        if isinstance(rec, str):
            prompts.append(rec)
            continue
        key = next((k for k in PROMPT_FIELDS if k in rec and rec[k]), None)
        if key is None:
            raise DataError(f"eval.prompts={source!r}: records need one of the fields {PROMPT_FIELDS}; "
                            f"found {sorted(rec)}")
        prompts.append(str(rec[key]).strip())
    if not prompts:
        raise DataError(f"eval.prompts={source!r} holds no prompts")
    return prompts[:n] if n else prompts


def select_prompts(source: str, n: int, sample: bool = False, seed: int = 0) -> tuple[list[int], list[str]]:
    """``(prompt ids, prompts)``: the first ``n`` prompts, or ``n`` drawn at random under ``seed`` (``sample``).

    A prompt's id is its position in the full prompt set, so evaluations of different settings can be
    paired prompt by prompt (:mod:`fedsafe.stats`).
    """
    return _select(load_prompts(source), n, sample, [seed, 20_240_521])


def _select(prompts: list[str], n: int, sample: bool, rng_key: list[int]) -> tuple[list[int], list[str]]:
    if not sample or n >= len(prompts):
        ids = list(range(min(n, len(prompts))))
    else:
        import numpy as np

        ids = sorted(int(i) for i in np.random.default_rng(rng_key).choice(len(prompts), n, replace=False))
    return ids, [prompts[i] for i in ids]


def load_benign_prompts(source: PromptSet, field: str = "eval.normal_prompts") -> list[str]:
    """Benign prompts for over-refusal (``eval.normal_prompts``) or borderline refusal (``eval.borderline_prompts``).

    ``source`` is a path / hub id / ``starter:*`` (the prompt field is found among :data:`PROMPT_FIELDS`;
    ``starter:*`` keeps only its normal instructions, i.e. rows outside the safety categories), or a
    :class:`DataSource` whose ``instruction_field`` (plus ``input_field``) holds the prompt and whose
    ``category_field`` / ``categories`` filter the rows (XSTest: ``category_field: label, categories: [safe]``).
    A field holding a list of turns (MT-Bench's ``turns``) gives its first turn. All prompts are returned in
    file order (``max_rows`` caps them). A list of sources is read in order and joined, each distinct prompt
    once (an error names the list item that holds none).
    """
    if isinstance(source, list):
        if not source:
            raise ConfigError(f"{field}: an empty list of prompt sources")
        from fedsafe.data.split import normalise_instruction

        joined: list[str] = []
        seen: set[str] = set()
        for i, item in enumerate(source):
            for p in load_benign_prompts(item, f"{field}[{i}]"):
                if normalise_instruction(p) not in seen:
                    seen.add(normalise_instruction(p))
                    joined.append(p)
        return joined
    from fedsafe.data.records import STARTER_SPLITS, raw_records
    from fedsafe.evaluation.helpfulness import SAFETY_CATEGORIES

    src = source if isinstance(source, DataSource) else DataSource(path=source)
    if src.path is None:
        raise ConfigError(f"{field}: give a prompt file (path), not generated data")
    try:
        records = raw_records(src)
    except DataError as exc:
        raise DataError(f"{field}={src.path!r}: {exc}") from exc
    if src.categories is not None:
        cat_field = src.category_field or "category"
        wanted = {str(c).lower() for c in src.categories}
        records = [r for r in records if isinstance(r, dict) and str(r.get(cat_field) or "").lower() in wanted]
    elif src.path in STARTER_SPLITS:
        records = [r for r in records if str(r.get("category") or "").lower() not in SAFETY_CATEGORIES]
    prompts = []
    for rec in records:
        if isinstance(rec, str):
            prompts.append(rec.strip())
            continue
        if isinstance(source, DataSource):
            if src.instruction_field in rec and not str(rec[src.instruction_field] or "").strip():
                continue  # an empty instruction is no prompt (helpfulQA.json holds one)
            if not rec.get(src.instruction_field):
                raise DataError(f"{field}: a record has no field {src.instruction_field!r} (instruction_field); "
                                f"found {sorted(rec)}")
            text = _first_turn(rec[src.instruction_field])
            if src.input_field and rec.get(src.input_field):
                text = f"{text}\n\n{str(rec[src.input_field]).strip()}"
        else:
            key = next((k for k in PROMPT_FIELDS if k in rec and rec[k]), None)
            if key is None:
                raise DataError(f"{field}={src.path!r}: records need one of the fields {PROMPT_FIELDS} (or give "
                                f"a data source with instruction_field); found {sorted(rec)}")
            text = _first_turn(rec[key])
        prompts.append(text)
    if src.holdout is not None:
        from fedsafe.data.split import in_split

        prompts = [p for p in prompts if in_split(p, src.holdout, src.holdout_percent)]
    from fedsafe.data.sources import excluded_instructions
    from fedsafe.data.split import normalise_instruction

    seen: set[str] = excluded_instructions(src.exclude)  # excluded instructions count as seen  # a prompt set scores each distinct prompt once (instruction files repeat some)
    prompts = [p for p in prompts if not (normalise_instruction(p) in seen or seen.add(normalise_instruction(p)))]
    if not prompts:
        raise DataError(f"{field}={src.path!r} holds no prompts (after the category / holdout filter)")
    return prompts[:src.max_rows] if src.max_rows else prompts


def prompt_source_names(prompts: list[str], source: PromptSet) -> list[str]:
    """For each prompt of a prompt set, the name of the source that holds it: the file name (or hub id) of the
    first source of a joined list whose prompts include it (normalised text); one source names every prompt."""
    from fedsafe.data.split import normalise_instruction

    def name(src) -> str:
        path = src.path if isinstance(src, DataSource) else str(src)
        return Path(path).name if path and Path(path).suffix else str(path)

    if not isinstance(source, list):
        return [name(source)] * len(prompts)
    held = [(name(s), {normalise_instruction(p) for p in load_benign_prompts(s)}) for s in source]
    return [next((n for n, texts in held if normalise_instruction(p) in texts), "?") for p in prompts]


def _first_turn(value) -> str:
    """A prompt field's text: a list of turns (MT-Bench's ``turns``) gives its first, the single-turn prompt."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return str(value).strip()


# ------------------------------------------------------------------------------------------------
# Cached generation
# ------------------------------------------------------------------------------------------------

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def adapter_hash(vec: torch.Tensor | None) -> str:
    """A content hash of a flat LoRA vector (``base`` for None)."""
    if vec is None:
        return "base"
    return _sha(vec.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())[:16]


def noop_adapter_key(model, flat, vec: torch.Tensor) -> str | None:
    """``base-<weights digest>`` when every LoRA B factor of ``vec`` is zero, else None.

    Such an adapter (PEFT's initialisation) leaves the base model unchanged, so its generations are
    the base model's whatever the seed-dependent A factors hold: a grid evaluates round 0 once, not
    once per setting and seed. The digest covers a slice of the base weights, since the random ``tiny``
    model differs by seed while its config does not.
    """
    b_parts = [vec[s.offset: s.offset + s.numel] for s in flat.specs if s.kind == "B"]
    if not b_parts or any(bool(p.any()) for p in b_parts):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "base-" + _sha(_weights_sample(base))[:16]


def _weights_sample(base) -> bytes:
    """A slice of the first embedding and of the last adapted projection's base weights: enough to tell the
    seeds of ``tiny`` apart, and a base model from its aligned version (``model.align`` changes projections,
    not embeddings)."""
    params = [(n, p) for n, p in base.named_parameters() if "lora_" not in n]
    picks = [params[0][1]] + [p for n, p in params if n.endswith(("proj.weight", "proj.base_layer.weight"))][-1:]
    return b"".join(p.detach().reshape(-1)[:4096].to(torch.float32).cpu().contiguous().numpy().tobytes()
                    for p in picks)


def model_fingerprint(model) -> str:
    """Identify the base model by its config (name, sizes) and a slice of its weights, so caches never mix
    models (an aligned base has its base's config)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    text = cfg.to_json_string(use_diff=False) if cfg is not None else type(base).__name__
    return _sha(text.encode() + _weights_sample(base))[:12]


def cached_generate(model, tokenizer, prompts: list[str], *, cache_dir: Path | None, adapter_key: str,
                    max_new_tokens: int, batch_size: int | str, progress: bool = False,
                    description: str = "generating",
                    static_cache: str = "off") -> tuple[list[str], Path | None, bool]:
    """Greedy responses to ``prompts``; read from / written to the cache. Returns (responses, path, hit).
    ``static_cache`` is ``eval.static_cache`` (the GPU path of :mod:`fedsafe.generation`, named in the key)."""
    from fedsafe.generation import GENERATION_PATH, STATIC_GENERATION_PATH, generate, use_static_cache

    prompt_key = _sha(json.dumps(prompts).encode())[:12]
    static = use_static_cache(static_cache, next(model.parameters()).device)
    gen_path = STATIC_GENERATION_PATH if static else GENERATION_PATH
    settings_key = _sha(json.dumps({"max_new_tokens": max_new_tokens, "greedy": True, "path": gen_path,
                                    "model": model_fingerprint(model)}).encode())[:8]
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "generations" / f"{adapter_key}-{prompt_key}-{settings_key}.json"
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("prompts") == prompts:
                    return data["responses"], path, True
            except (json.JSONDecodeError, KeyError):
                log.warning("ignoring a corrupt generation cache file %s", path)
    responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         progress=progress, description=description, static_cache=static)
    if path is not None:
        atomic_write_text(path, json.dumps({"adapter": adapter_key, "max_new_tokens": max_new_tokens,
                                            "prompts": prompts, "responses": responses}, indent=1))
    return responses, path, False


# ------------------------------------------------------------------------------------------------
# Scorers loaded once per process
# ------------------------------------------------------------------------------------------------

def _judge(spec: dict):
    from fedsafe.evaluation.judges import build_judge

    key = "judge:" + json.dumps(spec, sort_keys=True)
    if key not in _loaded:
        _loaded[key] = build_judge(spec)
    return _loaded[key]


def _reward_model(name: str):
    from fedsafe.evaluation.reward import RewardModel

    key = "rm:" + name
    if key not in _loaded:
        _loaded[key] = RewardModel(name)
    return _loaded[key]


def _mt_backend(spec: dict):
    from fedsafe.evaluation.judges import make_backend

    key = "mt:" + json.dumps(spec, sort_keys=True)
    if key not in _loaded:
        _loaded[key] = make_backend(spec, field="eval.mt_bench.judge")
    return _loaded[key]


def _heldout_rows(heldout) -> list[dict]:
    from fedsafe.data import load_pool
    from fedsafe.evaluation.helpfulness import normal_rows

    if not heldout:
        return []
    if all(isinstance(h, DataSource) for h in heldout):
        rows = load_pool(list(heldout), seed=99)
    elif all(isinstance(h, dict) and "instruction" in h for h in heldout):
        rows = list(heldout)
    else:
        raise ConfigError("data.heldout must be data sources (or instruction/response rows)")
    return normal_rows(rows)[:HELDOUT_PROXY_MAX]


# ------------------------------------------------------------------------------------------------
# The evaluation
# ------------------------------------------------------------------------------------------------

# what an evaluation returns, in table order (results.csv, the eval command, the run's eval records)
SCORE_KEYS = ("rule", "refusal", "over_refusal", "borderline_refusal", "judge", "rm", "mt1", "helpfulness_proxy", "n_prompts",
              "n_normal_prompts", "n_borderline_prompts")
# benign prompt sets: metric -> (config field, count field, rng salt, progress label)
REFUSAL_SETS = {"over_refusal": ("normal_prompts", "n_normal_prompts", 1, "eval: benign prompts"),
                "borderline_refusal": ("borderline_prompts", "n_borderline_prompts", 2, "eval: borderline prompts")}


def refusals(responses: list[str], eval_cfg: EvalConfig) -> list[bool]:
    """Which responses are refusals, by ``eval.refusal_detector``: the validated detector or Rule's strings."""
    if getattr(eval_cfg, "refusal_detector", "detector") == "rule":
        from fedsafe.evaluation.rule import refusal_flags

        return refusal_flags(responses, eval_cfg.rule_list)
    from fedsafe.evaluation.refusal import detect_refusals

    return detect_refusals(responses)


def benign_sets(eval_cfg: EvalConfig, seed: int = 0) -> dict[str, tuple[str, list[int], list[str]]]:
    """The benign prompt sets an evaluation scores: metric -> (config field, prompt ids, prompts).

    Over-refusal accompanies Rule (it is measured with the safety evaluation, so only when ``eval.prompts``
    is set); borderline refusal stands alone. The same prompts the run-start held-out check verifies.
    """
    out = {}
    for metric, (src_field, n_field, salt, _) in REFUSAL_SETS.items():
        source, n = getattr(eval_cfg, src_field, None), getattr(eval_cfg, n_field, 0)
        if not source or not n or (metric == "over_refusal" and not eval_cfg.prompts):
            continue
        ids, prompts = _select(load_benign_prompts(source, f"eval.{src_field}"), n,
                               getattr(eval_cfg, "sample_prompts", False), [seed, 20_240_521, salt])
        out[metric] = (f"eval.{src_field}", ids, prompts)
    return out


def evaluate_model(peft_model, tokenizer, eval_cfg: EvalConfig, cache_dir: str | Path | None = None,
                   adapter_vec: torch.Tensor | None = None, heldout=None, max_length: int = 256,
                   progress: bool = False, seed: int = 0, adapter_key: str | None = None) -> dict:
    """Score the model as it is now (its adapter already set) on everything ``eval_cfg`` enables.

    Returns ``rule`` (%, refusal-string share), ``over_refusal`` (%, the same share on the benign
    ``normal_prompts``, measured with the safety evaluation: lower is better), ``borderline_refusal`` (%, on
    the optional XSTest-style ``borderline_prompts``), ``judge`` (%, judged safe), ``rm`` (mean reward),
    ``mt1`` (MT-Bench turn-1 rating, 1-10), ``helpfulness_proxy`` (held-out answer perplexity, lower is
    better) and the prompt counts; a metric that is not configured is None. ``per_prompt`` holds the
    ``prompt_ids`` and each per-prompt metric's value per prompt (Rule and Judge as 100/0, Judge None
    when unparsed, RM the reward; over-refusal and borderline refusal as 100/0 with their own
    ``<metric>_prompt_ids``), which the intervals of :mod:`fedsafe.stats` resample. ``seed`` draws
    the prompts when ``eval_cfg.sample_prompts``; ``adapter_key`` overrides the generation-cache key.
    """
    out: dict = {k: None for k in SCORE_KEYS}
    out.update(n_prompts=0, n_normal_prompts=0, n_borderline_prompts=0)
    per_prompt: dict = {}
    key = adapter_key or adapter_hash(adapter_vec)
    cache = Path(cache_dir) if cache_dir is not None else None
    if eval_cfg.prompts:
        from fedsafe.evaluation.rule import refusal_flags

        prompt_ids, prompts = select_prompts(eval_cfg.prompts, eval_cfg.n_prompts,
                                             getattr(eval_cfg, "sample_prompts", False), seed)
        responses, path, _ = cached_generate(peft_model, tokenizer, prompts, cache_dir=cache, adapter_key=key,
                                             max_new_tokens=eval_cfg.max_new_tokens,
                                             batch_size=eval_cfg.batch_size, progress=progress,
                                             static_cache=getattr(eval_cfg, "static_cache", "off"),
                                             description="eval: harmful prompts")
        out["n_prompts"] = len(prompts)
        out["rule"] = rule_score(responses, eval_cfg.rule_list)
        refused = refusals(responses, eval_cfg)
        out["refusal"] = 100.0 * sum(refused) / len(refused)
        per_prompt.update(prompt_ids=prompt_ids,
                          rule=[100.0 if f else 0.0 for f in refusal_flags(responses, eval_cfg.rule_list)],
                          refusal=[100.0 if f else 0.0 for f in refused])
        if path is not None:
            out["generations"] = str(path)
        if eval_cfg.judge:
            from fedsafe.evaluation.judges import judge_score

            verdicts = _judge(eval_cfg.judge).judge(prompts, responses)
            out["judge"] = judge_score(verdicts)
            per_prompt["judge"] = [None if v is None else (100.0 if v else 0.0) for v in verdicts]
        if eval_cfg.reward_model:
            rewards = _reward_model(eval_cfg.reward_model).scores(prompts, responses)
            out["rm"] = sum(rewards) / len(rewards) if rewards else float("nan")
            per_prompt["rm"] = rewards
    for metric, (field, ids, prompts) in benign_sets(eval_cfg, seed).items():
        description = REFUSAL_SETS[metric][3]
        n_field = REFUSAL_SETS[metric][1]
        responses, _, _ = cached_generate(peft_model, tokenizer, prompts, cache_dir=cache, adapter_key=key,
                                          max_new_tokens=getattr(eval_cfg, "refusal_max_new_tokens", None)
                                          or eval_cfg.max_new_tokens, batch_size=eval_cfg.batch_size,
                                          static_cache=getattr(eval_cfg, "static_cache", "off"),
                                          progress=progress, description=description)
        flags = [100.0 if f else 0.0 for f in refusals(responses, eval_cfg)]
        out[metric] = sum(flags) / len(flags)
        out[n_field] = len(flags)
        if isinstance(getattr(eval_cfg, REFUSAL_SETS[metric][0]), list):  # a joined set: each source's share too
            names = prompt_source_names(prompts, getattr(eval_cfg, REFUSAL_SETS[metric][0]))
            out[f"{metric}_by_source"] = {n: sum(f for f, m in zip(flags, names) if m == n) / names.count(n)
                                          for n in dict.fromkeys(names)}
        per_prompt.update({metric: flags, f"{metric}_prompt_ids": ids})
    if per_prompt:
        out["per_prompt"] = per_prompt
    if eval_cfg.mt_bench:
        from fedsafe.evaluation.mtbench import MTBench, check_spec, score_answers

        spec = eval_cfg.mt_bench
        check_spec(spec)
        bench = MTBench.load(spec["questions"], spec["judge_prompts"], spec.get("references"),
                             spec.get("n_questions"), spec.get("categories"))
        answers, _, _ = cached_generate(peft_model, tokenizer, bench.turn1(), cache_dir=cache, adapter_key=key,
                                        max_new_tokens=int(spec.get("max_new_tokens", 512)),
                                        batch_size=eval_cfg.batch_size, progress=progress,
                                        static_cache=getattr(eval_cfg, "static_cache", "off"),
                                        description="eval: MT-Bench turn 1")
        scored = score_answers(bench, answers, _mt_backend(dict(spec["judge"])),
                               int(spec.get("judge_max_new_tokens", 1024)))
        out["mt1"] = scored["mt1"]
    if eval_cfg.helpfulness_proxy:
        rows = _heldout_rows(heldout)
        if rows:
            from fedsafe.evaluation.helpfulness import answer_perplexity

            out["helpfulness_proxy"] = answer_perplexity(peft_model, tokenizer, rows, max_length)
    return out
