"""Batched, seeded generation from a (PEFT) causal LM that does no work twice.

Two savings on top of plain batched ``generate`` (both on by default, both exact in what they compute):

- **Shared prefix.** Chat prompts all open with the same tokens (the template's system turn and the user header:
  24 of the 40 tokens of an average XSTest safe prompt with SmolLM2's template). Their keys and values are
  computed once per call and every batch continues from a copy of that cache, so the prefill runs only over what
  differs. Each row is laid
  out as [prefix, left padding, rest of the prompt]; the padding is masked and positions count real tokens only,
  so a row sees exactly what it sees alone. (The idea of prefix caching in vLLM/SGLang's radix attention,
  here within one call.)
- **Merged adapter.** A single plain LoRA adapter is merged into the base weights for the call (W + s·B·A, one
  matmul per layer instead of three) and the base weights are restored from a copy afterwards, bit for bit
  (PEFT's ``unmerge`` subtracts and would leave rounding in the base).

Either can change a greedy token where two logits tie to float rounding (the sums are taken in another order);
the evaluation cache keys say which path produced a file.

**The GPU path** (``static_cache``; ``"auto"`` turns it on where the model sits on CUDA): a 135M model at batch
64 only launches kernels (26-30 ms a decoding step on an H200 with the dynamic cache, docs/gpu.md), so the
decoding forward should run as one CUDA graph. With a static KV cache transformers compiles that forward
(``torch.compile``, CUDA graphs) itself; what fedsafe adds is shapes that repeat, since every new shape is a new
compilation: each batch is padded to a power of two of rows, at most ``batch_size`` (copies of its first row,
whose completions are dropped), and its prompt width rounded up to a multiple of ``STATIC_WIDTH_STEP`` tokens, so a whole evaluation
compiles a few shapes. The shared prefix is not used there (its prefill is cheap on a GPU; the static cache is
allocated by ``generate``). ``batch_size="auto"`` sizes batches from the free GPU memory
(:func:`auto_batch_size`). Greedy completions are those of the dynamic path; sampled ones differ, since the
padding rows draw from the generator too. Not yet timed on a GPU (none was lent); on the CPU the static path gives the plain
completions (``tests/test_generation.py``) and is off by default.

Batches hold prompts of similar length (sorted) and at most ``batch_size`` rows **and** ``batch_size x
BATCH_WIDTH`` prompt tokens after padding (:func:`length_batches`): a few long prompts (MT-Bench's extraction
tasks carry whole passages) then share small batches instead of padding 64 rows to their length.
``benchmarks/generation.py --padding --config configs/demo.yaml`` prints padded / real prompt tokens per
evaluation set (2026-12-07: the 280 everyday requests 2.06x with fixed 64-row blocks, 1.44x with these;
XSTest's 250 safe prompts 1.28x -> 1.10x; the same command on the demo config of 4999d6d, 120 FedIT rows + MT-Bench's
80, 3.60x -> 1.42x). The completions are the same (greedy, padding masked).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import torch

Prompt = str | list[dict]

# what the cache keys of stored generations record about the path (fedsafe.evaluation.runner.cached_generate)
GENERATION_PATH = "prefix-cache+merged-lora+length-batches"
STATIC_GENERATION_PATH = "static-cache+merged-lora+length-batches"  # the GPU path (static_cache on)
MIN_SHARED_PREFIX = 4  # tokens; a shorter common opening is not worth a cache copy per batch
BATCH_WIDTH = 64  # prompt tokens per row that a full batch may pad to; longer prompts go in fewer rows
STATIC_WIDTH_STEP = 32  # static-cache path: prompt widths rounded up to a multiple of this (few compiled shapes)
AUTO_BATCH_CAP = 512  # batch_size="auto" never exceeds this many rows
CPU_AUTO_BATCH = 64  # batch_size="auto" off CUDA: the CPU is compute-bound well before this
STATIC_CACHE_SETTINGS = ("auto", "on", "off")


def use_static_cache(setting: str | bool, device: torch.device | str) -> bool:
    """Whether to generate with a static KV cache: ``"on"``/True, ``"off"``/False, ``"auto"`` = on CUDA only."""
    if isinstance(setting, bool):
        return setting
    if setting not in STATIC_CACHE_SETTINGS:
        raise ValueError(f"static_cache must be one of {STATIC_CACHE_SETTINGS}, got {setting!r}")
    return setting == "on" or (setting == "auto" and torch.device(device).type == "cuda")


def auto_batch_size(model, prompt_tokens: int, max_new_tokens: int, *, free_bytes: int | None = None,
                    fraction: float = 0.5, cap: int = AUTO_BATCH_CAP) -> int:
    """Rows per generation batch that fit ``fraction`` of the free accelerator memory (``free_bytes``; read from
    ``torch.cuda.mem_get_info`` when None on CUDA; off CUDA :data:`CPU_AUTO_BATCH`).

    A row holds its keys and values (2 x layers x KV heads x head size x (prompt + new tokens)), its prefill
    activations (prompt tokens x (4 x hidden + 2 x MLP width)) and two rows of logits (vocabulary, float32), all
    in the model's dtype except the logits; the count is a power of two (fewer compiled shapes), 1 to ``cap``."""
    cfg = getattr(model, "config", None)
    device = next(model.parameters()).device
    if free_bytes is None:
        if device.type != "cuda":
            return min(CPU_AUTO_BATCH, cap)
        free_bytes, _ = torch.cuda.mem_get_info(device)
    layers = int(getattr(cfg, "num_hidden_layers", 1))
    hidden = int(getattr(cfg, "hidden_size", 1))
    heads = int(getattr(cfg, "num_attention_heads", 1))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // max(heads, 1))
    mlp = int(getattr(cfg, "intermediate_size", None) or 4 * hidden)
    vocab = int(getattr(cfg, "vocab_size", 1))
    dtype_bytes = next(model.parameters()).element_size()
    per_row = (2 * layers * kv_heads * head_dim * (prompt_tokens + max_new_tokens) * dtype_bytes
               + prompt_tokens * (4 * hidden + 2 * mlp) * dtype_bytes + 2 * vocab * 4)
    rows = int(fraction * free_bytes // max(per_row, 1))
    if rows < 1:
        return 1
    return min(cap, 1 << (rows.bit_length() - 1))


def length_batches(lengths: Sequence[int], batch_size: int, width: int = BATCH_WIDTH) -> list[list[int]]:
    """Indices of ``lengths`` in batches: sorted by length (stable), each batch at most ``batch_size`` rows and,
    unless it is one row, at most ``batch_size * width`` tokens once padded to its longest."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    budget = batch_size * width
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * lengths[i] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def to_chat_text(tokenizer, prompt: Prompt, system: str | None = None) -> str:
    """Render a user prompt (or a message list) with the tokenizer's chat template, ready to generate."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int = 64,
             batch_size: int | str = 16, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, chat: bool = True, system: str | None = None,
             progress: bool = False, description: str = "generating", share_prefix: bool = True,
             merge_adapter: bool = True, static_cache: str | bool = "off") -> list[str]:
    """Generate one completion per prompt; greedy by default, batched and left-padded.

    Prompts are sorted by length so that batches pad little, and results come back in input order.
    With ``chat=False`` prompts are raw text continued as is (used by extraction attacks). ``share_prefix``
    computes the prompts' common opening once; ``merge_adapter`` merges a single plain LoRA adapter for the call
    (see the module docstring; both False gives plain left-padded batches through the unmerged adapter).
    ``static_cache`` (``"auto"``, ``"on"``, ``"off"`` or a bool) takes the GPU path of the module docstring;
    ``batch_size="auto"`` sizes batches from free GPU memory (:func:`auto_batch_size`).
    """
    return _generate(model, tokenizer, prompts, None, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed, chat=chat, system=system,
                     progress=progress, description=description, share_prefix=share_prefix,
                     merge_adapter=merge_adapter, static_cache=static_cache)[0]


