"""Benchmark: CKKS secure aggregation of pruned LoRA updates vs FedShield-LLM's original scheme.

For the LoRA adapter of the embedded model (SmolLM2-135M, fedsafe's default LoRA: r=16 on all linear
layers; 30 layers, hidden 576, intermediate 1536, 9 query / 3 key-value heads of dim 64) and of a 7B Llama
(32 layers, hidden 4096, r=16 on q,k,v,o: d = 16.8M), with 3 and 10 clients and pruning ratios 0, 0.2 and
0.5, it measures one round:
  * ciphertext bytes uploaded per client (and the expansion over float32 plaintext),
  * client CPU seconds (mask derivation + encryption, mean over clients), server CPU seconds to add all
    ciphertexts (deserialising included), key-holder CPU seconds to decrypt,
  * max abs error of the HE result against the same computation in float64 plaintext, and against the
    dense weighted FedAvg on the coordinates the round updates.
FedShield's scheme (each client prunes its own update, encrypts all coordinates zeros included, one tensor
at a time, server takes the unweighted mean) is the baseline row, at pruning 0.5 (its cost does not depend
on the ratio).

Updates and the global adapter are simulated (random vectors with LoRA-update magnitudes). Clients encrypt
in worker processes (as they would on their own machines) and their times are CPU seconds of that process;
the server adds each client's ciphertexts as they arrive (streaming, so memory is one sum plus one client),
timed as CPU seconds of the server thread. One repeat per cell. Rows are appended to --out as they finish.

    .venv/bin/python benchmarks/secure_aggregation.py [--quick] [--skip-7b-10] [--workers 2] [--out table.md]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from fedsafe.defenses.secure_aggregation.pruning import pruning_mask
from fedsafe.defenses.secure_aggregation.protocol import (
    CiphertextSum,
    CKKSParams,
    FedShieldSum,
    KeyHolder,
    decrypt_aggregate,
    encrypt_update,
    fedavg_weights,
    fedshield_decrypt,
    fedshield_encrypt,
)
from fedsafe.fl.params import ParamSpec

console = Console(stderr=True)


# --- LoRA layouts -------------------------------------------------------------------------------------

def lora_specs(layers: int, modules: dict[str, tuple[int, int]], r: int) -> list[ParamSpec]:
    """ParamSpecs in PEFT order (per layer, per module: A [r, in] then B [out, r])."""
    specs, offset = [], 0
    for layer in range(layers):
        for module, (fan_in, fan_out) in modules.items():
            for kind, shape in (("A", (r, fan_in)), ("B", (fan_out, r))):
                specs.append(ParamSpec(f"model.layers.{layer}.{module}.lora_{kind}.weight", shape, offset))
                offset += shape[0] * shape[1]
    return specs


HIDDEN, INTER, KV = 576, 1536, 3 * 64  # SmolLM2-135M
SMOL_ALL_LINEAR = {
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, KV), "self_attn.v_proj": (HIDDEN, KV),
    "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (HIDDEN, INTER), "mlp.up_proj": (HIDDEN, INTER),
    "mlp.down_proj": (INTER, HIDDEN),
}
SMOL_QV = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (HIDDEN, KV)}
LLAMA7B_QKVO = {f"self_attn.{m}_proj": (4096, 4096) for m in "qkvo"}

MODELS = {
    "smollm2-135m r16 all-linear": lambda: lora_specs(30, SMOL_ALL_LINEAR, 16),
    "smollm2-135m r32 q,v": lambda: lora_specs(30, SMOL_QV, 32),
    "llama-7b r16 q,k,v,o": lambda: lora_specs(32, LLAMA7B_QKVO, 16),
}


# --- client work in worker processes (each simulated client on its own core) --------------------------

def _init_worker() -> None:
    torch.set_num_threads(1)  # one core per simulated client; SEAL is single-threaded here


def _encrypt_job(job):
    scheme, ctx_bytes, update, weight, mask, ratio, specs = job
    update = torch.from_numpy(update)
    # CPU time of this process, not wall time: the machine is shared, and a real client has its own.
    t0 = time.process_time()
    if scheme == "fedsafe":
        enc = encrypt_update(ctx_bytes, update, weight, torch.from_numpy(mask))
    else:
        enc = fedshield_encrypt(ctx_bytes, update, ratio, specs)
    return enc, time.process_time() - t0


@dataclass
class Row:
    model: str
    d: int
    clients: int
    scheme: str
    ratio: float
    kept: int
    ciphertexts: int  # per client
    measured_ciphertexts: int  # per client, actually encrypted (the rest is scaled)
    bytes_per_client: float
    client_s: float
    aggregate_s: float
    decrypt_s: float
    err_he: float
    err_fedavg: float


def simulate(d: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Global adapter ~ N(0, 0.02^2); updates with |x| log-uniform in [1e-3, 1e-1]; sample counts 50..500."""
    g = torch.Generator().manual_seed(seed)
    global_vec = torch.randn(d, generator=g) * 0.02
    updates = torch.empty(n, d)
    for k in range(n):
        magnitude = torch.pow(10.0, -3 + 2 * torch.rand(d, generator=g))
        updates[k] = magnitude * torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
    num_samples = torch.randint(50, 501, (n,), generator=g).tolist()
    return global_vec, updates, num_samples


