"""Batched multi-adapter local training: the K clients of a round as K LoRA adapters over one frozen base model.

Every client of a round starts from the same global adapter and trains on its own data. Their base-model work
(the frozen weights, by far the most of the FLOPs) is the same computation on different rows, so one
forward/backward pass over the rows of all K clients does it at once; only the LoRA path differs per client.
This is the idea of Punica's SGMV/BGMV kernels (Chen et al., "Punica: Multi-Tenant LoRA Serving", MLSys 2024)
and S-LoRA (Sheng et al., "S-LoRA: Serving Thousands of Concurrent LoRA Adapters", MLSys 2024) for serving, and
of mLoRA (Ye et al., "mLoRA: Fine-Tuning LoRA Adapters via Highly-Efficient Pipeline Parallelism in Multiple
GPUs", VLDB 2025) for training:

- each LoRA factor is stacked over adapters, A as ``[K, r, in]`` and B as ``[K, out, r]``; the rows of a pass
  are grouped by adapter (client k owns rows ``[s_k, e_k)``) and the LoRA path is one matmul per group (a
  segmented GEMM), or on an accelerator, when every group has the same shape, one ``torch.bmm``;
- whatever mixes positions or depends on the padded length runs on each client's own ``[b, L_k]`` slice, as
  the sequential path runs it: attention (with the mask the model builds for that client's batch alone), LoRA
  dropout and the LoRA matmuls; the rest (the base model's linear layers, norms, the LM head) is row-wise;
- each adapter keeps its own optimizer: AdamW and SGD are elementwise, so one optimizer over the stacked
  tensors is K independent optimizers; gradient clipping is per adapter (the norm over adapter k's slices);
- each client's batches come from its own seeded stream, as in :class:`fedsafe.fl.client.LocalTrainer`, and
  LoRA dropout draws each client's mask from that client's RNG state with the same op and shape as the
  sequential path, so the masks are identical; the global RNG is left as the sequential path leaves it.

The result equals :meth:`LocalTrainer.fit` client by client (same seeds, same batches). fp32 on CPU it was
bit-identical on the tiny test Llama (torch 2.13, MKL); the guarantee the tests hold it to is 1e-5 relative,
since a BLAS may round a GEMM over more rows differently. Anything that changes the training step is not
reproduced here: :func:`why_sequential` names it and the engine then trains the clients one at a time.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from fedsafe.data.format import IGNORE_INDEX, collate
from fedsafe.data.client_data import ClientData
from fedsafe.fl.client import (ClientResult, LocalTrainer, RoundConfig, _batch_stream, check_base_residual, derive_seed,
                               train_only)

BATCHED_CLIENTS = ("auto", "on", "off")  # fl.batched_clients
# why auto trains one at a time on a CPU (the round record carries it)
CPU_REASON = ("fl.batched_clients=auto on a CPU: one at a time (the batched pass keeps each client's attention and "
              "LoRA on its own slice to stay bit-identical, and took 1.58x the sequential time for 5 clients x 4 "
              "steps on 2 cores, benchmarks/batched_round.py; fl.batched_clients=on forces it)")


def why_sequential(trainer, rc: RoundConfig, n_clients: int) -> str | None:
    """Why the clients of this round cannot train as adapters of one batched pass, or None when they can.

    ``trainer`` is the engine's local trainer after the ``local_training`` hooks (without the ``client_update``
    hooks, which run on each result either way). Plug-ins that declare that they change local training are
    checked by the engine before this (:meth:`fedsafe.plugins.Plugin.changes_local_training`); this checks the
    trainer and the round themselves, so that a trainer this module does not reproduce never runs batched.
    """
    if n_clients < 2:
        return "fewer than 2 clients this round"
    if type(trainer) is not LocalTrainer:
        return f"the local trainer is {type(trainer).__name__}, not the plain LocalTrainer"
    if trainer.loss_terms:
        return f"the local trainer has loss terms ({', '.join(type(t).__name__ for t in trainer.loss_terms)})"
    if rc.algorithm == "scaffold":
        return "fl.algorithm=scaffold (control variates correct each client's gradient)"
    if rc.step_feature_mask is not None:
        return "step-level update reports (the probe's level=step)"
    return lora_layout_problem(trainer.model, trainer.flat)


def lora_layout_problem(model: torch.nn.Module, flat) -> str | None:
    """None when every trainable tensor is the A or B factor of a plain PEFT LoRA linear layer (what
    :class:`BatchedLoRA` replaces), else what is not."""
    layers = _lora_layers(model)
    if isinstance(layers, str):
        return layers
    factors = {id(p) for m in layers for p in (_factor(m, "A"), _factor(m, "B"))}
    other = [s.name for p, s in zip(flat.params, flat.specs) if id(p) not in factors]
    if other:
        return f"the adapter trains tensors other than LoRA factors ({other[0]}, ...)"
    return None


def _lora_layers(model: torch.nn.Module):
    """The PEFT LoRA linear layers of ``model``, or a string saying why one of them is not a plain one."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return "peft's LoRA layer is not importable"
    layers = []
    for name, m in model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        if type(m) is not LoraLinear:
            return f"{name} is a {type(m).__name__} LoRA layer, not a linear one"
        if list(m.active_adapters) != ["default"] or m.disable_adapters or m.merged:
            return f"{name}: the LoRA layer is merged, disabled or has other active adapters"
        if getattr(m, "lora_variant", {}) or m.lora_A["default"].bias is not None:
            return f"{name}: a LoRA variant (DoRA, LoRA bias) is not batched"
        layers.append(m)
    if not layers:
        return "the model has no PEFT LoRA linear layers"
    return layers


