"""Batched, left-padded, seeded generation from a (PEFT) causal LM, without merging adapters."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Prompt = str | list[dict]


def to_chat_text(tokenizer, prompt: Prompt, system: str | None = None) -> str:
    """Render a user prompt (or a message list) with the tokenizer's chat template, ready to generate."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int = 64,
             batch_size: int = 16, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, chat: bool = True, system: str | None = None,
             progress: bool = False, description: str = "generating") -> list[str]:
    """Generate one completion per prompt; greedy by default, batched and left-padded.

    Prompts are sorted by length so that batches pad little, and results come back in input order.
    With ``chat=False`` prompts are raw text continued as is (used by extraction attacks).
    """
    return _generate(model, tokenizer, prompts, None, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed, chat=chat, system=system,
                     progress=progress, description=description)[0]


@torch.no_grad()
def generate_adapters(model, tokenizer, flat, vecs: Sequence[torch.Tensor], prompts: Sequence[Prompt], *,
                      max_new_tokens: int = 64, batch_size: int = 16, chat: bool = True, system: str | None = None,
                      progress: bool = False, description: str = "generating") -> list[list[str]]:
    """Greedy completions of ``prompts`` under each of K adapters (flat LoRA vectors ``vecs``), ``[K][prompts]``.

    One ``generate`` call per prompt batch serves all K adapters: the batch is repeated K times and each copy's
    rows go through its own adapter (fedsafe.fl.batched.adapter_rows), the base model through all rows at once.
    The prompt batches and their padding are those of :func:`generate`, so the completions equal loading each
    adapter in turn and calling :func:`generate` (sampling would draw in another order, so this is greedy only).
    """
    return _generate(model, tokenizer, prompts, (flat, list(vecs)), max_new_tokens=max_new_tokens,
                     batch_size=batch_size, do_sample=False, temperature=1.0, top_p=1.0, seed=0, chat=chat,
                     system=system, progress=progress, description=description)


def _generate(model, tokenizer, prompts, adapters, *, max_new_tokens, batch_size, do_sample, temperature, top_p,
              seed, chat, system, progress, description) -> list[list[str]]:
    """:func:`generate` for one adapter (the model's own, ``adapters=None``) or K (``(flat, vecs)``)."""
    from contextlib import nullcontext

    texts = [to_chat_text(tokenizer, p, system) if chat else p for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    copies = 1 if adapters is None else len(adapters[1])
    outputs: list[list[str]] = [[""] * len(texts) for _ in range(copies)]
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    try:
        batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
        iterator = _progress(batches, description) if progress else batches
        for b_idx, batch in enumerate(iterator):
            enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True,
                            add_special_tokens=not chat).to(device)
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
                torch.manual_seed(seed * 1_000_003 + b_idx)  # per-batch seed: reproducible sampling
            context = nullcontext()
            if adapters is not None:  # the batch once per adapter, each copy through its own adapter
                from fedsafe.fl.batched import adapter_rows

                enc = {k: v.repeat(copies, 1) for k, v in enc.items()}
                context = adapter_rows(model, adapters[0], adapters[1], len(batch))
            with context:
                out = model.generate(**enc, **kwargs)
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            for k in range(copies):
                for row, i in enumerate(batch):
                    outputs[k][i] = tokenizer.decode(new_tokens[k * len(batch) + row], skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = padding_side
        if was_training:
            model.train()
    return outputs


def _progress(items, description):
    """Yield ``items`` (batches of prompts) under a bar that counts prompts, not batches, with an ETA."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), transient=True) as prog:
        task = prog.add_task(description, total=sum(len(item) for item in items))
        for item in items:
            yield item
            prog.advance(task, len(item))
