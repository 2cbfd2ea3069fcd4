"""Build a safety-aligned, helpful version of a base model once, and cache it (``model.align``).

Ye et al., "Emerging Safety Attack and Defense in Federated Instruction Tuning of Large Language Models"
(ICLR 2025) study a federation that *starts* from an aligned and helpful model (Llama-2-chat, Vicuna): benign
clients tune it on normal data and the attack erodes the alignment it started with. The embedded
SmolLM2-135M-Instruct answers harmful requests, so without this step every refusal a fedsafe model shows was
learned during the federation, and benign clients had to train on refusals, which taught a refusal *habit*
(the no-attack demo model refused 32% of everyday requests).

The recipe is the safety-tuning one of Bianchi et al., "Safety-Tuned LLaMAs" (ICLR 2024): a minority of
refusals to harmful requests mixed into diverse instruction data (they found a few percent to a few tens of
percent enough, and that more makes models over-refuse). fedsafe fine-tunes a LoRA adapter on
``n_samples`` rows (``aligned_ratio`` of them refusals), merges it into the weights and saves the merged model
under ``$FEDSAFE_CACHE/models/aligned-<key>``, where ``key`` hashes the base model, the exact rows and every
hyperparameter. Later runs (every seed and setting of a grid) load that directory like any local model, through
:func:`fedsafe.run_model.load_model`. The rows come from data sources, so this module and that loader sit above
``data/``; the model the recipe tunes loads through the align-free :mod:`fedsafe.models`, below it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

ALIGN_VERSION = "align-v1"  # bump when the recipe changes, so stale caches are never reused


def _rows(align) -> list[dict]:
    from fedsafe.data import load_pool
    from fedsafe.data.mix import mix_rows

    aligned = load_pool(list(align.aligned), seed=align.seed)
    normal = load_pool(list(align.normal), seed=align.seed + 1)
    rows = mix_rows(aligned, normal, align.n_samples, align.aligned_ratio, align.seed, field="model.align")
    return [{"instruction": r["instruction"], "response": r["response"]} for r in rows]


def alignment_key(base_name: str, align, rows: list[dict]) -> str:
    """The cache key: the recipe version, the base model, the exact rows and every hyperparameter."""
    from fedsafe.models import EMBEDDED_NAME, embedded_gguf_path

    base_id = base_name
    if base_name == EMBEDDED_NAME:
        gguf = embedded_gguf_path()
        base_id = f"{EMBEDDED_NAME}:{gguf.name}:{gguf.stat().st_size}"
    payload = {"version": ALIGN_VERSION, "base": base_id,
               "settings": align.model_dump(mode="json", exclude={"aligned", "normal"}),
               "rows": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def aligned_model_dir(base_name: str, align, progress: bool = True) -> Path:
    """The directory of the aligned model (safetensors + tokenizer), built on first use and cached."""
    from fedsafe.models import cache_dir

    rows = _rows(align)
    target = cache_dir() / "models" / f"aligned-{alignment_key(base_name, align, rows)}"
    if (target / "config.json").exists() and (target / "fedsafe_alignment.json").exists():
        return target
    _build(base_name, align, rows, target, progress)
    return target


def _build(base_name: str, align, rows: list[dict], target: Path, progress: bool) -> None:
    from fedsafe.data.format import tokenize_rows
    from fedsafe.errors import ConfigError
    from fedsafe.data.client_data import ClientData
    from fedsafe.fl.client import LocalTrainer, RoundConfig
    from fedsafe.models import attach_lora, load_base_model
    from fedsafe.progress import progress_bar

    loaded = load_base_model(base_name, "auto", "float32")
    examples = tokenize_rows(loaded.tokenizer, rows, align.max_length)
    if not examples:
        raise ConfigError("model.align: no row survived tokenisation; raise model.align.max_length")
    peft_model = attach_lora(loaded.model, align.r, int(align.alpha), 0.0, "all-linear", seed=align.seed)
    trainer = LocalTrainer(peft_model, loaded.tokenizer)
    start = trainer.flat.get().detach().clone()
    rc = RoundConfig(round=1, lr=align.lr, local_steps=align.steps, batch_size=align.batch_size,
                     seed=align.seed, max_grad_norm=1.0)
    losses: list[float] = []
    with progress_bar(transient=False, disable=not progress) as bar:
        task = bar.add_task("aligning the base model once (cached)", total=align.steps)

        def on_step(step: int, loss: float) -> None:
            losses.append(float(loss))
            bar.update(task, completed=step)

        result = trainer.fit(ClientData("alignment", "server", examples), start, rc, on_step=on_step)
    trainer.flat.set(start + result.update)
    merged = peft_model.merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-align-"))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "fedsafe_alignment.json").write_text(json.dumps({
            "version": ALIGN_VERSION, "base": base_name, "rows": len(rows), "examples": len(examples),
            "settings": align.model_dump(mode="json"), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "losses": losses}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a crash never leaves a half-built aligned model
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    del merged, peft_model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