def _factor(module, kind: str) -> torch.nn.Parameter:
    return (module.lora_A if kind == "A" else module.lora_B)["default"].weight


class _Pass:
    """The rows of one forward pass: client k owns rows ``segments[k] = (start, end)``, which the sequential path
    pads to ``lengths[k]`` tokens (here they are padded to the longest), and draws its dropout masks from
    ``rng_states[k]``. Whatever mixes positions or depends on the padded length runs on each client's own
    ``[b, L_k]`` slice, as the sequential path runs it: attention, LoRA dropout and the LoRA matmuls when the
    shapes differ."""

    def __init__(self, stacks: dict[int, torch.Tensor], rng_states: list, generator, k: int):
        self.stacks = stacks  # id(LoRA parameter) -> its stacked tensor [K, *shape]
        self.rng_states = rng_states
        self.generator = generator  # the device's default generator (the one LoRA dropout draws from)
        self.k = k
        self.segments: list[tuple[int, int]] = []
        self.lengths: list[int] = []
        self.masks: list = []  # each client's attention mask as the model builds it for that client's batch alone
        # the LoRA path as one torch.bmm over adapters when every client's slice has the same shape (a GPU saves K
        # launches); on CPU one matmul per adapter costs the same and rounds exactly as the sequential path does
        # (a bmm differs in the last bits, ~1e-7 relative a step)
        self.grouped_gemm = False

    def prepare(self, model, parts: list[dict], pad_id: int) -> dict:
        """Stack the clients' batches for one pass and build each client's own attention mask."""
        from transformers.masking_utils import create_causal_mask

        batch, self.segments, self.lengths = _concat(parts, pad_id)
        config = model.get_base_model().config
        dtype = model.get_input_embeddings().weight.dtype
        device = next(model.parameters()).device
        self.masks = []
        for part in parts:
            b, length = part["input_ids"].shape
            shape_only = torch.zeros((), dtype=dtype, device=device).expand(b, length, 1)
            self.masks.append(create_causal_mask(config=config, inputs_embeds=shape_only,
                                                 attention_mask=part["attention_mask"].to(device), cache=None,
                                                 position_ids=torch.arange(length, device=device).unsqueeze(0)))
        return batch

    @property
    def same_shapes(self) -> bool:
        return len({e - s for s, e in self.segments}) == 1 and len(set(self.lengths)) <= 1

    def _own(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Client k's ``[b, L_k, ...]`` slice of ``x``, contiguous as its own batch would be (no ``lengths``: every
        client's rows are as long as the pass, e.g. decoding steps of one generate call)."""
        s, e = self.segments[k]
        return x[s:e, : self.lengths[k] if self.lengths else x.shape[1]].contiguous()

    def _padded(self, y: torch.Tensor, width: int) -> torch.Tensor:
        """``y [b, L_k, ...]`` zero-padded to ``width`` positions (right padding never reaches a real token)."""
        if y.shape[1] == width:
            return y
        return F.pad(y, (0, 0) * (y.ndim - 2) + (0, width - y.shape[1]))

    def lora(self, module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """PEFT's LoRA linear forward, ``base(x) + B(A(dropout(x))) * scaling``, with adapter k on its rows."""
        result = module.base_layer(x, *args, **kwargs)
        a = self.stacks[id(_factor(module, "A"))]  # [K, r, in]
        b = self.stacks[id(_factor(module, "B"))]  # [K, out, r]
        x = x.to(a.dtype)
        dropout = module.lora_dropout["default"]
        scaling = module.scaling["default"]
        drops = not (isinstance(dropout, torch.nn.Identity) or not dropout.training or getattr(dropout, "p", 0) == 0)
        if self.grouped_gemm and self.same_shapes and not drops:  # one batched matmul over the K adapters
            xg = x.reshape(self.k, -1, x.shape[-1])
            y = torch.bmm(torch.bmm(xg, a.transpose(1, 2)), b.transpose(1, 2)).reshape(*x.shape[:-1], -1) * scaling
        else:  # a segmented GEMM: one matmul per adapter on its own rows
            parts = []
            for k in range(self.k):
                xk = self._own(x, k)
                if drops:  # the client's own RNG, op and shape: the mask the sequential path draws
                    self.generator.set_state(self.rng_states[k])
                    xk = dropout(xk)
                    self.rng_states[k] = self.generator.get_state()
                parts.append(self._padded(F.linear(F.linear(xk, a[k]), b[k]) * scaling, x.shape[1]))
            y = torch.cat(parts)
        return (result + y).to(result.dtype)

    def attention(self, original, module, query, key, value, attention_mask, **kwargs):
        """The model's attention function on each client's own ``[b, heads, L_k, d]`` slice with that client's own
        mask (the batch's mask, padded to the longest client, is not used): the softmax sees what it sees in the
        sequential path."""
        width = query.shape[2]
        outs = []
        for k in range(self.k):
            s, e = self.segments[k]
            length = self.lengths[k]
            q, kk, v = (t[s:e, :, :length].transpose(1, 2).contiguous().transpose(1, 2) for t in (query, key, value))
            out, _weights = original(module, q, kk, v, self.masks[k], **kwargs)
            outs.append(self._padded(out, width))  # [b, L_k, heads, d] -> [b, width, heads, d]
        return torch.cat(outs), None


@contextmanager
def adapter_rows(model, flat, vecs: list[torch.Tensor], rows_per_adapter: int):
    """Inference with K adapters at once: while the block runs, rows ``[k*n, (k+1)*n)`` of every batch the model
    sees (``n = rows_per_adapter``) go through adapter ``vecs[k]`` (flat LoRA vectors), the frozen base model
    through all of them together (the serving case of Punica's BGMV / S-LoRA). Rows must keep their positions,
    as in ``generate``, whose batch dimension never reorders."""
    layers = _lora_layers(model)
    if isinstance(layers, str):
        raise ValueError(layers)
    problem = lora_layout_problem(model, flat)
    if problem is not None:
        raise ValueError(problem)
    device = next(model.parameters()).device
    stacks = {}
    for p, spec in zip(flat.params, flat.specs):
        stacks[id(p)] = torch.stack([v[spec.offset: spec.offset + spec.numel].view(spec.shape) for v in vecs]).to(
            device, p.dtype)
    run = _Pass(stacks, [], _default_generator(device), len(vecs))
    run.segments = [(k * rows_per_adapter, (k + 1) * rows_per_adapter) for k in range(len(vecs))]
    run.grouped_gemm = device.type != "cpu"
    with _patched(model, layers, run, attention=False):
        yield


@contextmanager
def _patched(model, layers: list, run: _Pass, attention: bool = True):
    """Route every LoRA layer's forward and the model's attention function through ``run`` for the block.

    A LoRA layer gets an instance attribute ``forward`` (shadowing the class's; deleting it restores PEFT's);
    the attention function is overridden in transformers' attention registry under the name the model uses
    (a local override of that registry instance, removed afterwards)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = model.get_base_model().config._attn_implementation or "eager"
    had_local = impl in ALL_ATTENTION_FUNCTIONS._local_mapping
    previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get(impl)
    original = ALL_ATTENTION_FUNCTIONS.get(impl) if impl != "eager" or had_local else None

    def attention_fn(module, *args, **kwargs):
        fn = original
        if fn is None:  # eager: each model file has its own eager_attention_forward
            import sys

            fn = sys.modules[type(module).__module__].eager_attention_forward
        return run.attention(fn, module, *args, **kwargs)

    try:
        for m in layers:
            m.forward = (lambda mod: (lambda x, *a, **kw: run.lora(mod, x, *a, **kw)))(m)
        if attention:
            ALL_ATTENTION_FUNCTIONS[impl] = attention_fn
        yield
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
        if not attention:
            pass
        elif had_local:
            ALL_ATTENTION_FUNCTIONS[impl] = previous
        else:
            ALL_ATTENTION_FUNCTIONS._local_mapping.pop(impl, None)


def _default_generator(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class BatchedTrainer:
    """Trains the clients of a round as K adapters of one batched pass; each result equals
    :meth:`LocalTrainer.fit` on that client (module docstring). Call :func:`why_sequential` first."""

    def __init__(self, trainer: LocalTrainer, grouped_gemm: bool | None = None):
        self.trainer = trainer
        self.grouped_gemm = grouped_gemm  # None: on accelerators only (see _Pass.grouped_gemm)
        self.model = trainer.model
        self.flat = trainer.flat
        self.device = trainer.device
        self.pad_id = trainer.pad_id

    def fit_many(self, clients: list[ClientData], global_vec: torch.Tensor, rc: RoundConfig,
                 after_each=None, on_step=None) -> list[ClientResult]:
        """Train ``clients`` from ``global_vec`` together; ``after_each(k, result)`` runs for each client in
        order with the global RNG as the sequential path leaves it after that client (client_update hooks);
        ``on_step(client_id, step, loss)`` after each shared optimizer step, for each client (progress only)."""
        check_base_residual(self.model, rc)
        layers = _lora_layers(self.model)
        if isinstance(layers, str):
            raise ValueError(layers)
        with train_only(self.flat, rc.trainable) as trained:
            results, rng_after = self._train(clients, global_vec, rc, layers, on_step)
        generator = _default_generator(self.device)
        out = []
        for k, (client, result) in enumerate(zip(clients, results)):
            result.update[~trained] = 0.0  # a frozen factor's update is exactly zero (as LocalTrainer.fit)
            torch.manual_seed(derive_seed(rc.seed, rc.round, client.client_id))  # as the sequential path seeds
            generator.set_state(rng_after[k])
            out.append(after_each(k, result) if after_each is not None else result)
        return out

    def _train(self, clients: list[ClientData], global_vec: torch.Tensor, rc: RoundConfig, layers: list,
               on_step=None):
        t0 = time.perf_counter()
        k_clients = len(clients)
        self.flat.set(global_vec)
        seeds = [derive_seed(rc.seed, rc.round, c.client_id) for c in clients]
        generator = _default_generator(self.device)
        rng_states = []
        for seed in seeds:  # each client's RNG starts where torch.manual_seed(seed) puts it (LoRA dropout)
            torch.manual_seed(seed)
            rng_states.append(generator.get_state())
        streams = [_batch_stream(len(c.examples), rc.batch_size, torch.Generator().manual_seed(seed))
                   for c, seed in zip(clients, seeds)]
        # the stacked factors: row k is client k's copy of the LoRA tensor, all starting at the global adapter
        stacks, trainable = {}, []
        ordered = []
        for p in self.flat.params:
            s = p.detach().unsqueeze(0).repeat(k_clients, *([1] * p.ndim)).requires_grad_(p.requires_grad)
            stacks[id(p)] = s
            ordered.append(s)
            if p.requires_grad:  # train_only froze the factors not trained this round
                trainable.append(s)
        if rc.optimizer == "sgd":
            optimizer = torch.optim.SGD(trainable, lr=rc.lr, weight_decay=rc.weight_decay)
        else:
            optimizer = torch.optim.AdamW(trainable, lr=rc.lr, weight_decay=rc.weight_decay)
        global_params = None
        if rc.algorithm == "fedprox" and rc.prox_mu > 0:
            global_params = [s.detach().clone() for s in trainable]
        loss_function = getattr(self.model.get_base_model(), "loss_function", None)
        run = _Pass(stacks, rng_states, generator, k_clients)
        run.grouped_gemm = self.device.type != "cpu" if self.grouped_gemm is None else self.grouped_gemm
        self.model.train()
        losses: list[list[float]] = [[] for _ in clients]
        seen: list[set[int]] = [set() for _ in clients]
        tokens = [0] * k_clients  # tokens each client's rows hold (attention_mask), for tokens/s
        compute_s = 0.0
        with _patched(self.model, layers, run):
            for _step in range(rc.local_steps):
                tc = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                step_loss = [0.0] * k_clients
                for _micro in range(rc.grad_accum):
                    parts = []
                    for k, (client, stream) in enumerate(zip(clients, streams)):
                        idx = next(stream)
                        seen[k].update(idx)
                        parts.append(collate([client.examples[i] for i in idx], self.pad_id))
                        tokens[k] += int(parts[-1]["attention_mask"].sum())
                    batch = {k: v.to(self.device) for k, v in run.prepare(self.model, parts, self.pad_id).items()}
                    logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        use_cache=False).logits
                    total = 0.0
                    for k, ((s, e), length) in enumerate(zip(run.segments, run.lengths)):
                        loss = _causal_lm_loss(loss_function, logits[s:e, :length].contiguous(),
                                               batch["labels"][s:e, :length].contiguous())
                        total = total + loss / rc.grad_accum
                        step_loss[k] += loss.item() / rc.grad_accum
                    total.backward()
                if global_params is not None:  # FedProx: grad of mu/2 ||w - w_g||^2, per adapter elementwise
                    with torch.no_grad():
                        for s, g in zip(trainable, global_params):
                            s.grad.add_(s.detach() - g, alpha=rc.prox_mu)
                if rc.max_grad_norm:
                    clip_per_adapter(trainable, rc.max_grad_norm)
                optimizer.step()
                compute_s += time.perf_counter() - tc
                for k in range(k_clients):
                    losses[k].append(step_loss[k])
                    if on_step is not None:
                        on_step(clients[k].client_id, _step + 1, step_loss[k])
        # the model holds the last client's weights and gradients afterwards, as after the sequential path
        last = torch.cat([s[-1].detach().reshape(-1).float().cpu() for s in ordered])
        self.flat.set(last)
        for p in self.flat.params:
            s = stacks[id(p)]
            p.grad = s.grad[-1].clone() if (p.requires_grad and s.grad is not None) else None
        seconds = time.perf_counter() - t0
        results = []
        for k, client in enumerate(clients):
            local_vec = torch.cat([s[k].detach().reshape(-1).float().cpu() for s in ordered])
            update = local_vec - global_vec
            metrics = {"loss": sum(losses[k]) / len(losses[k]), "first_loss": losses[k][0],
                       "last_loss": losses[k][-1], "steps": rc.local_steps, "samples": client.num_samples,
                       "update_norm": float(update.norm()),
                       # one pass trained every client: each is charged an equal share of its time
                       "compute_seconds": compute_s / k_clients, "seconds": seconds / k_clients,
                       "tokens": tokens[k],
                       "tokens_per_s": tokens[k] * k_clients / compute_s if compute_s > 0 else None,
                       "seen_examples": sorted(seen[k]), "batched_with": k_clients}
            results.append(ClientResult(client.client_id, update, client.num_samples, metrics, {}))
        return results, list(run.rng_states)


def _concat(parts: list[dict], pad_id: int) -> tuple[dict, list[tuple[int, int]], list[int]]:
    """Stack the clients' right-padded batches along rows (padded again to the longest); their row segments
    and the length each was padded to on its own."""
    lengths = [p["input_ids"].shape[1] for p in parts]
    width = max(lengths)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch = {key: torch.cat([F.pad(p[key], (0, width - p[key].shape[1]), value=value) for p in parts])
             for key, value in fill.items()}
    segments, start = [], 0
    for p in parts:
        n = p["input_ids"].shape[0]
        segments.append((start, start + n))
        start += n
    return batch, segments, lengths


def _causal_lm_loss(loss_function, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's own causal-LM loss on one client's rows (what ``model(**batch).loss`` computes), else the
    mean next-token cross-entropy over labelled tokens."""
    if loss_function is not None:
        return loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])
    shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift.reshape(-1), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def clip_per_adapter(stacks: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for each adapter of stacked gradients ``[K, ...]``: adapter k's total
    norm is over its slices only, and its gradients are scaled by ``min(1, max_norm / (norm + 1e-6))``.
    Returns the K total norms."""
    grads = [s.grad for s in stacks if s.grad is not None]
    if not grads:
        return torch.zeros(0)
    k = grads[0].shape[0]
    # one norm per slice, as the sequential path takes one norm per tensor of one client
    total = torch.stack([torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g[i]) for g in grads]))
                         for i in range(k)])
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view(k, *([1] * (g.ndim - 1))).to(g.dtype))
    return total
