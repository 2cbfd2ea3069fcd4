"""Client updates shared across runs: a content-addressed cache of local trainings (issue 32, item 2).

A client's local update is a pure function of what goes into :meth:`fedsafe.fl.client.LocalTrainer.fit`: the
global adapter it starts from, its training rows in their order, its seeds (``fl.seed``, the round and the client
id, see :func:`~fedsafe.fl.client.derive_seed`), the round's local training settings and the base model. Runs of
a grid share much of that: round 1 starts every run of a seed from the same adapter, so the benign clients of
round 1 train the same update under every attack and every rule; a malicious client's honest update h is the
same for data poisoning and for every model-poisoning attack that only transforms h (scaling, ALIE, IPM,
Min-Max/Min-Sum: :mod:`fedsafe.attacks.adaptive` trains h through the plain trainer, then crafts), and so are the
attackers' and the probe's shadow trainings from the same adapter. Each such training is keyed by a sha256 over
everything that determines it (:func:`update_key`) and trained once; the others read the stored result.

The key covers (:func:`update_key`):

- the global adapter vector (dtype, shape, bytes);
- the client id (its seeds derive from it) and its training rows as token ids and labels, in order (so the
  tokenizer, chat template, system prompt and ``data.max_length`` are covered by what they produced);
- the round config fields the local loop reads: round, seed, lr (the round's value under ``fl.lr_schedule``),
  local_steps, batch_size, grad_accum, optimizer, weight_decay, max_grad_norm, algorithm and prox_mu, trainable;
- the model: :func:`fedsafe.evaluation.runner.model_fingerprint` of the base model, the LoRA config, the flat
  adapter layout, the pad id, the device type and parameter dtype, and the torch/transformers/peft versions;
- the training path (batched or sequential) on an accelerator, where the batched pass's grouped GEMM rounds
  differently; on CPU the two paths give the same bits (fedsafe.fl.batched; tests/test_reuse.py checks a grid
  with and without the cache end to end), so they share entries. On an accelerator a batched entry equals a
  retraining within the batched path's tolerance only: the other clients of a pass change its GEMM shapes.

Not cached (trained every time): a trainer other than the plain LocalTrainer (DP-SGD replaces it), loss terms
(constrained updates), SCAFFOLD (client state), step-level reports (the probe's level=step) and FedEx residuals
in the base weights. Training that a plug-in changes before calling the plain trainer (late start, mixing,
collusion) changes the rows, hence the key. Attacks with their own loop (probe evasion's ``normal_data`` slice)
never reach the cache.

A hit gives what training gave: the update, the metrics (plus ``update_cache: hit``), each local step's loss
(replayed to ``on_step``, progress only) and the global RNG state training left (so later hooks draw the same
noise). It does not put the client's local weights into the model as training does; the next training and every
evaluation set the adapter they use. Entries are ``<dir>/<key[:2]>/<key>.safetensors`` (update, RNG state) and
``.json`` (metrics, step losses, a readable summary of the key), each written atomically, the JSON last.

The cache answers only inside :meth:`UpdateCache.opened` (the round loop opens it for the round's training,
shadow trainings and aggregation), never for post-hoc fine-tuning or alignment, whose ``on_step`` may evaluate
the model at each step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from fedsafe.data.client_data import ClientData
from fedsafe.fl.client import ClientResult, LocalTrainer, RoundConfig, derive_seed

log = logging.getLogger("fedsafe")

KEY_VERSION = 1
#: the RoundConfig fields the local training loop reads (the others: server-side or excluded above)
ROUND_FIELDS = ("round", "seed", "lr", "local_steps", "batch_size", "grad_accum", "optimizer", "weight_decay",
                "max_grad_norm", "algorithm", "prox_mu", "trainable")


def why_not_cached(trainer, rc: RoundConfig) -> str | None:
    """Why this training is not cached (trained every time), or None when it is keyed by :func:`update_key`."""
    from fedsafe.fl.lora_aggregation import residual_round

    if type(trainer) is not LocalTrainer:
        return f"the trainer is {type(trainer).__name__}, not the plain LocalTrainer"
    if trainer.loss_terms:
        return "the trainer has loss terms"
    if rc.algorithm == "scaffold" or rc.scaffold_c is not None:
        return "SCAFFOLD (client state)"
    if rc.step_feature_mask is not None:
        return "step-level update reports"
    if rc.base_residual_round or residual_round(trainer.model):
        return "a FedEx residual in the base weights"
    return None


def _model_fields(trainer: LocalTrainer) -> dict:
    """The key fields of the trainer's model, computed once per trainer (the base weights do not change)."""
    fields = getattr(trainer, "_update_cache_model_fields", None)
    if fields is None:
        import peft
        import transformers

        from fedsafe.evaluation.runner import model_fingerprint

        peft_config = getattr(trainer.model, "peft_config", {}) or {}
        lora = {name: c.to_dict() for name, c in peft_config.items()}
        params = trainer.flat.params
        fields = {"model": model_fingerprint(trainer.model),
                  "lora": json.loads(json.dumps(lora, sort_keys=True, default=str)),
                  "layout": [[s.name, list(s.shape)] for s in trainer.flat.specs],
                  "pad_id": trainer.pad_id, "device": trainer.device.type,
                  "dtype": str(params[0].dtype) if params else None,
                  "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "peft": peft.__version__}}
        trainer._update_cache_model_fields = fields
    return fields


def _tensor_digest(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def update_key(trainer: LocalTrainer, client: ClientData, global_vec: torch.Tensor, rc: RoundConfig,
               path: str = "sequential") -> tuple[str, dict]:
    """sha256 (hex) over everything that determines ``client``'s local update (module docstring), and the
    readable fields that entered it. ``path``: the training path (batched | sequential), keyed off CPU only."""
    fields = {"version": KEY_VERSION, **_model_fields(trainer),
              "path": path if trainer.device.type != "cpu" else "any",
              "client_id": client.client_id, "examples": len(client.examples),
              "round_config": {f: getattr(rc, f) for f in ROUND_FIELDS}}
    h = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    _tensor_digest(h, global_vec)
    for ex in client.examples:
        _tensor_digest(h, ex.input_ids)
        _tensor_digest(h, ex.labels)
    return h.hexdigest(), fields


def default_generator(device: torch.device):
    """The generator LoRA dropout draws from on ``device`` (the global RNG training advances)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else
                                             torch.cuda.current_device()]
    return torch.default_generator


class UpdateCache:
    """Stored local updates under ``root`` (``<grid>/cache/updates``), with counts of what was reused."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.is_open = False
        self.hits = 0
        self.misses = 0
        self.not_cached = 0  # trainings the cache does not key (why_not_cached)
        self.seconds_saved = 0.0  # the recorded training seconds of the hits
        self.seconds_computed = 0.0  # the training seconds of the misses

    @contextmanager
    def opened(self):
        """Answer lookups inside the block only (the round loop's training and aggregation)."""
        was, self.is_open = self.is_open, True
        try:
            yield self
        finally:
            self.is_open = was

    def counts(self) -> dict:
        return {"reused": self.hits, "computed": self.misses, "not_cached": self.not_cached,
                "seconds_saved": self.seconds_saved, "seconds_computed": self.seconds_computed}

    def size_bytes(self) -> int:
        """Bytes the stored entries take (one update vector each: a grid's cache grows with its distinct trainings)."""
        return sum(p.stat().st_size for p in self.root.glob("*/*") if p.is_file()) if self.root.exists() else 0

    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.safetensors", d / f"{key}.json"

    def get(self, key: str, client_id: str) -> tuple[ClientResult, list[float], torch.Tensor] | None:
        """(result, step losses, RNG state after training) of a stored training, or None."""
        from safetensors.torch import load_file

        tensors_path, meta_path = self._paths(key)
        if not meta_path.exists() or not tensors_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tensors = load_file(str(tensors_path))
            update, rng = tensors["update"], tensors["rng_state"]
        except (OSError, json.JSONDecodeError, KeyError, RuntimeError) as exc:  # safetensors raises its own too
            log.warning("update cache: ignoring the unreadable entry %s (%s)", meta_path, exc)
            return None
        if meta.get("key") != key:
            return None
        metrics = {**meta["metrics"], "update_cache": "hit"}
        self.hits += 1
        self.seconds_saved += float(meta["metrics"].get("seconds") or 0.0)
        return ClientResult(client_id, update, int(meta["num_samples"]), metrics, {}), meta["step_losses"], rng

    def put(self, key: str, fields: dict, result: ClientResult, step_losses: list[float],
            rng_state: torch.Tensor) -> None:
        """Store one training's result (atomically: tensors first, the JSON that marks the entry complete last)."""
        from safetensors.torch import save

        from fedsafe.io import atomic_write_bytes, atomic_write_text

        self.misses += 1
        self.seconds_computed += float(result.metrics.get("seconds") or 0.0)
        if result.extra:  # nothing the cache keys returns extras today; never store half a result
            return
        tensors_path, meta_path = self._paths(key)
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(tensors_path, save({"update": result.update.detach().to("cpu").contiguous(),
                                               "rng_state": rng_state.detach().to("cpu").contiguous()}))
        meta = {"key": key, "fields": fields, "num_samples": result.num_samples,
                "metrics": {k: v for k, v in result.metrics.items() if k != "update_cache"},
                "step_losses": step_losses, "written": time.time()}
        atomic_write_text(meta_path, json.dumps(meta))

    # --- the two places that train -------------------------------------------------------------------------
    def fit(self, trainer: LocalTrainer, client: ClientData, global_vec: torch.Tensor, rc: RoundConfig,
            client_state, on_step, train) -> ClientResult:
        """:meth:`LocalTrainer.fit` through the cache: ``train(client, global_vec, rc, client_state, on_step)``
        on a miss (its result stored), the stored result on a hit."""
        if not self.is_open or why_not_cached(trainer, rc) is not None:
            if self.is_open:
                self.not_cached += 1
            return train(client, global_vec, rc, client_state, on_step)
        key, fields = update_key(trainer, client, global_vec, rc, "sequential")
        found = self.get(key, client.client_id)
        if found is not None:
            result, losses, rng = found
            restore_rng(trainer.device, derive_seed(rc.seed, rc.round, client.client_id), rng)
            for step, loss in enumerate(losses, start=1):
                if on_step is not None:
                    on_step(step, loss)
            return result
        losses: list[float] = []

        def record(step: int, loss: float) -> None:
            losses.append(loss)
            if on_step is not None:
                on_step(step, loss)

        result = train(client, global_vec, rc, client_state, record)
        self.put(key, fields, result, losses, default_generator(trainer.device).get_state())
        result.metrics["update_cache"] = "miss"
        return result


def restore_rng(device: torch.device, seed: int, state: torch.Tensor) -> None:
    """The global RNG as the client's training left it: seeded as training seeds, then its generator's state."""
    torch.manual_seed(seed)
    default_generator(device).set_state(state.to(torch.uint8))