@torch.no_grad()
def generate_adapters(model, tokenizer, flat, vecs: Sequence[torch.Tensor], prompts: Sequence[Prompt], *,
                      max_new_tokens: int = 64, batch_size: int = 16, chat: bool = True, system: str | None = None,
                      progress: bool = False, description: str = "generating",
                      share_prefix: bool = True) -> list[list[str]]:
    """Greedy completions of ``prompts`` under each of K adapters (flat LoRA vectors ``vecs``), ``[K][prompts]``.

    One ``generate`` call per prompt batch serves all K adapters: the batch is repeated K times and each copy's
    rows go through its own adapter (fedsafe.fl.batched.adapter_rows), the base model through all rows at once.
    The prompt batches and their padding are those of :func:`generate`, so the completions equal loading each
    adapter in turn and calling :func:`generate` (sampling would draw in another order, so this is greedy only).
    """
    return _generate(model, tokenizer, prompts, (flat, list(vecs)), max_new_tokens=max_new_tokens,
                     batch_size=batch_size, do_sample=False, temperature=1.0, top_p=1.0, seed=0, chat=chat,
                     system=system, progress=progress, description=description, share_prefix=share_prefix,
                     merge_adapter=False)


def shared_prefix_length(ids: Sequence[Sequence[int]]) -> int:
    """Tokens every sequence of ``ids`` opens with, leaving at least one token of each to prefill (0: none)."""
    if not ids:
        return 0
    n = min(len(x) for x in ids) - 1
    first = ids[0]
    for k in range(max(n, 0)):
        t = first[k]
        if any(x[k] != t for x in ids):
            return k
    return max(n, 0)