def run_case(pool, keys, model, specs, global_vec, updates, num_samples, scheme, ratio,
             max_ciphertexts: int = 0) -> Row:
    """One round of one scheme, every party measured; returns its row.

    With ``max_ciphertexts`` > 0 each client encrypts only its first that-many ciphertexts' worth of values
    (for FedShield: the first LoRA tensors up to that many ciphertexts); bytes and seconds are then scaled
    by (ciphertexts needed / ciphertexts measured) and errors are measured on that part. CKKS ciphertexts
    are independent, so cost is linear in their number; the row says how many were measured.
    """
    n, d_full = updates.shape
    slots = CKKSParams().slot_count
    weights = fedavg_weights(num_samples)
    client_ctx, server_ctx = keys.client_context_bytes(), keys.server_context_bytes()
    mask_s = 0.0
    if scheme == "fedsafe":
        # Every client derives the same mask from the global adapter; that cost is part of its round.
        t0 = time.process_time()
        mask = pruning_mask(global_vec, ratio, specs)
        mask_s = time.process_time() - t0
        kept_full = int(mask.sum())
        needed = math.ceil(kept_full / slots)
        if max_ciphertexts and needed > max_ciphertexts:  # encrypt the first kept values only
            kept_idx = mask.nonzero().flatten()
            mask = torch.zeros_like(mask)
            mask[kept_idx[: max_ciphertexts * slots]] = True
        measured = math.ceil(int(mask.sum()) / slots)
        mask_np = mask.numpy()
        jobs = (("fedsafe", client_ctx, updates[k].numpy(), float(weights[k]), mask_np, ratio, None)
                for k in range(n))
        total = CiphertextSum(server_ctx)
    else:
        mask = None
        kept_full = d_full
        per_tensor = [math.ceil(s.numel / slots) for s in specs]
        needed = sum(per_tensor)
        m = len(specs)
        if max_ciphertexts and needed > max_ciphertexts:  # the first LoRA tensors only
            m = max(1, int(np.searchsorted(np.cumsum(per_tensor), max_ciphertexts, side="right")))
        specs = specs[:m]
        measured = sum(per_tensor[:m])
        updates = updates[:, : sum(s.numel for s in specs)]
        jobs = (("fedshield", client_ctx, updates[k].numpy(), 1.0, None, ratio, specs) for k in range(n))
        total = FedShieldSum(server_ctx)
    factor = needed / measured
    d = updates.shape[1]
    encrypt_s, nbytes, aggregate_s = [], [], 0.0
    for enc, seconds in pool.imap(_encrypt_job, jobs, chunksize=1):  # the server adds as clients arrive
        encrypt_s.append(seconds)
        nbytes.append(enc.nbytes)
        t0 = time.thread_time()
        total.add(enc)
        aggregate_s += time.thread_time() - t0
        del enc
    t0 = time.thread_time()
    agg = total.result()
    aggregate_s += time.thread_time() - t0
    del total
    t0 = time.thread_time()
    result = decrypt_aggregate(client_ctx, agg, mask) if scheme == "fedsafe" else fedshield_decrypt(client_ctx, agg)
    decrypt_s = time.thread_time() - t0
    del agg
    result = result.double()

    dense_fedavg = torch.zeros(d, dtype=torch.float64)
    for k in range(n):
        dense_fedavg += float(weights[k]) * updates[k].double()
    if scheme == "fedsafe":
        plain = dense_fedavg * mask  # the same computation in float64 plaintext
        # FedAvg error on the coordinates this round updates (pruned ones keep the global value by design).
        err_fedavg = (result - dense_fedavg)[mask].abs().max().item()
    else:  # FedShield in plaintext: unweighted mean of each client's locally pruned update
        plain = torch.zeros(d, dtype=torch.float64)
        for k in range(n):
            plain += updates[k].double() * pruning_mask(updates[k], ratio, specs)
        plain /= n
        err_fedavg = (result - dense_fedavg).abs().max().item()  # it updates every coordinate
    return Row(model, d_full, n, scheme, ratio, kept_full, needed, measured, factor * float(np.mean(nbytes)),
               mask_s + factor * float(np.mean(encrypt_s)), factor * aggregate_s, factor * decrypt_s,
               (result - plain).abs().max().item(), err_fedavg)


