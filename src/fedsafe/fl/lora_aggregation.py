"""Exact LoRA aggregation: which factors clients train each round, the aggregation error, FedEx's residual.

Averaging LoRA's factors separately (``fl.lora_aggregation=factors``, as OpenFedLLM, FedLLM-Attack, FlowerTune
and FedShield do) gives the server ``avg(B) avg(A)``, which is not ``avg(B A)``: the global model is not the
(weighted) mean of the client models. Three fixes, chosen with ``fl.lora_aggregation``:

- ``ffa``: FFA-LoRA (Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning",
  ICLR 2024). A stays frozen at its shared random init (the seeded LoRA init every party builds), only B is
  trained and sent. With A_i = A for all i, ``avg(B_i) A = avg(B_i A)``: exact, half the payload, and linear
  in B, so it composes with secure aggregation, DP and every rule.
- ``rolora``: RoLoRA (Chen, Guo, Ju, Dalal, Zhu, Khisti, "Robust Federated Finetuning of LLMs via
  Alternating Optimization of LoRA", NeurIPS 2025). A and B are trained in alternate rounds and the trained
  one is aggregated; the frozen one is shared, so each round is exact as in FFA-LoRA, and both factors learn.
  Here each alternating step is one communication round: odd rounds (1, 3, ...) train B, even rounds A (with
  PEFT's init B = 0 the gradient of A is B^T G = 0, so a first A round would be wasted).
- ``fedex``: FedEx-LoRA (Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and
  Efficient Fine-Tuning of Foundation Models", arXiv:2410.09432, 2024; ACL 2025 as "... of Large Language
  Models"). Both factors are trained and aggregated as usual, and the server folds a residual into a dense
  delta on the frozen base weight of every adapted layer, accumulated over rounds, so that the global model
  *is* the aggregate of the client models. The paper defines it for FedAvg: residual
  = s (avg(B_i A_i) - avg(B) avg(A)), s = lora_alpha / r.
  It needs each client's plaintext factors, so it is refused under secure aggregation and client-level DP
  (the residual would bypass the noise), and with server optimisers other than plain averaging at
  server_lr 1 (a server step would not be the aggregate of the client models).

FedEx under a robust rule. The residual must follow exactly what the rule produced, never the raw client
models (which would let a client the rule discarded or clipped back in through the residual). With
dW_i = s (B_i A_i - B_0 A_0) the change client i's factors make to its model (B_0 A_0: the global factors
the round started from) and W_prev the global model at the start of the round, the target is

- rules whose output is a weighted mean of what they received, Delta = sum_i w_i u_i (fedavg, krum,
  multikrum, dnc, foolsgold, the probe's exclusion/reweighting, and any of these behind ``norm_clip``, whose
  u_i are the *clipped* updates): W = W_prev + sum_i w_i dW_i with the rule's own w_i over the factors it
  actually averaged (B_i = B_0 + delta B_i of the clipped u_i). Checked at run time: Delta must equal
  sum_i w_i u_i, else the round fails loudly;
- coordinate-wise rules (median, trimmed_mean) and bulyan (its Krum selection, then the coordinate-wise
  mean of the beta values nearest the median): the same rule applied coordinate by coordinate to the
  client models, W = W_prev + rule_i(dW_i) (bulyan: over the clients its selection kept). These rules are
  translation-equivariant and positively homogeneous per coordinate, so this is the rule's aggregate of
  the client models, and it keeps their robustness (one client far off on some coordinates of B or A is
  far off on rows/columns of dW_i, which the per-coordinate rule ignores). The product of factors cannot
  be recovered from a coordinate-wise rule over the factors; this costs an [n, out, in] block per layer.
  Checked at run time: the rule re-run on the factor updates it received must give Delta;
- refused at config load (``fl.lora_aggregation=fedex`` with ``aggregator.name`` geometric_median or
  residual, alone, behind ``norm_clip`` or behind the probe): geometric_median's output is a weighted mean
  with weights a_i / ||u_i - z|| that shrink like 1 / (scale of u_i), while the product term
  delta B_i delta A_i grows like its square, so a mean of client models under those weights is not
  bounded in the attacker's scale (it is not the geometric median of the client models either, whose
  Weiszfeld iterations would need every client's dense model); residual-based reweighting's client weights
  sum confidence over all coordinates and it replaces single values, which has no client-model analogue.
  ``weak_dp`` with noise is refused too (its clipping alone is followed like ``norm_clip``'s). Any other
  rule or wrapper is accepted only if its output passes one of the run-time checks above (a wrapper that
  adds noise to the aggregate does not, and the round fails with an error naming the rule).

Every plaintext round logs ``aggregation_error = sum over adapted layers of ||avg(B_i A_i) - B_g A_g||_F /
||avg(B_i A_i)||_F``, avg under the rule's normalised client weights over the clients it kept: the distance
to the rule's weighted mean of the client models, so a server optimiser (FedAdam, server_lr != 1), DP noise
or clipping shows up in it too, by design. For ``fedex``, ``aggregation_error_factors`` is that error against
the rule's target, ``||T - B_g A_g||_F / ||T||_F`` with T = B_0 A_0 + (the aggregate above) / s, what the new
global factors alone miss, and ``aggregation_error`` reads back what the model holds once the residual is
folded in: per layer ``||(W' + s B_g A_g) - (W + s T)||_F / ||s T||_F``, W / W' the model's base weight
before / after this round's residual and s read from the model's LoRA module, summed over layers. It is
computed in float64 on the model's own stored values, so it shows the rounding of the stored base weights
(bfloat16 ones included) and a residual that is missing, of the wrong sign or of the wrong scale (the
server's round statistics name the target in ``fedex_target``: weighted_mean, median, trimmed_mean or
bulyan). Under secure aggregation the server never sees a client's factors, so the error is not observable
(logged as null); ffa and rolora are exact there by linearity.

The residual lives in the base weights of the one in-memory model (:func:`apply_residual`), so every later
use of that model (next round's local training, evaluation, post-hoc defense) sees the FedEx global model
whatever LoRA vector is swapped in. Adapters stay PEFT-loadable; the residual is saved next to them as
``adapters/fedex_residual.safetensors`` and :func:`fedsafe.run_model.load_adapter` applies it
(``PeftModel.from_pretrained`` alone misses it).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsafe.errors import FedsafeError

MODES = ("factors", "ffa", "rolora", "fedex")
RESIDUAL_FILE = "fedex_residual.safetensors"
BYTES_PER_VALUE = 4  # updates travel as float32


def trainable_factors(mode: str, round_no: int) -> str:
    """Which LoRA factors clients train in 1-based round ``round_no``: ``"AB"``, ``"B"`` or ``"A"``."""
    if mode not in MODES:
        raise FedsafeError(f"fl.lora_aggregation={mode!r} is not one of {', '.join(MODES)}")
    if mode == "ffa":
        return "B"
    if mode == "rolora":
        return "B" if round_no % 2 == 1 else "A"
    return "AB"


def trainable_mask(flat, trainable: str) -> torch.Tensor:
    """Boolean mask over the flat vector of the factors in ``trainable`` (other tensors always train)."""
    import torch

    m = torch.zeros(flat.numel, dtype=torch.bool)
    for s in flat.specs:
        if s.kind == "other" or s.kind in trainable:
            m[s.offset: s.offset + s.numel] = True
    return m


@dataclass(frozen=True)
class _Pair:
    module: str  # PEFT module path, e.g. base_model.model.model.layers.0.self_attn.q_proj
    a: object  # ParamSpec of lora_A [r, in]
    b: object  # ParamSpec of lora_B [out, r]


def lora_pairs(flat) -> list[_Pair]:
    """(module, A spec, B spec) for every adapted layer of a :class:`~fedsafe.fl.params.FlatLoRA`."""
    a_of, b_of = {}, {}
    for s in flat.specs:
        if s.kind == "A":
            a_of[s.name.split(".lora_A.")[0]] = s
        elif s.kind == "B":
            b_of[s.name.split(".lora_B.")[0]] = s
    if set(a_of) != set(b_of):
        raise FedsafeError(f"LoRA layout: modules without both factors: {sorted(set(a_of) ^ set(b_of))}")
    return [_Pair(m, a_of[m], b_of[m]) for m in a_of]


def _factors(vecs: torch.Tensor, pairs: list[_Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked factors of same-shaped layers: ``vecs [n, d] -> B [L, n, out, r], A [L, n, r, in]``."""
    import torch

    b = torch.stack([vecs[:, p.b.offset: p.b.offset + p.b.numel].reshape(-1, *p.b.shape) for p in pairs])
    a = torch.stack([vecs[:, p.a.offset: p.a.offset + p.a.numel].reshape(-1, *p.a.shape) for p in pairs])
    return b, a


