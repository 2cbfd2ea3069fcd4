"""Text reconstruction from one LoRA update: DAGER's span check on the LoRA A factors.

DAGER (Petrov, Dimitrov, Baader, Mueller & Vechev, "DAGER: Exact Gradient Inversion for Large Language
Models", NeurIPS 2024; code: github.com/insait-institute/dager-gradient-inversion) rests on one fact: for a
linear layer y = W x applied to the token inputs x_1..x_T of a batch, dL/dW = sum_t g_t x_t^T, so the rows of
the gradient lie in span{x_t}; when T is below the input width d, an input vector z was in the batch iff z lies
in that span. DAGER tests every vocabulary token at layer 1 (token set), then extends sequences one token at a
time and tests the *second* layer's input at the new position (decoders: the causal prefix decides it).

**Why DAGER and not UTR.** UTR (Chen et al., "Reconstructing Training Data from Adapter-based Federated Large
Language Models", arXiv 2601.17533, 2026) infers token presence from attention patterns in the frozen layers,
inverts sentences inside the low-rank subspace of the adapter gradients and decodes with a language prior; its
setting is a client *gradient* of a classification/NLU task. DAGER's check transfers to LoRA exactly (its code
runs LoRA on Llama-3.1-8B with r=256, ``scripts/lora.sh``), needs no training or tuning, and fedsafe's updates
are LoRA deltas, so DAGER is the one implemented; UTR's third step (greedy decoding constrained to the
recovered tokens, guided by the model's own language prior) is used only to order the token set when DAGER's
sequence step cannot run (below).

**The LoRA form.** A LoRA'd layer is y = W x + s B A x. Its gradients are dL/dA = s B^T G X^T and
dL/dB = s G (A X)^T (G: output gradients, X: inputs). So the rows of dL/dA lie in span{x_t} (d-dimensional,
like DAGER's full-weight check) but there are only r of them. In layer l, q_proj, k_proj and v_proj share one
input (the layer's input RMSNorm of the residual stream), so their A rows stack into a 3r x d matrix whose row
space is a subspace of span{x_t}; it *equals* span{x_t} (generically) when the number of distinct inputs is
at most 3r. At layer 0 (Llama-style models: no absolute position embedding) x_t = norm(e_{token t}), so the
distinct inputs are the distinct tokens of the batch; at layer 1 they are the distinct prefixes, i.e. the
batch's (non-padding) positions.

**Assumptions, and where the attack stops working** (each reported in the result):

- *A single local SGD step* (``fl.local_steps: 1``, ``fl.optimizer: sgd``: FedSGD), so the update is
  -lr * gradient. Several SGD steps keep layer-0 rows in the span of every token the client saw (the inputs of
  layer 0 do not depend on the weights) but grow the token count, and change layer 0 between steps, so the
  layer-1 (sequence) check is no longer exact. AdamW (fedsafe's default) divides each coordinate by its own
  running RMS: the update is not a linear combination of the inputs and the span check fails (even a first
  Adam step is ~ -lr * sign(gradient)). No remedy is attempted here.
- *Few enough tokens*: tokens: distinct tokens of the batch <= 3r (and < d); sequences: total batch
  positions <= 3r. Larger batches (or longer texts, or several steps) saturate the span (rank 3r), tokens fall
  outside the estimated subspace and recall drops (``saturated_l0`` / ``saturated_l1``).
- *B != 0*: dL/dA is proportional to B, which PEFT initialises to zero, so round 1's A update is zero and
  nothing is recovered from it; from round 2 on the global B is non-zero.
- *Exact arithmetic*: the update is the difference of two float32 vectors; pruning (secure aggregation's
  shared mask zeroes coordinates of each row), DP noise or quantisation move the rows out of the span.
- *The sum under secure aggregation* of m single-step updates is a single-step update on the union of the m
  batches: the same check then recovers the union (if it fits in 3r), without telling clients apart.

**Thresholds.** DAGER uses fixed span thresholds on exact gradients. A federated server gets
``(global + update) - global`` in float32, whose rounding error (half an ulp of each global entry) is not
negligible next to an update of small LoRA A factors, and the update's singular values decay smoothly. So
(i) the rank keeps only singular values above 3x the spectral norm of that rounding error (the server knows
the global adapter, hence the error's size), and (ii) by default an input counts as in the span when its
relative residual is below ``tau_rel`` (0.5) times the median residual of the whole vocabulary (nearly all of
which is outside the span: the median is the level of a random input); the sequence search uses 0.1, because
a wrong token after a right prefix leaves the layer-1 input only partly outside the span. A fixed ``tau``
restores DAGER's rule. With exact single-step gradients the two agree (residuals ~1e-5 inside, >0.1 outside).

When the layer-1 check cannot run (saturated, or disabled) the recovered token set is ordered by greedy
decoding from the global model restricted to that set (UTR's language-prior step); results say which
(``method``: ``dager`` or ``lm_greedy``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

#: LoRA'd projections that read the layer's normalised input directly (Llama/Qwen/SmolLM/Mistral naming)
SHARED_INPUT_MODULES = ("q_proj", "k_proj", "v_proj")


class _Stop(Exception):
    pass


@dataclass
class Reconstruction:
    """What the span checks recovered from one update."""

    tokens: list[int]  # recovered token ids (layer-0 check), sorted by residual
    sequences: list[list[int]]  # recovered sequences (DAGER layer-1 search, or the LM-ordered token set)
    method: str  # "dager" | "lm_greedy" | "none"
    rank_l0: int = 0
    rank_l1: int = 0
    capacity: int = 0  # 3r (rows available to span the inputs)
    saturated_l0: bool = False
    saturated_l1: bool = False
    info: dict = field(default_factory=dict)


def _lora_layer_modules(model, layer: int, names: Sequence[str] = SHARED_INPUT_MODULES) -> list[str]:
    return [name for name, module in model.named_modules()
            if name.split(".")[-1] in names and f".layers.{layer}." in f".{name}." and hasattr(module, "lora_A")]


def span_rows(flat, update: torch.Tensor, modules: Sequence[str]) -> torch.Tensor:
    """The stacked LoRA A rows of ``modules`` in ``update`` ([sum r, d] float64)."""
    rows = []
    for spec in flat.specs:
        if spec.kind == "A" and spec.name.split(".lora_A")[0] in modules:
            rows.append(update[spec.offset: spec.offset + spec.numel].view(spec.shape).double())
    if not rows:
        raise ValueError("server_view reconstruction: no LoRA A factor of q_proj/k_proj/v_proj found; it needs "
                         "lora.target_modules to include them (e.g. all-linear)")
    return torch.cat(rows)


def rounding_noise(global_rows: torch.Tensor) -> float:
    """Spectral norm of the float32 rounding error of ``(global + update) - global`` on these rows.

    Each entry of a float32 difference is off by up to half an ulp of the global value, ~U(-u|g|, u|g|) with
    u = 2^-24; a random m x d matrix of RMS e has spectral norm about e (sqrt(m) + sqrt(d)).
    """
    rms = float(global_rows.double().pow(2).mean().sqrt()) * 2.0 ** -24 / 3 ** 0.5
    m, d = global_rows.shape
    return rms * (m ** 0.5 + d ** 0.5)


def subspace(rows: torch.Tensor, rank_tol: float, noise: float = 0.0) -> tuple[torch.Tensor, int]:
    """Orthonormal basis [k, d] of the row space: singular values above ``rank_tol`` * the largest and above
    3x the spectral norm ``noise`` of the rounding error (directions below it are noise, not inputs)."""
    if rows.abs().max() == 0:
        return rows.new_zeros((0, rows.shape[1])), 0
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    k = int((s > max(rank_tol * s[0], 3 * noise)).sum())
    return vh[:k], k


def residuals(basis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Relative distance ||x - P x|| / ||x|| of each row of ``x`` from the span of ``basis`` (DAGER's check)."""
    x = x.double()
    norm = x.norm(dim=-1, keepdim=True)
    x = x / norm.clamp(min=1e-30)
    if basis.shape[0] == 0:
        return torch.ones(x.shape[:-1], dtype=torch.float64)
    out = (x - (x @ basis.T) @ basis).norm(dim=-1)
    return out.masked_fill(norm[..., 0] < 1e-12, 1.0)  # a zero input (a zeroed padding embedding) proves nothing


