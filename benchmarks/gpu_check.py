"""GPU check: the paths that only run on a CUDA GPU, each checked against a CPU or float64 reference.

    benchmarks/gpu_check.sh                 # on a machine with a CUDA GPU (under 5 minutes on one GPU)
    benchmarks/gpu_check.sh --cpu-dry-run   # the same steps on the CPU with the tiny model (tests the script)

Checks, each one row of the table it prints (PASS / FAIL / SKIP, seconds, the key figure):

1. quickstart_bf16      the quickstart (embedded SmolLM2-135M, 3 rounds) in bfloat16 on CUDA: every round's
                        loss finite, held-out loss lower after training, the weights really bf16 on CUDA.
2. lora_4bit_round      one round with model.quantization=4bit (bitsandbytes NF4, the `gpu` extra): finite
                        loss, Linear4bit layers in the model, an adapter saved; peak GPU memory.
3. batched_generation   32 prompts greedy, batch 16 against one at a time: outputs agree on most prompts
                        (bf16 padding may flip a late token), tokens per second and the batching speed-up.
4. aggregation_cuda     every aggregation rule on CUDA tensors [10, 200000] against the same call on the CPU:
                        output stays on CUDA, same client weights, max |difference| within float32 tolerance.
5. ckks_cuda_tensors    CKKS secure aggregation fed CUDA updates and a CUDA mask: the decrypted weighted mean
                        comes back on CUDA and matches the float64 plaintext mean within CKKS precision.
6. static_generation    fedsafe.generation's GPU path (static KV cache, compiled into CUDA graphs by
                        transformers) against the dynamic cache: 128 prompts x 32 tokens at batch 64, both warm;
                        ms per decoding step (issue 32's goal: <= 5 ms at batch >= 64) and agreement.
7. matrix (opt-in)      a stated subset of configs/adaptive.yaml on seed 0 (--matrix-cells; eval.batch_size
                        auto), timed, and the whole grid's time projected from the seconds per cell (cells share
                        trainings, so the projection is an upper bound); issue 32's goal: the whole grid on one
                        seed in <= 10 minutes. Needs ../shared/data beside the checkout. Runs only when
                        named: benchmarks/gpu_check.sh --only matrix.

Exit status: 0 when every check passed, 1 when one failed, 2 without CUDA (unless --cpu-dry-run). In the dry
run, device=cpu, the tiny random model replaces the embedded one and the 4-bit check runs unquantised (bitsandbytes'
4-bit kernels need CUDA), so a PASS there proves the script's logic, not the GPU paths.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    check: str
    status: str  # PASS / FAIL / SKIP
    seconds: float
    figure: str


class CheckFailed(Exception):
    """A check ran but its result is wrong (the message says what)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


def _run_config(args, out_dir: Path, *overrides: str):
    from fedsafe.config import load_config, quickstart_path

    base = [f"output_dir={out_dir}", f"model.device={args.device}"]
    if args.dry_run:  # tiny model: bigger lr and shorter sequences so that 3 rounds visibly learn
        base += ["model.name=tiny", "fl.lr=0.01", "fl.local_steps=2", "data.samples_per_client=8",
                 "data.max_length=96", "data.heldout_max=6"]
    return load_config(quickstart_path(), base + list(overrides))


def check_quickstart_bf16(args, out_dir: Path) -> str:
    from fedsafe.pipeline import run_experiment
    from fedsafe.rundir import RunDir

    import fedsafe.models as models

    seen = {}
    original = models.load_base_model

    def spy(*a, **k):  # record what the pipeline really loaded
        loaded = original(*a, **k)
        p = next(loaded.model.parameters())
        seen.update(dtype=p.dtype, device=p.device)
        return loaded

    import fedsafe.pipeline as pipeline

    pipeline.load_base_model = spy
    try:
        res = run_experiment(_run_config(args, out_dir, "name=quickstart_bf16", "model.dtype=bfloat16"),
                             progress=False)
    finally:
        pipeline.load_base_model = original
    losses = [r["mean_loss"] for r in RunDir(res.run_dir).records("round")]
    _require(seen.get("dtype") == torch.bfloat16, f"weights loaded as {seen.get('dtype')}, not bfloat16")
    _require(seen["device"].type == args.device, f"weights on {seen['device']}, not {args.device}")
    _require(len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), f"round losses {losses}")
    before, after = res.heldout_loss_before, res.heldout_loss_after
    _require(after < before, f"held-out loss did not drop: {before:.4f} -> {after:.4f}")
    return f"held-out loss {before:.3f} -> {after:.3f}; round losses {', '.join(f'{x:.3f}' for x in losses)}"