def _groups(pairs: list[_Pair]) -> list[list[_Pair]]:
    """Layers grouped by (B shape, A shape) so each group is one batched matmul."""
    out: dict[tuple, list[_Pair]] = {}
    for p in pairs:
        out.setdefault((p.b.shape, p.a.shape), []).append(p)
    return list(out.values())


def products(pairs: list[_Pair], client_vecs: torch.Tensor, weights: torch.Tensor, global_vec: torch.Tensor,
             chunk_values: int = 2 ** 24):
    """Per layer: ``avg(B_i A_i)`` under ``weights`` (normalised) and ``B_g A_g``; yields (pairs, avg, glob).

    ``avg = [w_1 B_1 | ... | w_n B_n] [A_1; ...; A_n]``: one batched matmul per group of same-shaped layers
    (in chunks of at most ``chunk_values`` dense values, to bound memory on large models).
    """
    import torch

    w = weights.float() / weights.float().sum()
    n = client_vecs.shape[0]
    for group in _groups(pairs):
        out_dim, r = group[0].b.shape
        in_dim = group[0].a.shape[1]
        step = max(1, chunk_values // (out_dim * in_dim))
        for i in range(0, len(group), step):
            part = group[i: i + step]
            b, a = _factors(client_vecs.float(), part)  # [L, n, out, r], [L, n, r, in]
            b_cat = (b * w.view(1, n, 1, 1)).permute(0, 2, 1, 3).reshape(len(part), out_dim, n * r)
            avg = torch.bmm(b_cat, a.reshape(len(part), n * r, in_dim))
            bg, ag = _factors(global_vec.float()[None, :], part)
            yield part, avg, torch.bmm(bg[:, 0], ag[:, 0])


def relative_errors(avg: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """``||avg - approx||_F / ||avg||_F`` per layer ``[L]`` (0 where both are zero)."""
    import torch

    num = (avg - approx).flatten(1).norm(dim=1)
    den = avg.flatten(1).norm(dim=1)
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), torch.where(num > 0, 1.0, 0.0))


