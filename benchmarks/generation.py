"""Generation throughput: batched, left-padded generate() against a one-prompt-at-a-time loop.

    .venv/bin/python benchmarks/generation.py [--model embedded|tiny|PATH] [--prompts 16] [--max-new-tokens 32]
    .venv/bin/python benchmarks/generation.py --device cuda --batch-sizes 1,16,32 --repeats 2   # cold, then warm
    .venv/bin/python benchmarks/generation.py --device cuda --batch-sizes 64,128 --repeats 2 --static-cache on
    .venv/bin/python benchmarks/generation.py --paths --config configs/demo.yaml [--adapter RUN_DIR]
    .venv/bin/python benchmarks/generation.py --padding --config configs/demo.yaml [--batch-size 64]

Prompts are the normal instructions of fedsafe's starter held-out set. Greedy decoding, LoRA attached
(random B, so the adapter changes what is generated). Prints a table of generated tokens per second and the
milliseconds per decoding step (batches x max new tokens). ``--repeats 2`` runs every batch size twice: on a GPU
the first pass at a new shape pays kernel selection, so the second is the warm figure. ``--static-cache on`` takes
the GPU path of fedsafe.generation (a static KV cache, which transformers compiles into CUDA graphs on CUDA; the
first pass then includes the compilation); issue 32's goal is <= 5 ms per decoding step at batch >= 64.

``--paths``: the evaluation of a config (its harmful, over-refusal and borderline prompt sets, counts, token
budgets and batch size; ``--adapter`` a run directory or adapter to evaluate, else a random LoRA on the config's
base model) through the four generation paths of fedsafe.generation back to back: plain left-padded batches through
the unmerged adapter (what evaluation did before), the shared-prefix cache, the merged adapter, and both (the
default), and the static-cache path (the GPU path; on the CPU it only shows the completions agree). Each path's
seconds, its speed-up over plain and how many completions equal plain's.

``--padding`` (tokenizer only, no generation): for each of the config's evaluation prompt sets, the prompt tokens
after the shared prefix that batches pad to, divided by the tokens the prompts hold, with fixed blocks of
``--batch-size`` rows sorted by characters (fedsafe before 2026-12-07) and with
:func:`fedsafe.generation.length_batches` (rows and padded tokens capped). Padded tokens are prefill work.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,4,16", help="comma-separated; 1 is the one-at-a-time loop")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--repeats", type=int, default=1, help="passes per batch size (2: cold, then warm)")
    ap.add_argument("--static-cache", default="off", choices=("off", "on", "auto"),
                    help="generate with a static KV cache (compiled into CUDA graphs on CUDA)")
    ap.add_argument("--paths", action="store_true", help="compare the generation paths on a config's evaluation")
    ap.add_argument("--config", default="configs/demo.yaml", help="with --paths: a run or grid file")
    ap.add_argument("--adapter", default=None, help="with --paths: a run directory or adapter directory")
    ap.add_argument("--padding", action="store_true", help="padded / real prompt tokens of the config's evaluation "
                    "sets, fixed blocks against length_batches (tokenizer only)")
    ap.add_argument("--batch-size", type=int, default=None, help="with --padding: default the config's eval.batch_size")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.paths:
        compare_paths(args)
        return
    if args.padding:
        padding_table(args)
        return

    from rich.console import Console
    from rich.table import Table

    from fedsafe.config import DataSource
    from fedsafe.data import load_pool
    from fedsafe.generation import generate
    from fedsafe.models import attach_lora, load_base_model

    loaded = load_base_model(args.model, args.device)
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    model = attach_lora(loaded.model, r=16, alpha=32)
    tok = loaded.tokenizer
    rows = [r for r in load_pool([DataSource(path="starter:heldout")], seed=0) if r.get("category") == "normal"]
    prompts = [r["instruction"] for r in rows][: args.prompts]
    while len(prompts) < args.prompts:
        prompts += prompts[: args.prompts - len(prompts)]
    generate(model, tok, prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up

    table = Table(title=f"generation: {args.model} on {loaded.device}, {len(prompts)} prompts, "
                        f"{args.max_new_tokens} new tokens, greedy, static cache {args.static_cache}, "
                        f"{torch.get_num_threads()} threads")
    for col in ("mode", "batch", "pass", "generated tokens", "seconds", "tokens/s", "ms / step", "speed-up"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    base_tps = None
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        for rep in range(1, args.repeats + 1):
            sync()
            t0 = time.perf_counter()
            outs = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=bs,
                            static_cache=args.static_cache)
            sync()
            secs = time.perf_counter() - t0
            n_tokens = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs)
            tps = n_tokens / secs
            base_tps = base_tps or tps
            steps = -(-len(prompts) // bs) * args.max_new_tokens  # an upper bound: a batch may stop at EOS
            speedup = f"{tps / base_tps:.2f}x" if base_tps else "–"
            table.add_row("one at a time" if bs == 1 else "batched, left-padded", str(bs), str(rep), str(n_tokens),
                          f"{secs:.1f}", f"{tps:.1f}", f"{secs / steps * 1e3:.1f}", speedup)
    Console(width=140).print(table)


PATHS = {"plain (before)": dict(share_prefix=False, merge_adapter=False),
         "shared prefix": dict(merge_adapter=False),
         "merged adapter": dict(share_prefix=False),
         "both (default)": {},
         "static cache (GPU path)": dict(static_cache="on")}


def _eval_sets(config_path: str):
    """The config's evaluation prompt sets as (label, prompts, max_new_tokens), and its eval and model sections."""
    from fedsafe.evaluation.runner import benign_sets, select_prompts

    from fedsafe.cli import refuse_grid_file
    from fedsafe.config import load_config
    from fedsafe.errors import FedsafeError
    from fedsafe.grid import load_grid

    try:
        refuse_grid_file(Path(config_path))  # raises for a grid file (the rule `fedsafe run` applies)
        cfg = load_config(config_path)
    except FedsafeError:
        cfg = load_grid(config_path)[1][0][1]
    ev = cfg.eval
    sets = []
    if ev.prompts:
        sets.append(("harmful", select_prompts(ev.prompts, ev.n_prompts)[1], ev.max_new_tokens))
    for metric, (_field, _ids, prompts) in benign_sets(ev, cfg.seed).items():
        sets.append((metric, prompts, ev.refusal_max_new_tokens or ev.max_new_tokens))
    return sets, ev, cfg