def _plain_lora_layers(model) -> list | None:
    """The LoRA layers to merge for a call, or None when merging would not be exact or possible: no PEFT model,
    more than one active adapter, DoRA, LoRA bias, a quantized base, or layers already merged."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    if not isinstance(model, PeftModel):
        return None
    active = model.active_adapters if hasattr(model, "active_adapters") else [model.active_adapter]
    if len(active) != 1 or active[0] not in model.peft_config:
        return None
    cfg = model.peft_config[active[0]]
    if str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "LORA" or getattr(cfg, "use_dora", False):
        return None
    if getattr(cfg, "bias", "none") != "none":
        return None
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and active[0] in m.lora_A]
    for m in layers:
        weight = getattr(m.get_base_layer(), "weight", None)
        if m.merged or weight is None or not weight.dtype.is_floating_point or weight.__class__ is not torch.nn.Parameter:
            return None
    return layers


@contextmanager
def merged_lora(model, enabled: bool = True):
    """Merge the model's single plain LoRA adapter into its base weights for the block; restore them exactly.

    The base weights are copied before merging and copied back afterwards (PEFT's ``unmerge`` subtracts the delta
    again, which leaves rounding in the base weights that later training would start from). A model that does not
    qualify (:func:`_plain_lora_layers`) runs unmerged."""
    layers = _plain_lora_layers(model) if enabled else None
    if not layers:
        yield False
        return
    active = (model.active_adapters if hasattr(model, "active_adapters") else [model.active_adapter])[0]
    saved = []
    try:
        for m in layers:
            weight = m.get_base_layer().weight
            saved.append((m, weight, weight.data.clone()))
            m.merge(adapter_names=[active])
        yield True
    finally:
        for m, weight, data in saved:
            weight.data.copy_(data)
            m.merged_adapters.clear()


def _prefix_cache(model, prefix: torch.Tensor, copies: int, adapters):
    """Keys and values of ``prefix`` (one row; ``copies`` rows under K adapters, one per adapter)."""
    ids = prefix.unsqueeze(0).repeat(copies, 1)
    context = nullcontext()
    if adapters is not None:
        from fedsafe.fl.batched import adapter_rows

        context = adapter_rows(model, adapters[0], adapters[1], 1)
    with context:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _generate(model, tokenizer, prompts, adapters, *, max_new_tokens, batch_size, do_sample, temperature, top_p,
              seed, chat, system, progress, description, share_prefix=True,
              merge_adapter=True, static_cache: str | bool = "off") -> list[list[str]]:
    """:func:`generate` for one adapter (the model's own, ``adapters=None``) or K (``(flat, vecs)``)."""
    texts = [to_chat_text(tokenizer, p, system) if chat else p for p in prompts]
    copies = 1 if adapters is None else len(adapters[1])
    outputs: list[list[str]] = [[""] * len(texts) for _ in range(copies)]
    if not texts:
        return outputs
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
    static = adapters is None and use_static_cache(static_cache, device)
    if batch_size == "auto":
        batch_size = auto_batch_size(model, max(len(r) for r in ids), max_new_tokens)
    n_shared = shared_prefix_length(ids) if share_prefix and not static else 0
    if n_shared < MIN_SHARED_PREFIX:
        n_shared = 0
    kwargs: dict = {"cache_implementation": "static"} if static else {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs.update(max_new_tokens=max_new_tokens, do_sample=do_sample,
                  pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
    try:
        with merged_lora(model, merge_adapter and adapters is None):
            prefix = torch.tensor(ids[0][:n_shared], dtype=torch.long, device=device)
            cache = _prefix_cache(model, prefix, copies, adapters) if n_shared else None
            batches = length_batches([len(r) - n_shared for r in ids], batch_size, BATCH_WIDTH)
            iterator = _progress(batches, description) if progress else batches
            for b_idx, batch in enumerate(iterator):
                rest = [ids[i][n_shared:] for i in batch]
                width = max(len(r) for r in rest)
                n_rows = len(batch)
                if static:  # repeating shapes: rows up to a power of two (copies of the first, dropped), width
                    width = -(-width // STATIC_WIDTH_STEP) * STATIC_WIDTH_STEP  # rounded up
                    rest = rest + [rest[0]] * (min(batch_size, 1 << (n_rows - 1).bit_length()) - n_rows)
                input_ids = torch.full((len(rest), n_shared + width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(input_ids)
                input_ids[:, :n_shared] = prefix.cpu()
                mask[:, :n_shared] = 1
                for row, r in enumerate(rest):  # [prefix, left padding, rest]
                    input_ids[row, n_shared + width - len(r):] = torch.tensor(r, dtype=torch.long)
                    mask[row, n_shared + width - len(r):] = 1
                enc = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
                if do_sample:
                    kwargs.update(temperature=temperature, top_p=top_p)
                    torch.manual_seed(seed * 1_000_003 + b_idx)  # per-batch seed: reproducible sampling
                context = nullcontext()
                if adapters is not None:  # the batch once per adapter, each copy through its own adapter
                    from fedsafe.fl.batched import adapter_rows

                    enc = {k: v.repeat(copies, 1) for k, v in enc.items()}
                    context = adapter_rows(model, adapters[0], adapters[1], len(batch))
                extra = {}
                if cache is not None:  # each row continues from its own copy of the prefix's keys and values
                    batch_cache = copy.deepcopy(cache)
                    batch_cache.batch_repeat_interleave(len(batch))
                    extra["cache"] = batch_cache
                with context:
                    out = model.generate(**enc, **kwargs, **extra)
                new_tokens = out[:n_rows * copies, enc["input_ids"].shape[1]:]
                for k in range(copies):
                    for row, i in enumerate(batch):
                        outputs[k][i] = tokenizer.decode(new_tokens[k * len(batch) + row],
                                                         skip_special_tokens=True).strip()
    finally:
        if was_training:
            model.train()
    return outputs


def _progress(items, description):
    """Yield ``items`` (batches of prompts) under a bar that counts prompts, not batches, with an ETA."""
    from fedsafe.progress import track

    return track(items, description, size=len, unit="prompts", eta=True)