def base_weight_name(module: str) -> str:
    """The dense residual's key: the adapted layer's weight as in the merged model (no ``base_layer``)."""
    return module + ".weight"


def _module(model, path: str):
    return model.get_submodule(path)


def _add_to_base(model, key: str, delta: torch.Tensor) -> None:
    """Add ``delta`` to the base weight ``key`` of ``model`` in place (the one place a residual enters a model)."""
    module = _module(model, key[: -len(".weight")])
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if getattr(module, "fan_in_fan_out", False):
        raise FedsafeError(f"fl.lora_aggregation=fedex: layer {key} stores its weight transposed "
                           "(fan_in_fan_out), which the residual does not support")
    base.weight.add_(delta.to(base.weight.device, base.weight.dtype))


def apply_residual(model, residual: dict[str, torch.Tensor], version: int) -> None:
    """Make the base weights of ``model`` equal to its original weights plus ``residual`` (idempotent).

    The model remembers what it already holds (``_fedsafe_residual``), so only the difference is added; the
    in-process trainer, the pipeline and a resumed run all call this with the server's accumulated residual.
    """
    import torch

    held: dict = getattr(model, "_fedsafe_residual", {})
    with torch.no_grad():
        for key, value in residual.items():
            _add_to_base(model, key, value if key not in held else value - held[key])
    model._fedsafe_residual = dict(residual)  # no copy: the server replaces its tensors, never edits them in place
    model._fedsafe_residual_round = version


