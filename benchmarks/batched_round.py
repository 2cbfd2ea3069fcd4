"""One federated round's local training, one client at a time vs the clients as adapters of one batched pass.

The same round (same global adapter, seeds, batches) is trained back to back both ways in one process
(fedsafe.fl.client.LocalTrainer.fit per client, then fedsafe.fl.batched.BatchedTrainer.fit_many), and the
table gives each path's wall time, the batched/sequential ratio and the largest relative difference between
the two paths' client updates (the exactness check). Issue 32's CPU goal: a round of 5 clients x 4 steps on
the embedded model batched in <= 0.75x the sequential time.

The second table sets both against the hardware limit: each path's floating-point work for the round, counted
by ``torch.utils.flop_counter.FlopCounterMode`` on one more run (matmuls and attention, forward and backward),
divided by its wall time, beside the best fp32 GEMM rate this process reaches (``torch.mm`` of square matrices,
same threads). ``floor s`` is the sequential path's work at that peak rate: no path that does the same work can
train the round faster, so ``floor / sequential`` is the smallest ratio any batching could reach.

    python benchmarks/batched_round.py                       # embedded model, 5 clients x 4 steps, batch 4
    python benchmarks/batched_round.py --model tiny --repeats 3
    python benchmarks/batched_round.py --device cuda --clients 11 --steps 6 --repeats 2   # MFU on a GPU

On CUDA the model is bf16, the GEMM peak is measured in bf16 (8192 x 8192) and, where the card is known
(``DATASHEET_BF16``), the table adds model FLOPs utilisation (MFU) against its datasheet dense bf16 peak: issue
32's training goal is MFU >= 25%. Not yet run on a GPU.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from fedsafe.data.format import tokenize_rows
from fedsafe.data.sources import load_rows
from fedsafe.fl.batched import BatchedTrainer, why_sequential
from fedsafe.data.client_data import ClientData
from fedsafe.fl.client import LocalTrainer, RoundConfig
from fedsafe.models import attach_lora, load_base_model
from fedsafe.schema import DataSource

console = Console()


# dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts), FLOP/s
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def datasheet_peak(device_name: str) -> float | None:
    """The datasheet dense bf16 peak of a known card (by name), else None."""
    return next((v for k, v in DATASHEET_BF16.items() if k in device_name), None)


def build(model_name: str, clients: int, per_client: int, max_length: int, seed: int, device: str = "cpu"):
    """The LoRA model, its trainer and ``clients`` clients with disjoint starter rows."""
    loaded = load_base_model(model_name, device=device, seed=seed)
    model = attach_lora(loaded.model, seed=seed)
    trainer = LocalTrainer(model, loaded.tokenizer)
    rows = load_rows(DataSource(path="starter:train"), seed=seed)
    examples = tokenize_rows(loaded.tokenizer, rows, max_length)
    if len(examples) < clients * per_client:
        raise SystemExit(f"starter:train gives {len(examples)} examples, need {clients * per_client}")
    data = [ClientData(f"client_{i:02d}", "benign", examples[i * per_client:(i + 1) * per_client])
            for i in range(clients)]
    return trainer, data


def gemm_peak(size: int = 2048, repeats: int = 5, device: str = "cpu", dtype=torch.float32) -> float:
    """The best ``torch.mm`` rate (FLOP/s) of two ``size x size`` matrices, best of ``repeats``."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device, dtype)
    b = torch.randn(size, size, generator=g).to(device, dtype)
    torch.mm(a, b)  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def counted_flops(fn) -> int:
    """Floating-point operations ``fn()`` runs, as ``FlopCounterMode`` counts them (matmuls, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--per-client", type=int, default=8, help="examples per client")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1, help="sequential/batched pairs, measured alternately")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")

    trainer, clients = build(args.model, args.clients, args.per_client, args.max_length, args.seed, args.device)
    start = trainer.flat.get()
    # a global adapter with B != 0 (as from round 2 on), so that both factors train
    start = start + 1e-3 * torch.randn(start.shape, generator=torch.Generator().manual_seed(args.seed))
    rc = RoundConfig(round=1, lr=5e-4, local_steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    reason = why_sequential(trainer, rc, len(clients))
    if reason is not None:
        raise SystemExit(f"this setup cannot run batched: {reason}")
    tokens = sum(len(e.input_ids) for c in clients for e in c.examples)
    trainer.fit(clients[0], start, RoundConfig(round=0, lr=5e-4, local_steps=1, batch_size=args.batch_size))  # warm-up

    times: dict[str, list[float]] = {"sequential": [], "batched": []}
    worst = 0.0
    for _ in range(args.repeats):
        _sync(args.device)
        t0 = time.perf_counter()
        seq = [trainer.fit(c, start, rc, {}) for c in clients]
        _sync(args.device)
        times["sequential"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bat = BatchedTrainer(trainer).fit_many(clients, start, rc)
        _sync(args.device)
        times["batched"].append(time.perf_counter() - t0)
        for s, b in zip(seq, bat):
            worst = max(worst, float((s.update - b.update).norm() / s.update.norm()))

    table = Table(title=f"one round: {args.clients} clients x {args.steps} steps x batch {args.batch_size}, "
                        f"{args.model}, {torch.get_num_threads()} torch threads "
                        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
                        f"{tokens} tokens in the clients' data")
    for col in ("path", "wall s (each repeat)", "mean s", "ratio to sequential"):
        table.add_column(col, justify="right")
    base = sum(times["sequential"]) / len(times["sequential"])
    for path, ts in times.items():
        mean = sum(ts) / len(ts)
        table.add_row(path, " ".join(f"{t:.2f}" for t in ts), f"{mean:.2f}", f"{mean / base:.3f}")
    console.print(table)
    console.print(f"largest relative difference between the two paths' client updates: {worst:.2e}")

    flops = {"sequential": counted_flops(lambda: [trainer.fit(c, start, rc, {}) for c in clients]),
             "batched": counted_flops(lambda: BatchedTrainer(trainer).fit_many(clients, start, rc))}
    cuda = args.device == "cuda"
    size, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    peak = gemm_peak(size, device=args.device, dtype=dtype)
    where = torch.cuda.get_device_name(0) if cuda else f"{torch.get_num_threads()} threads"
    sheet = datasheet_peak(where) if cuda else None
    limit = Table(title=f"against the hardware limit: best {'bf16' if cuda else 'fp32'} GEMM here "
                        f"{peak / 1e9:.1f} GFLOP/s (torch.mm {size} x {size}, {where})"
                        + (f"; datasheet bf16 peak {sheet / 1e12:.0f} TFLOP/s" if sheet else ""))
    cols = ["path", "GFLOP counted", "mean s", "GFLOP/s", "% of GEMM peak", "floor s", "floor / sequential"]
    for col in cols + (["MFU (datasheet)"] if sheet else []):
        limit.add_column(col, justify="right")
    for path, ts in times.items():
        mean = sum(ts) / len(ts)
        floor = flops["sequential"] / peak
        cells = [path, f"{flops[path] / 1e9:.1f}", f"{mean:.2f}", f"{flops[path] / mean / 1e9:.1f}",
                 f"{100 * flops[path] / mean / peak:.0f}%", f"{floor:.2f}", f"{floor / base:.3f}"]
        limit.add_row(*cells, *([f"{100 * flops[path] / mean / sheet:.1f}%"] if sheet else []))
    console.print(limit)


if __name__ == "__main__":
    main()
