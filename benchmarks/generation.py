"""Generation throughput: batched, left-padded generate() against a one-prompt-at-a-time loop.

    .venv/bin/python benchmarks/generation.py [--model embedded|tiny|PATH] [--prompts 16] [--max-new-tokens 32]
    .venv/bin/python benchmarks/generation.py --device cuda --batch-sizes 1,16,32 --repeats 2   # cold, then warm

Prompts are the normal instructions of fedsafe's starter held-out set. Greedy decoding, LoRA attached
(as in evaluation: the adapter is never merged). Prints a table of generated tokens per second and the
milliseconds per decoding step (batches x max new tokens). ``--repeats 2`` runs every batch size twice: on a GPU
the first pass at a new shape pays kernel selection, so the second is the warm figure.
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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

    table = Table(title=f"generation: {args.model}, {len(prompts)} prompts, {args.max_new_tokens} new tokens, "
                        f"greedy, {torch.get_num_threads()} threads")
    for col in ("mode", "batch", "pass", "generated tokens", "seconds", "tokens/s", "ms / step", "speed-up"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    base_tps = None
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        for rep in range(1, args.repeats + 1):
            sync()
            t0 = time.perf_counter()
            outs = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=bs)
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


if __name__ == "__main__":
    main()