def check_lora_4bit_round(args, out_dir: Path) -> str:
    from fedsafe.pipeline import run_experiment
    from fedsafe.rundir import RunDir

    overrides = ["name=lora_4bit", "fl.rounds=1"]
    if not args.dry_run:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise CheckFailed(f"bitsandbytes is not installed ({exc}): pip install -e '.[gpu]'") from None
        overrides.append("model.quantization=4bit")
        torch.cuda.reset_peak_memory_stats()
    import fedsafe.pipeline as pipeline

    original, kinds = pipeline.attach_lora, set()

    def spy(model, *a, **k):
        kinds.update(type(m).__name__ for m in model.modules())
        return original(model, *a, **k)

    pipeline.attach_lora = spy
    try:
        res = run_experiment(_run_config(args, out_dir, *overrides), progress=False)
    finally:
        pipeline.attach_lora = original
    losses = [r["mean_loss"] for r in RunDir(res.run_dir).records("round")]
    _require(len(losses) == 1 and bool(torch.isfinite(torch.tensor(losses)).all()), f"round loss {losses}")
    _require((res.final_adapter / "adapter_model.safetensors").exists(), "no final adapter written")
    if args.dry_run:
        return f"round loss {losses[0]:.3f} (dry run: unquantised, 4-bit needs CUDA)"
    _require("Linear4bit" in kinds, f"no bitsandbytes Linear4bit layer in the loaded model ({sorted(kinds)[:8]}...)")
    peak = torch.cuda.max_memory_allocated() / 2**20
    return f"round loss {losses[0]:.3f}; Linear4bit layers; peak GPU memory {peak:.0f} MiB"


def _generation_bench(args, n_prompts: int, new_tokens: int):
    """The model the generation checks use (embedded in bf16; tiny in float32 for the dry run), their prompts,
    and ``timed(**generate_kwargs) -> (outputs, seconds)`` synchronised on CUDA."""
    from fedsafe.generation import generate
    from fedsafe.models import load_base_model

    name = "tiny" if args.dry_run else "embedded"
    loaded = load_base_model(name, args.device, "bfloat16" if not args.dry_run else "float32", None, seed=0)
    prompts = [f"Write one sentence about the number {i} and why it is {'odd' if i % 2 else 'even'}."
               for i in range(n_prompts)]

    def timed(**kw):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=new_tokens, **kw)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return outs, time.perf_counter() - t0

    return loaded, prompts, timed


