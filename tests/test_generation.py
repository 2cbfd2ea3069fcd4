"""Generation that does no work twice (fedsafe.generation): the prompts' shared opening is prefilled once per
call and a single plain LoRA adapter is merged for the call; both must give what plain left-padded batches
through the unmerged adapter give, and leave the model exactly as it was."""

from __future__ import annotations

import pytest
import torch

from fedsafe.generation import MIN_SHARED_PREFIX, generate, merged_lora, shared_prefix_length, to_chat_text
from fedsafe.models import attach_lora

PROMPTS = ["Tell me a story", "Hi", "What is the capital of a country far away?", "List three colours", "Why",
           "Name a fruit that is yellow and one that is red"]
PLAIN = dict(share_prefix=False, merge_adapter=False)


def _lora_model(tiny, seed, use_dora=False):
    model, tok = tiny
    if use_dora:
        from peft import LoraConfig, get_peft_model

        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    else:
        pm = attach_lora(model, r=4, alpha=8, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return pm, tok


def test_shared_prefix_length_counts_the_common_opening_and_leaves_a_token_to_prefill():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7, 8, 9], [7, 8, 9, 10]]) == 2  # one sequence is all prefix: keep its last token
    assert shared_prefix_length([[7, 8, 9]]) == 2
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0
    assert shared_prefix_length([]) == 0


@pytest.mark.parametrize("batch_size", [2, 4])
def test_prefix_cache_and_merged_adapter_give_the_plain_completions(tiny, test_seed, batch_size):
    pm, tok = _lora_model(tiny, test_seed)
    kw = dict(max_new_tokens=8, batch_size=batch_size)
    plain = generate(pm, tok, PROMPTS, **kw, **PLAIN)
    assert generate(pm, tok, PROMPTS, **kw) == plain
    assert generate(pm, tok, PROMPTS, **kw, merge_adapter=False) == plain
    assert generate(pm, tok, PROMPTS, **kw, share_prefix=False) == plain
    # the adapter matters, so a path that dropped it would not pass
    with pm.disable_adapter():
        assert generate(pm, tok, PROMPTS, **kw, **PLAIN) != plain


def test_prefill_runs_the_shared_opening_once_and_only_the_rest_per_batch(tiny, test_seed):
    pm, tok = _lora_model(tiny, test_seed)
    texts = [to_chat_text(tok, p) for p in PROMPTS]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    n_shared = shared_prefix_length(ids)
    assert n_shared >= MIN_SHARED_PREFIX
    seen = []
    embed = pm.get_input_embeddings()
    handle = embed.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    try:
        generate(pm, tok, PROMPTS, max_new_tokens=1, batch_size=3)
    finally:
        handle.remove()
    longest_rest = [max(len(ids[i]) for i in b) - n_shared
                    for b in (sorted(range(len(texts)), key=lambda i: len(texts[i]))[k:k + 3] for k in (0, 3))]
    assert seen == [(1, n_shared), (3, longest_rest[0]), (3, longest_rest[1])]


def test_merging_restores_the_base_weights_bit_for_bit_and_keeps_the_adapter_unmerged(tiny, test_seed):
    pm, tok = _lora_model(tiny, test_seed)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    with merged_lora(pm) as merged:
        assert merged
        changed = [n for n, p in pm.named_parameters() if "base_layer" in n and not torch.equal(before[n], p)]
        assert changed  # the adapter really was merged into the base weights
    generate(pm, tok, PROMPTS, max_new_tokens=4, batch_size=4)
    assert all(torch.equal(before[n], p) for n, p in pm.named_parameters())
    from peft.tuners.lora import LoraLayer

    assert not any(m.merged for m in pm.modules() if isinstance(m, LoraLayer))


def test_merged_lora_leaves_dora_and_plain_models_unmerged(tiny, test_seed):
    pm, tok = _lora_model(tiny, test_seed, use_dora=True)
    with merged_lora(pm) as merged:
        assert not merged
    kw = dict(max_new_tokens=6, batch_size=4)
    assert generate(pm, tok, PROMPTS, **kw) == generate(pm, tok, PROMPTS, **kw, **PLAIN)
    with merged_lora(tiny[0]) as merged:  # no adapter at all
        assert not merged


def test_sampling_with_a_shared_prefix_is_reproducible(tiny, test_seed):
    pm, tok = _lora_model(tiny, test_seed)
    kw = dict(max_new_tokens=6, batch_size=4, do_sample=True, temperature=1.0, seed=3)
    sampled = generate(pm, tok, PROMPTS, **kw)
    assert sampled == generate(pm, tok, PROMPTS, **kw) == generate(pm, tok, PROMPTS, **kw, **PLAIN)