@torch.no_grad()
def layer_inputs(model, module_name: str, input_ids: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Inputs of ``module_name`` for each row of ``input_ids`` [n, L] -> [n, L, d] (forward stopped there)."""
    module = dict(model.named_modules())[module_name]
    captured = []

    def hook(_mod, args):
        captured.append(args[0].detach().float().cpu())
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for s in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[s: s + batch_size].to(device)
            try:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        if was_training:
            model.train()
    return torch.cat(captured)


def threshold(tau: float | None, tau_rel: float, reference: torch.Tensor) -> float:
    """The span-check threshold: ``tau``, or (None) ``tau_rel`` x the median residual of ``reference`` inputs
    (the vocabulary: almost all of it is outside the span, so its median is the level of a random input)."""
    return tau if tau is not None else tau_rel * float(reference.median())


def _basis(model, flat, update, global_vec, layer: int, rank_tol: float):
    modules = _lora_layer_modules(model, layer)
    rows = span_rows(flat, update, modules)
    noise = rounding_noise(span_rows(flat, global_vec, modules)) if global_vec is not None else 0.0
    basis, rank = subspace(rows, rank_tol, noise)
    return modules, basis, rank, rows.shape[0]


def recover_tokens(model, flat, update: torch.Tensor, *, tau: float | None = None, tau_rel: float = 0.5,
                   rank_tol: float = 1e-6, global_vec: torch.Tensor | None = None,
                   vocab_size: int | None = None) -> tuple[list[int], torch.Tensor, int, int]:
    """DAGER's layer-1 token filter on layer 0's LoRA A rows: (token ids, residual per vocab id, rank, 3r).

    ``global_vec`` (the adapter the update was computed from) sets the rounding-noise floor of the rank.
    """
    modules, basis, rank, capacity = _basis(model, flat, update, global_vec, 0, rank_tol)
    vocab = vocab_size or model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(vocab)[:, None]
    x = layer_inputs(model, modules[0], ids)[:, 0]  # position 0: no absolute positions in RoPE models
    res = residuals(basis, x)
    cut = threshold(tau, tau_rel, res)
    order = torch.argsort(res)
    tokens = [int(i) for i in order if res[i] < cut]
    return tokens, res, rank, capacity


@torch.no_grad()
def dager_sequences(model, flat, update: torch.Tensor, tokens: Sequence[int], *, tau: float | None = None,
                    tau_rel: float = 0.1, rank_tol: float = 1e-6, global_vec: torch.Tensor | None = None,
                    max_len: int = 64, max_beams: int = 32, chunk: int = 512) -> tuple[list[list[int]], int]:
    """DAGER's decoder search: grow sequences token by token, keep those whose layer-1 input is in the span.

    Returns (maximal sequences, rank of the layer-1 rows). The adaptive threshold is stricter than the token
    filter's (``tau_rel`` 0.1 vs 0.5): a wrong token after a right prefix moves the layer-1 input only partly
    out of the span (residual ~0.2 where a random input has ~0.8), and a wrong beam kept is extended again.
    A sequence ends when no recovered token extends it. The last position of a sample gets no gradient (its
    output predicts nothing), so a sample's final token is never confirmed and is missing from its sequence.
    """
    modules, basis, rank, _ = _basis(model, flat, update, global_vec, 1, rank_tol)
    cand = torch.tensor(list(tokens), dtype=torch.long)
    if cand.numel() == 0 or rank == 0:
        return [], rank
    vocab = model.get_input_embeddings().weight.shape[0]
    tau = threshold(tau, tau_rel, residuals(basis, layer_inputs(model, modules[0], torch.arange(vocab)[:, None])[:, 0]))

    def inputs(seqs: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer_inputs(model, modules[0], seqs[s: s + chunk])[:, -1].double()
                          for s in range(0, seqs.shape[0], chunk)])

    beams = cand[:, None]
    last = inputs(beams)
    res = residuals(basis, last)
    keep = res < tau
    beams, res, last = beams[keep], res[keep], last[keep]
    finished: list[list[int]] = []
    while beams.shape[0] and beams.shape[1] < max_len:
        if beams.shape[0] > max_beams:
            top = torch.argsort(res)[:max_beams]
            beams, res, last = beams[top], res[top], last[top]
        ext = torch.cat([beams.repeat_interleave(len(cand), 0), cand.repeat(beams.shape[0])[:, None]], dim=1)
        x = inputs(ext)
        r = residuals(basis, x)
        parent = torch.arange(beams.shape[0]).repeat_interleave(len(cand))
        # a run of one token attends to identical keys/values: its input repeats the parent's and proves nothing
        same = torch.nn.functional.cosine_similarity(x, last[parent], dim=-1) > 1 - 1e-9
        ok = (r < tau) & ~same
        extended = set(parent[ok].tolist())
        finished += [beams[i].tolist() for i in range(beams.shape[0]) if i not in extended]
        beams, res, last = ext[ok], r[ok], x[ok]
    finished += [b.tolist() for b in beams]
    # keep maximal sequences only (a prefix of another is not a separate sample)
    finished.sort(key=len, reverse=True)
    out: list[list[int]] = []
    for s in finished:
        if not any(o[: len(s)] == s for o in out):
            out.append(s)
    return out, rank


@torch.no_grad()
def lm_greedy_order(model, flat, global_vec: torch.Tensor, tokens: Sequence[int], start: Sequence[int],
                    n_sequences: int = 1, max_len: int = 64, stop: Sequence[int] = ()) -> list[list[int]]:
    """Order a token set by greedy decoding of the global model restricted to it (UTR's language prior).

    ``start``: the known start of every sample (the chat template's first tokens); the ``n_sequences``
    decodings differ in their first free token (the top ``n_sequences`` under the model).
    """
    allowed = torch.tensor(sorted(set(tokens)), dtype=torch.long)
    if allowed.numel() == 0:
        return []
    saved = flat.get()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        flat.set(global_vec)
        prefix = torch.tensor([list(start)], dtype=torch.long, device=device)
        logits = model(input_ids=prefix).logits[0, -1, allowed.to(device)].float()
        firsts = allowed[torch.argsort(logits, descending=True)[:n_sequences].cpu()].tolist()
        out = []
        for first in firsts:
            seq = list(start) + [first]
            step = model(input_ids=torch.tensor([seq], device=device), use_cache=True)
            while len(seq) < max_len and seq[-1] not in stop:
                z = step.logits[0, -1, allowed.to(device)]
                seq.append(int(allowed[int(z.argmax())]))
                step = model(input_ids=torch.tensor([[seq[-1]]], device=device), past_key_values=step.past_key_values,
                             use_cache=True)
            out.append(seq)
        return out
    finally:
        flat.set(saved)
        if was_training:
            model.train()


def reconstruct(model, flat, global_vec: torch.Tensor, update: torch.Tensor, *, tau: float | None = None,
                tau_rel: float = 0.5, seq_tau_rel: float = 0.1, rank_tol: float = 1e-6, max_len: int = 64,
                max_beams: int = 32, sequences: bool = True, start: Sequence[int] = (), n_sequences: int = 1,
                stop: Sequence[int] = ()) -> Reconstruction:
    """Token set (layer 0) and sequences (layer 1 DAGER search, else LM-ordered) from one LoRA update.

    ``global_vec`` is the adapter the update was computed from: the layer inputs are computed with it loaded
    (the model's adapter is restored afterwards).
    """
    saved = flat.get()
    try:
        flat.set(global_vec)
        tokens, res, rank0, capacity = recover_tokens(model, flat, update, tau=tau, tau_rel=tau_rel,
                                                      rank_tol=rank_tol, global_vec=global_vec)
        width = model.get_input_embeddings().weight.shape[1]
        rec = Reconstruction(tokens, [], "none", rank_l0=rank0, capacity=capacity,
                             saturated_l0=rank0 >= min(capacity, width))
        if rank0 == 0:
            rec.info["reason"] = "the update's layer-0 LoRA A factors are zero (B = 0 in round 1, or pruned)"
            return rec
        # more tokens than span dimensions: the set is not the batch's (noise, saturation), a search is hopeless
        if sequences and tokens and len(tokens) <= rank0:
            seqs, rank1 = dager_sequences(model, flat, update, tokens, tau=tau, tau_rel=seq_tau_rel, rank_tol=rank_tol,
                                          global_vec=global_vec, max_len=max_len, max_beams=max_beams)
            rec.rank_l1 = rank1
            rec.saturated_l1 = rank1 >= min(capacity, width)
            if seqs and not rec.saturated_l1:
                rec.sequences, rec.method = seqs, "dager"
                return rec
        if tokens:
            rec.sequences = lm_greedy_order(model, flat, global_vec, tokens, start or tokens[:1], n_sequences,
                                            max_len, stop)
            rec.method = "lm_greedy"
        return rec
    finally:
        flat.set(saved)


def token_scores(recovered: Sequence[int], true_tokens: set[int]) -> dict:
    """Precision / recall / F1 of a recovered token set against the batch's true token set."""
    rec = set(recovered)
    tp = len(rec & true_tokens)
    p = tp / len(rec) if rec else 0.0
    r = tp / len(true_tokens) if true_tokens else 0.0
    return {"token_precision": p, "token_recall": r, "token_f1": 2 * p * r / (p + r) if p + r else 0.0,
            "n_recovered_tokens": len(rec), "n_true_tokens": len(true_tokens)}


def sequence_scores(tokenizer, sequences: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> dict:
    """Best-match ROUGE-L of each reconstructed text against the client's texts, and the exact-match rates.

    ``exact_rate``: share of reconstructions equal (as words) to one of the targets
    (:func:`fedsafe.evaluation.leakage.leakage`); ``recovered_rate``: share of targets reproduced exactly.
    """
    from fedsafe.evaluation import leakage as lk

    texts = [tokenizer.decode(list(s), skip_special_tokens=True) for s in sequences]
    refs = [tokenizer.decode(list(t), skip_special_tokens=True) for t in targets]
    if not texts or not refs:
        return {"rougeL_mean": 0.0 if refs else None, "rougeL_max": 0.0 if refs else None,
                "exact_rate": 0.0 if refs else None, "recovered_rate": 0.0 if refs else None, "n": len(texts)}
    rep = lk.leakage(texts, refs, exhaustive=True)
    got = {tuple(lk.words(t)) for t in texts}
    recovered = sum(tuple(lk.words(r)) in got for r in refs) / len(refs)
    return {"rougeL_mean": rep.summary["rougeL_mean"], "rougeL_max": rep.summary["rougeL_max"],
            "exact_rate": rep.summary["exact_rate"], "recovered_rate": recovered, "n": len(texts)}