def residual_round(model) -> int:
    """The round whose FedEx residual the model's base weights hold (0: none)."""
    return int(getattr(model, "_fedsafe_residual_round", 0))


#: rules ``fl.lora_aggregation=fedex`` refuses at config load, and why (see the module docstring)
FEDEX_REFUSED = {
    "geometric_median": "the geometric median is a mean under weights a_i / ||u_i - z|| that shrink like "
                        "1 / (an update's scale) while the product term delta B_i delta A_i grows like its square, "
                        "so the same mean of the client models is unbounded in an attacker's scale (and it is not "
                        "the geometric median of the client models)",
    "residual": "residual-based reweighting replaces single values and weighs clients by a confidence summed over "
                "all coordinates of the factors, which has no counterpart over the client models",
}


def rule_chain(name: str, params: dict | None) -> list[str]:
    """The rules a configured aggregator runs, outermost first (``probe+norm_clip`` -> probe, norm_clip, fedavg)."""
    params = dict(params or {})
    chain = []
    while True:
        if "+" in name:
            outer, name = name.split("+", 1)
            chain.append(outer)
            params.pop(outer, None)
            continue
        chain.append(name)
        if name == "norm_clip":
            name, params = str(params.get("aggregator", "fedavg")), dict(params.get("params") or {})
            continue
        if name == "probe":  # a bare probe aggregates with FedAvg
            chain.append("fedavg")
        return chain


@dataclass
class RuleTarget:
    """What the rule did, in terms FedEx can apply to the client models (see the module docstring).

    ``rows`` index the updates given to the rule; ``updates`` are those rows as the inner rule combined them
    (clipped by ``norm_clip``). ``weights`` (a weighted-mean rule) or ``combine`` (a coordinate-wise rule,
    ``[m, c] -> [c]``) says how.
    """

    rows: torch.Tensor
    updates: torch.Tensor
    weights: torch.Tensor | None = None
    combine: object = None
    kind: str = "weighted_mean"


def _close(a: torch.Tensor, b: torch.Tensor, scale: float) -> bool:
    import torch

    return bool(torch.allclose(a.float().cpu(), b.float().cpu(), rtol=1e-4, atol=1e-6 * max(1.0, scale)))


def _bulyan_stage(beta: int):
    """Bulyan's coordinate-wise stage: the mean of the ``beta`` values nearest each column's median."""
    import torch

    from fedsafe.aggregators.base import median_of_sorted, sort_columns

    def combine(block: torch.Tensor) -> torch.Tensor:
        theta = block.shape[0]
        vals = sort_columns(block.contiguous())
        med = median_of_sorted(vals)
        windows = theta - beta + 1
        reach = torch.maximum(med - vals[:windows], vals[beta - 1:beta - 1 + windows] - med)
        start = torch.argmin(reach, dim=0)
        slots = torch.arange(theta, device=block.device)[:, None]
        return (vals * ((slots >= start) & (slots < start + beta))).sum(dim=0) / beta

    return combine


