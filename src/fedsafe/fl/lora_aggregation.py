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
  Efficient Fine-Tuning of Foundation Models", ACL 2025). Both factors are trained and averaged as usual,
  and the server folds the residual ``s (avg(B_i A_i) - B_g A_g)`` (s = lora_alpha / r, B_g A_g the new
  global factors; under FedAvg ``B_g A_g = avg(B) avg(A)``, the paper's term) into a dense delta on the
  frozen base weight of every adapted layer, accumulated over rounds. It needs each client's plaintext
  factors, so it is refused under secure aggregation and client-level DP (the residual would bypass the
  noise), and with server optimisers other than plain averaging at server_lr 1 (the residual makes the
  global model the rule's weighted mean of the client models, which a server step would not be).

Every plaintext round logs ``aggregation_error = sum over adapted layers of
||avg(B_i A_i) - B_g A_g||_F / ||avg(B_i A_i)||_F``, avg under the rule's normalised client weights (for
``fedex`` B_g A_g includes the residual; ``aggregation_error_factors`` is the error before it). It measures
the distance to the rule's weighted mean of the client models, so a server optimiser (FedAdam, server_lr != 1),
DP noise or clipping shows up in it too, by design. Under secure
aggregation the server never sees a client's factors, so the error is not observable (logged as null);
ffa and rolora are exact there by linearity.

The residual lives in the base weights of the one in-memory model (:func:`apply_residual`), so every later
use of that model (next round's local training, evaluation, post-hoc defense) sees the FedEx global model
whatever LoRA vector is swapped in. Adapters stay PEFT-loadable; the residual is saved next to them as
``adapters/fedex_residual.safetensors`` and :func:`fedsafe.models.load_adapter` applies it
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


def apply_residual(model, residual: dict[str, torch.Tensor], version: int) -> None:
    """Make the base weights of ``model`` equal to its original weights plus ``residual`` (idempotent).

    The model remembers what it already holds (``_fedsafe_residual``), so only the difference is added; the
    in-process trainer, the pipeline and a resumed run all call this with the server's accumulated residual.
    """
    import torch

    held: dict = getattr(model, "_fedsafe_residual", {})
    with torch.no_grad():
        for key, value in residual.items():
            module = _module(model, key[: -len(".weight")])
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            if getattr(module, "fan_in_fan_out", False):
                raise FedsafeError(f"fl.lora_aggregation=fedex: layer {key} stores its weight transposed "
                                   "(fan_in_fan_out), which the residual does not support")
            delta = value if key not in held else value - held[key]
            base.weight.add_(delta.to(base.weight.device, base.weight.dtype))
    model._fedsafe_residual = dict(residual)  # no copy: the server replaces its tensors, never edits them in place
    model._fedsafe_residual_round = version


def residual_round(model) -> int:
    """The round whose FedEx residual the model's base weights hold (0: none)."""
    return int(getattr(model, "_fedsafe_residual_round", 0))


def check_config(cfg) -> None:
    """Refuse ``fl.lora_aggregation`` combinations that cannot work, at config load (``ValueError``, both fields)."""
    mode = cfg.fl.lora_aggregation
    if mode == "fedex":
        if cfg.secure_agg.enabled:
            raise ValueError("fl.lora_aggregation=fedex cannot be combined with secure_agg.enabled: FedEx-LoRA's "
                             "residual avg(B_i A_i) - avg(B) avg(A) needs every client's plaintext factors, which "
                             "secure aggregation hides (ffa and rolora are linear and work with it)")
        if cfg.dp.client_level:
            raise ValueError("fl.lora_aggregation=fedex cannot be combined with dp.client_level=true: the residual "
                             "is computed from the clients' unclipped, un-noised factors, which the client-level "
                             "epsilon does not cover (use ffa or rolora)")
        if cfg.fl.algorithm not in ("fedavg", "fedprox", "scaffold") or cfg.fl.resolved_server_lr != 1.0:
            raise ValueError(f"fl.lora_aggregation=fedex needs plain averaging (fl.algorithm fedavg, fedprox or "
                             f"scaffold with fl.server_lr=1), got fl.algorithm={cfg.fl.algorithm!r} with server_lr="
                             f"{cfg.fl.resolved_server_lr:g}: the residual makes the global model the weighted mean "
                             "of the client models, which a server optimiser step would not be")
    if cfg.aggregator.name.startswith("probe"):
        kind = cfg.probe.features.kind
        if mode == "ffa" and kind == "A":
            raise ValueError("probe.features.kind=A reads LoRA A, which fl.lora_aggregation=ffa never trains (its "
                             "update is always zero): use probe.features.kind=B")
        if mode == "rolora" and kind != "both":
            raise ValueError(f"probe.features.kind={kind} reads one LoRA factor, which fl.lora_aggregation=rolora "
                             "freezes every other round (its update is then zero and the probe sees nothing): use "
                             "probe.features.kind=both")


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
                    weights: torch.Tensor, global_after: torch.Tensor) -> dict:
        """Aggregation error of the round (and, for fedex, the residual folded into the model)."""
        import torch

        if updates.shape[0] == 0 or float(weights.sum()) <= 0:
            return {"aggregation_error": None}
        keep = weights > 0
        clients = global_before[None, :] + updates[keep]
        w = weights[keep]
        errors, errors_factors = [], []
        new_residual = {}
        for part, avg, glob in products(self.pairs, clients, w, global_after):
            errors_factors.append(relative_errors(avg, glob))
            if self.mode == "fedex":
                for p, a, g in zip(part, avg, glob):
                    key = base_weight_name(p.module)
                    new_residual[key] = self.residual.get(key, 0) + self.scaling[p.module] * (a - g)
                # the global model now is B_g A_g + (avg - B_g A_g) = avg, up to float rounding
                errors.append(relative_errors(avg, glob + (avg - glob)))
        out = {"aggregation_error_factors": float(torch.cat(errors_factors).sum())}
        if self.mode == "fedex":
            self.residual.update(new_residual)
            self.residual_round = round_no
            apply_residual(self.model, self.residual, round_no)
            out["aggregation_error"] = float(torch.cat(errors).sum())
        else:
            out["aggregation_error"] = out["aggregation_error_factors"]
        return out

    def attach(self) -> None:
        """Put the (restored) residual into the model's base weights, e.g. after a resume."""
        if self.mode == "fedex" and self.model is not None:
            apply_residual(self.model, self.residual, self.residual_round)

    def save_residual(self, path) -> None:
        """Write the accumulated residual (safetensors, dense, float32) with its round in the metadata."""
        from pathlib import Path

        from safetensors.torch import save as save_bytes

        from fedsafe.rundir import atomic_write_bytes

        data = save_bytes({k: v.contiguous() for k, v in self.residual.items()},
                          metadata={"round": str(self.residual_round), "format": "fedex_residual"})
        atomic_write_bytes(Path(path), data)

    def state_dict(self) -> dict:
        return {"mode": self.mode, "residual": {k: v.clone() for k, v in self.residual.items()},
                "residual_round": self.residual_round}

    def load_state_dict(self, state: dict) -> None:
        self.residual = {k: v.clone() for k, v in (state.get("residual") or {}).items()}
        self.residual_round = int(state.get("residual_round", 0))