HEAD = ("| model (LoRA) | d | clients | scheme | prune | encrypted values | ciphertexts/client (measured) "
        "| MB/client | x fp32 "
        "| client s (mask+enc) | server agg s | decrypt s | max err vs same plaintext | max err vs weighted FedAvg |")


def table_line(r: Row) -> str:
    """One markdown table row."""
    scheme = "fedsafe (shared mask, weighted)" if r.scheme == "fedsafe" else "FedShield baseline (zeros, unweighted)"
    est = "" if r.measured_ciphertexts == r.ciphertexts else " est."
    return (f"| {r.model} | {r.d:,} | {r.clients} | {scheme} | {r.ratio:.1f} | {r.kept:,} "
            f"| {r.ciphertexts:,} ({r.measured_ciphertexts:,}) "
            f"| {r.bytes_per_client / 1e6:.1f}{est} | {r.bytes_per_client / (4 * r.d):.1f} "
            f"| {r.client_s:.2f}{est} | {r.aggregate_s:.2f}{est} | {r.decrypt_s:.2f}{est} "
            f"| {r.err_he:.1e} | {r.err_fedavg:.1e} |")


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="r32 q,v embedded adapter, 3 clients only (~1 min)")
    parser.add_argument("--skip-7b-10", action="store_true", help="leave out the slowest cell (7B x 10 clients)")
    parser.add_argument("--only", default=None, help="run only these 'model:clients' cells, ';'-separated, "
                                                     "e.g. 'llama-7b r16 q,k,v,o:3'")
    parser.add_argument("--max-ciphertexts", type=int, default=0,
                        help="encrypt at most this many ciphertexts per client and scale bytes/seconds "
                             "linearly (0: encrypt everything)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="client encryption processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the markdown table here, row by row")
    args = parser.parse_args()

    torch.set_num_threads(1)  # the parent plays one client's mask derivation, the server and the key holder
    params = CKKSParams()
    keys = KeyHolder(params)
    if args.quick:
        plan = [("smollm2-135m r32 q,v", 3)]
    else:
        plan = [("smollm2-135m r16 all-linear", 3), ("smollm2-135m r16 all-linear", 10),
                ("llama-7b r16 q,k,v,o", 3)] + ([] if args.skip_7b_10 else [("llama-7b r16 q,k,v,o", 10)])
    if args.only:
        plan = [(cell.rsplit(":", 1)[0], int(cell.rsplit(":", 1)[1])) for cell in args.only.split(";")]
    cases = [("fedsafe", 0.0), ("fedsafe", 0.2), ("fedsafe", 0.5), ("fedshield", 0.5)]
    sizes = {name: sum(s.numel for s in build()) for name, build in MODELS.items()}
    header = (f"CKKS {params.security_label()}; N={params.poly_modulus_degree}, moduli "
              f"{list(params.coeff_mod_bit_sizes)}, scale 2^{params.scale_bits:.0f}, {params.slot_count} slots; "
              f"client context {len(keys.client_context_bytes()):,} B, server context "
              f"{len(keys.server_context_bytes()):,} B; {args.workers} client worker process(es)")
    console.print(header)
    if args.out and not os.path.exists(args.out):
        with open(args.out, "w") as f:
            f.write(header + "\n\n" + HEAD + "\n|" + "---|" * (HEAD.count("|") - 1) + "\n")

    rows: list[Row] = []
    started = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers, initializer=_init_worker) as pool, \
            Progress(console=console) as progress:
        task = progress.add_task("secure aggregation", total=len(plan) * len(cases))
        for model, n in plan:
            specs = MODELS[model]()
            global_vec, updates, num_samples = simulate(sizes[model], n, args.seed)
            for scheme, ratio in cases:
                progress.update(task, description=f"{model}, {n} clients, {scheme} p={ratio}")
                row = run_case(pool, keys, model, specs, global_vec, updates, num_samples, scheme, ratio,
                               args.max_ciphertexts)
                rows.append(row)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(table_line(row) + "\n")
                progress.advance(task)
            del global_vec, updates
    elapsed = time.perf_counter() - started

    print(header + "\n")
    print(HEAD + "\n|" + "---|" * (HEAD.count("|") - 1))
    print("\n".join(table_line(r) for r in rows))
    print("\nLoRA sizes d: " + ", ".join(f"{k} = {v:,}" for k, v in sizes.items())
          + f". One repeat per cell; CPU seconds; total wall time {elapsed:.0f} s.")
    if any(r.measured_ciphertexts != r.ciphertexts for r in rows):
        print("est. = each client encrypted only the number of ciphertexts in parentheses; bytes and seconds are "
              "scaled linearly to the full count (CKKS ciphertexts are independent), errors are measured on the "
              "encrypted part.")


if __name__ == "__main__":
    main()