def rule_target(rule, updates: torch.Tensor, num_samples: torch.Tensor, client_ids: list[str],
                client_weights: torch.Tensor, info: dict, output: torch.Tensor) -> RuleTarget:
    """Reconstruct what ``rule`` did with ``updates`` so that FedEx applies the same to the client models.

    Wrappers are walked through their ``inner`` rule (norm_clip clips each row, the probe keeps the rows it
    passed on); the reconstruction must reproduce the rule's ``output`` over the factors, else FedsafeError.
    """
    import torch

    from fedsafe.aggregators.norm_clip import NormClip
    from fedsafe.fl.update_ops import clip_rows

    u = updates.float().cpu()
    scale = float(u.abs().max()) if u.numel() else 1.0
    out = output.float().cpu()
    layers, r = [], rule
    while r is not None and len(layers) < 16:  # wrappers (adaptive attack, recorder, probe, norm_clip)
        layers.append(r)
        if isinstance(r, NormClip) or type(r).__name__ == "WeakDPRule":  # the inner rule combines clipped rows
            u = clip_rows(u, r.max_norm)[0]
        r = r.__dict__.get("inner")  # the wrapper's own inner rule (not one its __getattr__ delegates to)
    w = torch.as_tensor(client_weights, dtype=torch.float32).cpu().reshape(-1)
    if w.shape == (u.shape[0],) and _close(out, w @ u, scale):
        rows = torch.nonzero(w != 0).flatten()
        return RuleTarget(rows, u[rows], weights=w[rows])
    # not a weighted mean of what it received: a coordinate-wise rule run on the rows a filter passed on
    rows = torch.arange(u.shape[0])
    ids, level_info = list(client_ids), dict(info or {})
    for r in layers:
        if getattr(r, "is_filter", False) and "probe" in level_info and r.__dict__.get("inner") is not None:
            probe = level_info["probe"]
            flagged = set(probe.get("flagged") or [])
            keep = [j for j, c in enumerate(ids) if probe["weight"].get(c, 0.0) > 0
                    and not (probe.get("combination") == "excluded_flagged" and c in flagged)]
            rows, ids = rows[keep], [ids[j] for j in keep]
            level_info = dict(level_info.get("inner") or {})
    inner = layers[-1]
    name = getattr(inner, "name", type(inner).__name__)
    if name in ("median", "trimmed_mean"):
        ns, sub_ids = num_samples.float().cpu()[rows], ids

        def combine(block):
            return inner.aggregate(block.float(), ns, sub_ids).update.float()
        kind = name
    elif name == "bulyan" and "selected" in level_info:
        rows = rows[torch.as_tensor(sorted(level_info["selected"]), dtype=torch.long)]
        combine, kind = _bulyan_stage(int(level_info["beta"])), name
    else:
        raise FedsafeError(f"fl.lora_aggregation=fedex: the output of aggregator {name!r} is not a weighted mean of "
                           "the updates it received, nor a coordinate-wise rule FedEx can apply to the client "
                           "models (median, trimmed_mean, bulyan); its residual would not follow the rule. Use "
                           "fl.lora_aggregation=ffa or rolora with this rule")
    if not _close(out, combine(u[rows]), scale):
        raise FedsafeError(f"fl.lora_aggregation=fedex: re-running {name} on the {len(rows)} updates it received "
                           "does not reproduce its aggregate, so the residual cannot follow it")
    return RuleTarget(rows, u[rows], combine=combine, kind=kind)