def check_batched_generation(args, out_dir: Path) -> str:
    from fedsafe.generation import generate

    n_prompts, new_tokens = (32, 32) if not args.dry_run else (8, 8)  # the CPU dry run only tests the logic
    loaded, prompts, timed = _generation_bench(args, n_prompts, new_tokens)
    # warm-up at the timed shapes: on the H200 the first batch-16 pass took 5.9 s against 1.7 s warm (kernel
    # selection for new shapes), which a 2-prompt warm-up did not cover
    generate(loaded.model, loaded.tokenizer, prompts[:16], max_new_tokens=new_tokens, batch_size=16)
    generate(loaded.model, loaded.tokenizer, prompts[:1], max_new_tokens=new_tokens, batch_size=1)
    batched, t_batched = timed(batch_size=16)
    single, t_single = timed(batch_size=1)
    _require(len(batched) == len(prompts) == len(single), "wrong number of outputs")
    agree = sum(a == b for a, b in zip(batched, single))
    _require(agree >= len(prompts) // 2, f"batched and one-at-a-time greedy outputs agree on {agree}/{len(prompts)}")
    tok_s = len(prompts) * new_tokens / t_batched  # upper bound: generation may stop early at EOS
    return (f"{agree}/{len(prompts)} identical to batch 1; <= {tok_s:.0f} tok/s batched, "
            f"speed-up x{t_single / t_batched:.1f}")


def check_aggregation_cuda(args, out_dir: Path) -> str:
    from fedsafe import aggregators
    from fedsafe.errors import ConfigError

    gen = torch.Generator().manual_seed(0)
    n, d = 10, 200_000 if not args.dry_run else 20_000
    updates = torch.randn(n, d, generator=gen) * 1e-3
    updates[:2] += 5e-3  # two outliers so that robust rules have something to drop
    num_samples = torch.randint(10, 100, (n,), generator=gen).float()
    ids = [f"c{i}" for i in range(n)]
    worst, ran, skipped, slowest = 0.0, [], [], (0.0, "")
    for name in sorted(aggregators.REGISTRY):
        if name == "probe":  # needs a trained probe and a model; covered by tests/test_probe.py
            skipped.append(name)
            continue
        try:
            rule_cpu, rule_dev = aggregators.get(name), aggregators.get(name)
        except (ConfigError, TypeError):
            skipped.append(name)
            continue
        ref = rule_cpu(updates.clone(), num_samples.clone(), ids)
        dev_updates, dev_samples = updates.to(args.device), num_samples.to(args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        got = rule_dev(dev_updates, dev_samples, ids)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        slowest = max(slowest, (seconds, name))
        _require(got.update.device.type == args.device, f"{name}: result on {got.update.device}, not {args.device}")
        diff = float((got.update.float().cpu() - ref.update.float()).abs().max())
        scale = float(ref.update.abs().max()) or 1.0
        _require(diff <= 1e-4 * scale + 1e-7, f"{name}: max |{args.device} - cpu| = {diff:.3g} (scale {scale:.3g})")
        w_ref, w_got = torch.as_tensor(ref.client_weights).float(), torch.as_tensor(got.client_weights).float().cpu()
        _require(torch.allclose(w_got, w_ref, atol=1e-4), f"{name}: client weights differ from the CPU's")
        worst = max(worst, diff)
        ran.append(name)
    _require(len(ran) >= 5, f"only {ran} ran")
    return (f"{len(ran)} rules, max |{args.device}-cpu| {worst:.1e}, slowest {slowest[1]} {slowest[0] * 1e3:.0f} ms"
            + (f"; not run: {', '.join(skipped)}" if skipped else ""))


def check_ckks_cuda_tensors(args, out_dir: Path) -> str:
    from fedsafe.defenses.secure_aggregation.protocol import (KeyHolder, aggregate_encrypted, decrypt_aggregate, encrypt_update,
                                             fedavg_weights)

    keys = KeyHolder()
    n, d = 3, 20_000
    gen = torch.Generator().manual_seed(1)
    updates = (torch.randn(n, d, generator=gen) * 1e-3).to(args.device)
    mask = (torch.rand(d, generator=gen) > 0.2).to(args.device)
    weights = fedavg_weights([40, 25, 35])
    enc = [encrypt_update(keys.client_context_bytes(), updates[k], float(weights[k]), mask, client_id=f"c{k}")
           for k in range(n)]
    agg = aggregate_encrypted(keys.server_context_bytes(), enc)
    out = decrypt_aggregate(keys.client_context_bytes(), agg, mask, min_clients=n)
    _require(out.device.type == args.device, f"decrypted mean on {out.device}, not {args.device}")
    ref = torch.zeros(d, dtype=torch.float64)
    cpu_mask = mask.cpu()
    ref[cpu_mask] = (weights[:, None] * updates.cpu().double()).sum(0)[cpu_mask] / weights.sum()
    err = float((out.cpu().double() - ref).abs().max())
    _require(err < 1e-6, f"CKKS mean differs from the float64 plaintext mean by {err:.3g}")
    mib = sum(len(c) for e in enc for c in e.chunks) / 2**20
    return f"max |HE - plaintext| {err:.1e} over {int(cpu_mask.sum())} coords; {mib:.1f} MiB ciphertext from {n} clients"


def check_static_generation(args, out_dir: Path) -> str:
    n_prompts, new_tokens, batch = (128, 32, 64) if not args.dry_run else (8, 8, 4)
    _, _, timed_at = _generation_bench(args, n_prompts, new_tokens)

    def timed(static):
        return timed_at(batch_size=batch, static_cache=static)

    _, t_compile = timed("on")  # the first pass compiles the shapes (CUDA graphs); timed apart
    timed("off")  # warm the dynamic path at the same shapes
    static, t_static = timed("on")
    dynamic, t_dynamic = timed("off")
    steps = -(-n_prompts // batch) * new_tokens
    agree = sum(a == b for a, b in zip(static, dynamic))
    _require(len(static) == n_prompts, "wrong number of outputs")
    _require(agree >= n_prompts // 2, f"static and dynamic greedy outputs agree on {agree}/{n_prompts}")
    return (f"batch {batch}: static {t_static / steps * 1e3:.1f} ms/step vs dynamic {t_dynamic / steps * 1e3:.1f} "
            f"(goal <= 5); first static pass {t_compile:.1f} s; {agree}/{n_prompts} identical")


def check_matrix(args, out_dir: Path) -> str:
    from fedsafe.grid import load_grid, run_grid, select_settings

    cells = [c for c in args.matrix_cells.split(",") if c]
    overrides = [f"output_dir={out_dir}", f"model.device={args.device}", "eval.batch_size=auto"]
    if args.dry_run:  # the tiny model, one short round, small evaluation: tests the check, not the GPU
        overrides += ["model.name=tiny", "fl.rounds=1", "fl.local_steps=1", "data.samples_per_client=4",
                      "data.max_length=384", "eval.n_prompts=4", "eval.n_normal_prompts=4",
                      "eval.n_borderline_prompts=4", "eval.max_new_tokens=4", "posthoc.steps=2",
                      'roles.1.data=[{path: "starter:train", categories: [aligned]}]']
    spec, settings = load_grid(ROOT / "configs" / "adaptive.yaml", overrides)
    chosen = select_settings(settings, cells)
    _require(len(chosen) == len(cells), f"--matrix-cells named {len(cells)} settings, {len(chosen)} exist")
    t0 = time.perf_counter()
    grid_dir = run_grid(spec, chosen, progress=False, seeds=[0])
    secs = time.perf_counter() - t0
    import pandas as pd

    results = pd.read_csv(grid_dir / "results.csv")
    _require(len(results) >= len(cells), f"results.csv has {len(results)} rows for {len(cells)} settings")
    per_cell = secs / len(cells)
    return (f"{len(cells)} of {len(settings)} settings, seed 0, in {secs:.0f} s ({per_cell:.0f} s a setting); "
            f"whole grid projected <= {per_cell * len(settings) / 60:.0f} min (goal <= 10)")


CHECKS = [("quickstart_bf16", check_quickstart_bf16), ("lora_4bit_round", check_lora_4bit_round),
          ("batched_generation", check_batched_generation), ("aggregation_cuda", check_aggregation_cuda),
          ("ckks_cuda_tensors", check_ckks_cuda_tensors), ("static_generation", check_static_generation),
          ("matrix", check_matrix)]
MATRIX_CELLS = "none-fedavg,data_poisoning-fedavg,minmax-krum"
OPT_IN = {"matrix"}  # runs only when --only names it (minutes of training; not part of the 5-minute check)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-dry-run", dest="dry_run", action="store_true",
                        help="run every step on the CPU with the tiny model (checks the script, not the GPU)")
    parser.add_argument("--only", default="", help="comma-separated check names to run (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories (printed at the end)")
    parser.add_argument("--matrix-cells", default=MATRIX_CELLS,
                        help="the settings of configs/adaptive.yaml the matrix check runs (comma-separated)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: FAIL: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False, "
              f"CUDA build: {torch.version.cuda or 'no'}). Run it on a GPU machine with a CUDA build of torch "
              "(make setup TORCH=...), or use --cpu-dry-run to test the script on the CPU.", file=sys.stderr)
        return 2
    args.device = "cpu" if args.dry_run else "cuda"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.WARNING)
    chosen = [c for c in CHECKS if (not args.only and c[0] not in OPT_IN) or c[0] in args.only.split(",")]
    if args.device == "cuda":
        print(f"gpu_check on {torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    else:
        print(f"gpu_check --cpu-dry-run (torch {torch.__version__}): CPU, tiny model; not a GPU result")
    out_root = Path(tempfile.mkdtemp(prefix="fedsafe-gpu-check-"))
    rows, t_all = [], time.perf_counter()
    for name, fn in chosen:
        t0 = time.perf_counter()
        try:
            figure, status = fn(args, out_root / name), "PASS"
        except CheckFailed as exc:
            figure, status = str(exc), "FAIL"
        except Exception as exc:  # a crash is a failed check; the traceback goes to stderr, the table goes on
            traceback.print_exc()
            figure, status = f"{type(exc).__name__}: {exc}".splitlines()[0][:200], "FAIL"
        rows.append(Row(name, status, time.perf_counter() - t0, figure))
        print(f"  {name}: {status} ({rows[-1].seconds:.1f} s)", flush=True)
    width = max(len(r.check) for r in rows)
    print(f"\n| {'check'.ljust(width)} | result | seconds | key figure |")
    print(f"|{'-' * (width + 2)}|--------|---------|------------|")
    for r in rows:
        print(f"| {r.check.ljust(width)} | {r.status:<6} | {r.seconds:7.1f} | {r.figure} |")
    total = time.perf_counter() - t_all
    failed = [r.check for r in rows if r.status == "FAIL"]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} checks passed in {total:.0f} s on {args.device}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if args.keep:
        print(f"run directories: {out_root}")
    else:
        import shutil

        shutil.rmtree(out_root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