def test_length_batches_cap_rows_and_padded_tokens():
    from fedsafe.generation import length_batches

    lengths = [5, 700, 6, 40, 300, 7, 310, 8]
    batches = length_batches(lengths, batch_size=4, width=64)  # budget 256 padded tokens per batch
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 4
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 256
        assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)
    assert batches[0] == [0, 2, 5, 7]  # the short prompts fill a batch: the row cap binds
    assert [len(b) for b in batches[1:]] == [1, 1, 1, 1]  # each long prompt alone instead of padding others
    # a fixed row count would have padded [40, 300, 310, 700] to 4 x 700 tokens
    assert length_batches(lengths, batch_size=4, width=1000) == [[0, 2, 5, 7], [3, 4, 6, 1]]
    with pytest.raises(ValueError):
        length_batches(lengths, batch_size=0)


def test_long_prompts_in_their_own_batches_give_the_completions_of_one_batch(tiny, test_seed, monkeypatch):
    """Batches split by the token budget generate exactly what one padded batch does (padding is masked)."""
    import fedsafe.generation as generation

    pm, tok = _lora_model(tiny, test_seed)
    prompts = PROMPTS + [" ".join(["word"] * 60)]
    one = generate(pm, tok, prompts, max_new_tokens=6, batch_size=len(prompts), **PLAIN)
    seen = []
    real = generation.length_batches
    monkeypatch.setattr(generation, "length_batches", lambda *a: seen.append(real(*a)) or seen[-1])
    monkeypatch.setattr(generation, "BATCH_WIDTH", 4)  # a budget the long prompt alone exceeds
    for kw in (PLAIN, {}):
        assert generate(pm, tok, prompts, max_new_tokens=6, batch_size=len(prompts), **kw) == one
    assert all(len(b) > 1 for b in seen)  # it did split: the completions match across batch layouts


SEVEN = PROMPTS + ["Count to five"]


@pytest.mark.parametrize("batch_size", [3, 4])
def test_static_cache_path_gives_the_plain_completions_in_repeating_shapes(tiny, test_seed, batch_size, monkeypatch):
    """The GPU path (a static KV cache, rows padded to a power of two, widths to STATIC_WIDTH_STEP) must give what
    plain batches give; it runs on the CPU too when asked ('on'), and 'auto' keeps it off the CPU."""
    from fedsafe.generation import STATIC_WIDTH_STEP, use_static_cache

    pm, tok = _lora_model(tiny, test_seed)
    kw = dict(max_new_tokens=8, batch_size=batch_size)
    plain = generate(pm, tok, SEVEN, **kw, **PLAIN)
    calls = []
    real = type(pm).generate

    def spy(self, *args, **kwargs):
        calls.append((kwargs.get("cache_implementation"), tuple(kwargs["input_ids"].shape)))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(pm), "generate", spy)
    assert generate(pm, tok, SEVEN, **kw, static_cache="on") == plain
    assert calls and all(impl == "static" for impl, _ in calls)
    rows = [shape[0] for _, shape in calls]
    # full batches, or a power of two below: few compiled shapes
    assert all(r == batch_size or (r & (r - 1) == 0 and r < batch_size) for r in rows), rows
    assert all(shape[1] % STATIC_WIDTH_STEP == 0 for _, shape in calls)
    if batch_size == 4:  # 7 prompts: 4 + 3, the 3 padded to 4 with a dropped copy
        assert rows == [4, 4]
    calls.clear()
    assert generate(pm, tok, SEVEN, **kw, static_cache="auto") == plain  # CPU: the dynamic path
    assert calls and all(impl is None for impl, _ in calls)
    assert use_static_cache("auto", "cuda") and not use_static_cache("auto", "cpu") and use_static_cache(True, "cpu")
    with pytest.raises(ValueError, match="static_cache"):
        use_static_cache("sometimes", "cpu")


def test_auto_batch_size_fits_the_free_memory_in_powers_of_two(tiny):
    from fedsafe.config import EvalConfig
    from fedsafe.generation import AUTO_BATCH_CAP, CPU_AUTO_BATCH, auto_batch_size

    model, _ = tiny
    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    sizes = [auto_batch_size(model, 40, 24, free_bytes=f) for f in (10 ** 5, 10 ** 6, 10 ** 7, 10 ** 9, 10 ** 12)]
    assert sizes == sorted(sizes) and sizes[0] >= 1 and sizes[-1] == AUTO_BATCH_CAP
    assert all(s & (s - 1) == 0 for s in sizes)
    # what fits is bounded by the keys and values alone: rows x per-row KV bytes <= the budget
    s = auto_batch_size(model, 40, 24, free_bytes=10 ** 7)
    assert s * per_token * 64 <= 0.5 * 10 ** 7 < 4 * s * per_token * 64 * 8
    assert auto_batch_size(model, 40, 24) == CPU_AUTO_BATCH  # off CUDA: no memory to size from
    assert EvalConfig(batch_size="auto").batch_size == "auto"
    with pytest.raises(Exception, match="batch_size"):
        EvalConfig(batch_size=0)