def padding_table(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from fedsafe.generation import length_batches, shared_prefix_length, to_chat_text
    from fedsafe.models import load_tokenizer

    sets, ev, cfg = _eval_sets(args.config)
    tok = load_tokenizer(cfg.model.name)
    bs = args.batch_size or ev.batch_size
    table = Table(title=f"prompt tokens after the shared prefix, padded / real, batch size {bs} ({args.config})")
    for col in ("prompt set", "prompts", "real tokens", "fixed blocks", "length_batches", "batches (fixed / length)"):
        table.add_column(col, justify="left" if col == "prompt set" else "right")
    for label, prompts, _ in sets:
        texts = [to_chat_text(tok, p) for p in prompts]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        n_shared = shared_prefix_length(ids)
        lengths = [len(r) - n_shared for r in ids]
        by_chars = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        fixed = [by_chars[i: i + bs] for i in range(0, len(by_chars), bs)]
        capped = length_batches(lengths, bs)
        real = sum(lengths)

        def padded(batches):
            return sum(len(b) * max(lengths[i] for i in b) for b in batches)

        table.add_row(label, str(len(prompts)), str(real), f"{padded(fixed) / real:.2f}x",
                      f"{padded(capped) / real:.2f}x", f"{len(fixed)} / {len(capped)}")
    Console(width=140).print(table)


def compare_paths(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from fedsafe.generation import generate
    from fedsafe.models import attach_lora
    from fedsafe.run_model import load_adapter, load_model

    sets, ev, cfg = _eval_sets(args.config)
    if args.adapter:
        model, tok = load_adapter(args.adapter), load_model(cfg.model, seed=cfg.seed).tokenizer
        what = args.adapter
    else:
        loaded = load_model(cfg.model, seed=cfg.seed)
        model, tok = attach_lora(loaded.model, r=16, alpha=32), loaded.tokenizer
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        what = "a random LoRA (r 16) on " + cfg.model.name
    generate(model, tok, ["warm up", "hello"], max_new_tokens=2, batch_size=2)
    n = sum(len(p) for _, p, _ in sets)
    table = Table(title=f"evaluation of {args.config} ({n} prompts: "
                        + ", ".join(f"{label} {len(p)} x {t} tokens" for label, p, t in sets)
                        + f"; batch {ev.batch_size}; {torch.get_num_threads()} threads), {what}")
    for col in ("path", "seconds", "speed-up", "completions equal to plain"):
        table.add_column(col, justify="left" if col == "path" else "right")
    plain, plain_secs = None, None
    for name, kw in PATHS.items():
        t0 = time.perf_counter()
        outs = [generate(model, tok, prompts, max_new_tokens=t, batch_size=ev.batch_size, **kw)
                for _, prompts, t in sets]
        secs = time.perf_counter() - t0
        flat = [o for out in outs for o in out]
        plain, plain_secs = plain or flat, plain_secs or secs
        table.add_row(name, f"{secs:.1f}", f"{plain_secs / secs:.2f}x", f"{sum(a == b for a, b in zip(flat, plain))} / {n}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