def target_products(pairs: list[_Pair], global_before: torch.Tensor, target: RuleTarget, global_after: torch.Tensor,
                    chunk_values: int = 2 ** 24):
    """Per layer: T = B_0 A_0 + (the rule's aggregate of B_i A_i - B_0 A_0) and B_g A_g; yields (pairs, T, glob).

    Weighted mean: ``T = B_0 A_0 + sum_i w_i (B_i A_i - B_0 A_0)`` in one batched matmul per group. Coordinate-
    wise: the rule run on the clients' ``[n, rows * in]`` products, blocks of output rows of at most about
    ``chunk_values`` dense values (the rule is per coordinate, so blocks give the same result).
    """
    import torch

    g0 = global_before.float()[None, :]
    clients = g0 + target.updates.float()
    n = clients.shape[0]
    for group in _groups(pairs):
        out_dim, r = group[0].b.shape
        in_dim = group[0].a.shape[1]
        per_layer = out_dim * in_dim * (1 if target.weights is not None else n + 1)
        step = max(1, chunk_values // per_layer)
        for i in range(0, len(group), step):
            part = group[i: i + step]
            L = len(part)
            b0, a0 = _factors(g0, part)
            base = torch.bmm(b0[:, 0], a0[:, 0])  # B_0 A_0 [L, out, in]
            b, a = _factors(clients, part)  # [L, n, out, r], [L, n, r, in]
            if target.weights is not None:
                w = target.weights.float()
                b_cat = (b * w.view(1, n, 1, 1)).permute(0, 2, 1, 3).reshape(L, out_dim, n * r)
                t = torch.bmm(b_cat, a.reshape(L, n * r, in_dim)) + (1 - float(w.sum())) * base
            else:  # the rule over the [n, rows x in] client products, a block of output rows at a time
                t = torch.empty_like(base)
                rows = max(1, chunk_values // (L * (n + 1) * in_dim))
                for r0 in range(0, out_dim, rows):
                    rb = b[:, :, r0: r0 + rows]
                    prods = torch.bmm(rb.reshape(L * n, rb.shape[2], r), a.reshape(L * n, r, in_dim))
                    dw = prods.reshape(L, n, rb.shape[2], in_dim) - base[:, None, r0: r0 + rows]
                    agg = target.combine(dw.permute(1, 0, 2, 3).reshape(n, -1))
                    t[:, r0: r0 + rows] = base[:, r0: r0 + rows] + agg.reshape(L, rb.shape[2], in_dim)
            bg, ag = _factors(global_after.float()[None, :], part)
            yield part, t, torch.bmm(bg[:, 0], ag[:, 0])


def _live_scaling(module) -> float:
    scaling = getattr(module, "scaling", {})
    return float(scaling.get("default", 1.0)) if isinstance(scaling, dict) else float(scaling)


def check_config(cfg) -> None:
    """Refuse ``fl.lora_aggregation`` combinations that cannot work, at config load (``ValueError``, both fields)."""
    mode = cfg.fl.lora_aggregation
    # a plug-in that cannot work with a mode refuses it in its own check (secure aggregation, DP, the probe)
    if mode == "fedex":
        if cfg.fl.algorithm not in ("fedavg", "fedprox", "scaffold") or cfg.fl.resolved_server_lr != 1.0:
            raise ValueError(f"fl.lora_aggregation=fedex needs plain averaging (fl.algorithm fedavg, fedprox or "
                             f"scaffold with fl.server_lr=1), got fl.algorithm={cfg.fl.algorithm!r} with server_lr="
                             f"{cfg.fl.resolved_server_lr:g}: the residual makes the global model the weighted mean "
                             "of the client models, which a server optimiser step would not be")
        for rule in rule_chain(cfg.aggregator.name, cfg.aggregator.params):
            if rule in FEDEX_REFUSED:
                inner = "" if rule == cfg.aggregator.name else f" (its rule {rule})"
                raise ValueError(f"fl.lora_aggregation=fedex cannot be combined with aggregator.name="
                                 f"{cfg.aggregator.name!r}{inner}: {FEDEX_REFUSED[rule]}; FedEx's residual must "
                                 "follow the rule's own aggregate of the client models. Use fl.lora_aggregation="
                                 "ffa or rolora (linear, exact under every rule) or another aggregator.name")


class LoRAAggregation:
    """Server side of ``fl.lora_aggregation``: masks, the aggregation error, FedEx's residual, payload bytes."""

    def __init__(self, mode: str, flat, model=None):
        self.mode = mode
        self.flat = flat
        self.model = model
        self.pairs = lora_pairs(flat)
        self.scaling = self._scaling(model) if model is not None else {}
        self.residual: dict[str, torch.Tensor] = {}  # accumulated dense residual per adapted base weight
        self.residual_round = 0
        if mode == "fedex" and model is None:
            raise FedsafeError("fl.lora_aggregation=fedex needs the server's model to hold the residual")

    def _scaling(self, model) -> dict[str, float]:
        out = {}
        for p in self.pairs:
            module = model.get_submodule(p.module)
            scaling = getattr(module, "scaling", {})
            out[p.module] = float(scaling.get("default", 1.0)) if isinstance(scaling, dict) else float(scaling)
        return out

    def trainable(self, round_no: int) -> str:
        return trainable_factors(self.mode, round_no)

    def mask(self, round_no: int) -> torch.Tensor:
        return trainable_mask(self.flat, self.trainable(round_no))

    def payload_bytes(self, round_no: int) -> int:
        """Plaintext bytes a client sends: the trained factors as float32 (a frozen factor's zeros omitted)."""
        return int(self.mask(round_no).sum()) * BYTES_PER_VALUE

    def after_round(self, round_no: int, global_before: torch.Tensor, updates: torch.Tensor,
                    weights: torch.Tensor, global_after: torch.Tensor, rule=None, rule_output=None,
                    num_samples=None, client_ids=None, info=None) -> dict:
        """Aggregation error of the round (and, for fedex, the residual folded into the model).

        ``rule``, ``rule_output``, ``num_samples``, ``client_ids`` and ``info`` describe the aggregation (fedex
        needs them to follow the rule, see the module docstring); without them the rule is taken to be the
        weighted mean under ``weights``.
        """
        import torch

        if updates.shape[0] == 0 or float(weights.sum()) <= 0:
            return {"aggregation_error": None}
        if self.mode != "fedex":
            keep = weights > 0
            errors_factors = [relative_errors(avg, glob) for _, avg, glob in
                              products(self.pairs, global_before[None, :] + updates[keep], weights[keep],
                                       global_after)]
            err = float(torch.cat(errors_factors).sum())
            return {"aggregation_error_factors": err, "aggregation_error": err}
        n = updates.shape[0]
        if rule is None:
            w = weights.float().cpu()
            target = RuleTarget(torch.arange(n), updates.float().cpu(), weights=w / w.sum())
        else:
            target = rule_target(rule, updates, num_samples if num_samples is not None else torch.ones(n),
                                 client_ids if client_ids is not None else [str(i) for i in range(n)],
                                 weights, info or {}, rule_output if rule_output is not None
                                 else global_after - global_before)
        errors_factors, errors = [], []
        held: dict = getattr(self.model, "_fedsafe_residual", {})
        with torch.no_grad():
            for part, t, glob in target_products(self.pairs, global_before, target, global_after):
                errors_factors.append(relative_errors(t, glob))
                for p, t_l, g_l in zip(part, t, glob):
                    key = base_weight_name(p.module)
                    new = self.residual.get(key, 0) + self.scaling[p.module] * (t_l - g_l)
                    errors.append(self._fold(p.module, key, new - held[key] if key in held else new, t_l, g_l))
                    self.residual[key] = new
        self.residual_round = round_no
        self.model._fedsafe_residual = dict(self.residual)
        self.model._fedsafe_residual_round = round_no
        return {"aggregation_error_factors": float(torch.cat(errors_factors).sum()),
                "aggregation_error": float(sum(errors)), "fedex_target": target.kind}

    def _fold(self, module_path: str, key: str, delta: torch.Tensor, t: torch.Tensor, g: torch.Tensor) -> float:
        """Add ``delta`` to the model's base weight and read it back: ||(W' + s B_g A_g) - (W + s T)|| / ||s T||."""
        import torch

        module = _module(self.model, module_path)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        before = base.weight.detach().to("cpu", torch.float64, copy=True)
        _add_to_base(self.model, key, delta)
        after = base.weight.detach().to("cpu", torch.float64)
        s = _live_scaling(module)  # as the model's forward pass applies it
        want = s * t.double()
        num = float((after - before + s * g.double() - want).norm())
        den = float(want.norm())
        return num / den if den > 0 else float(num > 0)

    def attach(self) -> None:
        """Put the (restored) residual into the model's base weights, e.g. after a resume."""
        if self.mode == "fedex" and self.model is not None:
            apply_residual(self.model, self.residual, self.residual_round)

    def save_residual(self, path) -> None:
        """Write the accumulated residual (safetensors, dense, float32) with its round in the metadata."""
        from pathlib import Path

        from safetensors.torch import save as save_bytes

        from fedsafe.io import atomic_write_bytes

        data = save_bytes({k: v.contiguous() for k, v in self.residual.items()},
                          metadata={"round": str(self.residual_round), "format": "fedex_residual"})
        atomic_write_bytes(Path(path), data)

    def state_dict(self) -> dict:
        return {"mode": self.mode, "residual": {k: v.clone() for k, v in self.residual.items()},
                "residual_round": self.residual_round}

    def load_state_dict(self, state: dict) -> None:
        self.residual = {k: v.clone() for k, v in (state.get("residual") or {}).items()}
        self.residual_round = int(state.get("residual_round", 0))
