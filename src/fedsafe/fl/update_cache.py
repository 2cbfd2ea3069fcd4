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

Size: the cache keeps at most ``limit_bytes`` (default :data:`DEFAULT_LIMIT_BYTES`, 4 GiB; the environment
variable ``FEDSAFE_UPDATE_CACHE_LIMIT`` or a grid's ``update_cache_limit`` / ``--update-cache-limit`` change it,
``none`` lifts it) and evicts the least recently used entries beyond it: a hit touches its JSON's mtime, which is
an entry's last use. An entry read or written inside :meth:`UpdateCache.in_use` (a grid holds it for each training
run; :meth:`~UpdateCache.opened` enters it for a round) is never evicted before the block ends, so the run in
progress may take the cache past its limit until it finishes. Eviction removes the JSON first, so an entry half
removed by a crash is a miss (and is evicted or rewritten later); a stored entry that cannot be read is removed
and trained again. While a block is open the process holds a shared ``flock`` on ``<dir>/.lock``;
:meth:`UpdateCache.clear` (``fedsafe cache clear --updates``) takes it exclusively and refuses a cache in use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from fedsafe.data.client_data import ClientData
from fedsafe.errors import ConfigError, FedsafeError
from fedsafe.fl.client import ClientResult, LocalTrainer, RoundConfig, derive_seed

log = logging.getLogger("fedsafe")

KEY_VERSION = 1
#: the RoundConfig fields the local training loop reads (the others: server-side or excluded above)
ROUND_FIELDS = ("round", "seed", "lr", "local_steps", "batch_size", "grad_accum", "optimizer", "weight_decay",
                "max_grad_norm", "algorithm", "prox_mu", "trainable")

#: the size limit of an update cache when neither a grid nor the environment sets one (about 200 entries of
#: SmolLM2-135M's default LoRA adapter, ~20 MiB each)
DEFAULT_LIMIT_BYTES = 4 * 2**30
#: the environment variable that sets the limit (a size such as 4GiB, 500MB, 10G, or none)
LIMIT_ENV = "FEDSAFE_UPDATE_CACHE_LIMIT"
#: temp files of atomic writes older than this are left by a killed process and are removed
STALE_TEMP_S = 3600
_ENTRY_FILE = re.compile(r"^([0-9a-f]{64})\.(json|safetensors)$")
_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}
_NO_LIMIT = ("none", "unlimited", "off")


class CacheInUse(FedsafeError):
    """An update cache is held by a running grid or run, so it cannot be cleared now."""


def parse_size(text: str | int | None, what: str = "size") -> int | None:
    """Bytes of ``text``: ``4GiB``, ``500MB``, ``10G`` (K/M/G/T alone are binary, as ``du -h`` prints them) or a
    plain number of bytes; None for ``none``/``unlimited``/``off`` (no limit). ``what`` names the setting in errors."""
    if text is None or isinstance(text, int):
        if isinstance(text, int) and text < 0:
            raise ConfigError(f"{what}={text}: a size cannot be negative")
        return text
    raw = str(text).strip().lower().replace(" ", "")
    if raw in _NO_LIMIT:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", raw)
    if match is None or match.group(2) not in _UNITS:
        raise ConfigError(f"{what}={text!r}: give a size such as 4GiB, 500MB, 10G or a number of bytes, "
                          f"or none for no limit")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_size(size_bytes: int | None) -> str:
    """``1.5 GiB``-style text of a byte count (``no limit`` for None)."""
    if size_bytes is None:
        return "no limit"
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size_bytes >= factor:
            return f"{size_bytes / factor:.1f} {unit}"
    return f"{size_bytes} B"


def resolve_limit(setting: str | int | None = None) -> int | None:
    """The update cache's size limit: ``setting`` (a grid's ``update_cache_limit``) when given, else
    ``$FEDSAFE_UPDATE_CACHE_LIMIT``, else :data:`DEFAULT_LIMIT_BYTES`; None means no limit."""
    if setting is not None:
        return parse_size(setting, "update_cache_limit")
    env = os.environ.get(LIMIT_ENV)
    if env is not None and env.strip():
        return parse_size(env, LIMIT_ENV)
    return DEFAULT_LIMIT_BYTES


_last_use_ns = 0


def _use_time_ns() -> int:
    """A strictly increasing timestamp (ns) for an entry's last use, so LRU order holds within a clock tick."""
    global _last_use_ns
    _last_use_ns = max(time.time_ns(), _last_use_ns + 1)
    return _last_use_ns


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
    """Stored local updates under ``root`` (``<grid>/cache/updates``), with counts of what was reused and evicted.

    ``limit_bytes``: the most the entries may take (least recently used evicted first; None: no limit); by
    default :func:`resolve_limit` (``$FEDSAFE_UPDATE_CACHE_LIMIT``, else 4 GiB)."""

    def __init__(self, root: str | Path, limit_bytes: int | None | str = "default"):
        self.root = Path(root)
        self.limit_bytes = resolve_limit() if limit_bytes == "default" else parse_size(limit_bytes, "limit_bytes")
        self.is_open = False
        self.hits = 0
        self.misses = 0
        self.not_cached = 0  # trainings the cache does not key (why_not_cached)
        self.seconds_saved = 0.0  # the recorded training seconds of the hits
        self.seconds_computed = 0.0  # the training seconds of the misses
        self.evicted = 0  # entries removed to stay under the limit
        self.evicted_bytes = 0
        self._index: dict[str, list[int]] | None = None  # key -> [size_bytes, last use ns], scanned lazily
        self._use_depth = 0
        self._in_use: set[str] = set()  # keys read or written since the outermost in_use block began
        self._evicted_before = (0, 0)  # (entries, bytes) evicted when the outermost in_use block began
        self._lock_file = None

    @contextmanager
    def in_use(self):
        """Keep every entry read or written inside the block from eviction until the outermost block ends (a grid
        holds one per training run), and hold the directory's shared lock so that ``clear`` leaves it alone."""
        if self._use_depth == 0:
            self._index = None  # another process (a clear, a resumed grid) may have changed the directory
            self._lock(shared=True)
            self._evicted_before = (self.evicted, self.evicted_bytes)
        self._use_depth += 1
        try:
            yield self
        finally:
            self._use_depth -= 1
            if self._use_depth == 0:
                self._in_use.clear()
                try:
                    self._evict()
                finally:
                    self._unlock()
                n, size = self.evicted - self._evicted_before[0], self.evicted_bytes - self._evicted_before[1]
                if n:
                    log.info("update cache: evicted %d least recently used entries (%s) to stay under its %s "
                             "limit; %s holds %s", n, format_size(size), format_size(self.limit_bytes), self.root,
                             format_size(self._total()))

    @contextmanager
    def opened(self):
        """Answer lookups inside the block only (the round loop's training and aggregation); its entries are in use."""
        was, self.is_open = self.is_open, True
        try:
            with self.in_use():
                yield self
        finally:
            self.is_open = was

    def counts(self) -> dict:
        return {"reused": self.hits, "computed": self.misses, "not_cached": self.not_cached,
                "seconds_saved": self.seconds_saved, "seconds_computed": self.seconds_computed,
                "evicted": self.evicted, "evicted_bytes": self.evicted_bytes}

    def size_bytes(self) -> int:
        """Bytes the stored entries take (one update vector each: a grid's cache grows with its distinct trainings)."""
        self._index = None
        return self._total()

    def info(self) -> dict:
        """What the cache holds: path, entries, size_bytes, limit_bytes, the oldest and newest last use (unix s)."""
        entries = self._entries(refresh=True)
        uses = [used for _size, used in entries.values()]
        return {"path": str(self.root), "entries": len(entries), "size_bytes": self._total(),
                "limit_bytes": self.limit_bytes, "oldest_use": min(uses) / 1e9 if uses else None,
                "newest_use": max(uses) / 1e9 if uses else None}

    def clear(self, keep_bytes: int = 0) -> tuple[int, int]:
        """Remove the least recently used entries until at most ``keep_bytes`` are left (0: every entry, every
        partial write); returns (entries, bytes) removed. Raises :class:`CacheInUse` while a run holds the cache."""
        if not self.root.is_dir():
            return 0, 0
        self._lock(shared=False)
        try:
            self._index = None
            before = (self.evicted, self.evicted_bytes)
            self._evict(keep_bytes)
            if keep_bytes == 0:  # nobody writes now (the lock): partial writes and emptied folders go too
                for sub in self._subdirs():
                    for leftover in sub.iterdir():
                        if leftover.name.startswith("."):
                            leftover.unlink(missing_ok=True)
                    try:
                        sub.rmdir()
                    except OSError:  # a file that is not ours: leave the folder
                        pass
            return self.evicted - before[0], self.evicted_bytes - before[1]
        finally:
            self._unlock()

    # --- the entries on disk -----------------------------------------------------------------------------------
    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.safetensors", d / f"{key}.json"

    def _subdirs(self) -> list[Path]:
        try:
            return [d for d in self.root.iterdir() if d.is_dir() and len(d.name) == 2]
        except FileNotFoundError:
            return []

    def _entries(self, refresh: bool = False) -> dict[str, list[int]]:
        """key -> [size_bytes, last use ns] of every entry file on disk (a half-removed entry counts until evicted)."""
        if self._index is not None and not refresh:
            return self._index
        index: dict[str, list[int]] = {}
        now = time.time()
        for sub in self._subdirs():
            for path in sub.iterdir():
                try:
                    st = path.stat()
                except FileNotFoundError:  # removed meanwhile
                    continue
                if path.name.startswith("."):  # an atomic write's temp file; stale ones were left by a kill
                    if now - st.st_mtime > STALE_TEMP_S:
                        path.unlink(missing_ok=True)
                    continue
                match = _ENTRY_FILE.match(path.name)
                if match is None:
                    continue
                entry = index.setdefault(match.group(1), [0, 0])
                entry[0] += st.st_size
                entry[1] = max(entry[1], st.st_mtime_ns)  # the JSON is written last and touched on each hit
        self._index = index
        return index

    def _total(self) -> int:
        return sum(size for size, _used in self._entries().values())

    def _note_use(self, key: str, touch: bool) -> None:
        """Record a read or write of ``key``: its last use is now (the JSON's mtime), and it is in use."""
        if self._use_depth:
            self._in_use.add(key)
        used = _use_time_ns()
        if touch:
            try:
                os.utime(self._paths(key)[1], ns=(used, used))
            except OSError:  # removed meanwhile (a clear between two runs): the entry is gone, nothing to touch
                return
        if self._index is not None:
            tensors_path, meta_path = self._paths(key)
            try:
                size = tensors_path.stat().st_size + meta_path.stat().st_size
            except OSError:
                return
            self._index[key] = [size, used]

    def _remove(self, key: str) -> int:
        """Delete one entry, the JSON (what marks it complete) first; returns the bytes freed."""
        freed = 0
        for path in reversed(self._paths(key)):
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
        if self._index is not None:
            self._index.pop(key, None)
        return freed

    def _evict(self, limit: int | None = None) -> None:
        """Remove least recently used entries, never one in use, until the entries take at most ``limit`` bytes
        (default: ``limit_bytes``)."""
        limit = self.limit_bytes if limit is None else limit
        if limit is None:
            return
        entries = self._entries()
        total = sum(size for size, _used in entries.values())
        if total <= limit:
            return
        for key, (size, _used) in sorted(entries.items(), key=lambda kv: (kv[1][1], kv[0])):
            if total <= limit:
                break
            if key in self._in_use:
                continue
            freed = self._remove(key)
            total -= size  # the indexed size: an entry another process removed meanwhile frees it too
            if freed:
                self.evicted += 1
                self.evicted_bytes += freed

    def _lock(self, shared: bool) -> None:
        """The directory's lock: shared while a run uses the cache, exclusive (and refused, not awaited) to clear."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX: no cross-process protection
            return
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / ".lock", "a+b")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise CacheInUse(f"{self.root} is in use by a running grid or run; clear it after that finishes") from None
        except BaseException:
            handle.close()
            raise
        self._lock_file = handle

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file releases the flock
            self._lock_file = None

    # --- one training's result ---------------------------------------------------------------------------------
    def get(self, key: str, client_id: str) -> tuple[ClientResult, list[float], torch.Tensor] | None:
        """(result, step losses, RNG state after training) of a stored training, or None. An entry that cannot
        be read (cut short, damaged, another key's) is removed, so the training runs again and rewrites it."""
        from safetensors.torch import load_file

        tensors_path, meta_path = self._paths(key)
        if not meta_path.exists() or not tensors_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("key") != key:
                raise ValueError(f"it holds the key {meta.get('key')}")
            tensors = load_file(str(tensors_path))
            update, rng = tensors["update"], tensors["rng_state"]
            stored_metrics, num_samples, losses = dict(meta["metrics"]), int(meta["num_samples"]), meta["step_losses"]
            seconds = float(stored_metrics.get("seconds") or 0.0)
        except FileNotFoundError:  # evicted by another process between the check and the read
            return None
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError; any failure is a miss
            log.warning("update cache: ignoring and removing the unreadable entry %s (%s); it is trained again",
                        meta_path, exc)
            self._remove(key)
            return None
        metrics = {**stored_metrics, "update_cache": "hit"}
        self.hits += 1
        self.seconds_saved += seconds
        self._note_use(key, touch=True)
        return ClientResult(client_id, update, num_samples, metrics, {}), losses, rng

    def put(self, key: str, fields: dict, result: ClientResult, step_losses: list[float],
            rng_state: torch.Tensor) -> None:
        """Store one training's result (atomically: tensors first, the JSON that marks the entry complete last),
        then evict least recently used entries beyond the limit."""
        from safetensors.torch import save

        from fedsafe.io import atomic_write_bytes, atomic_write_text

        self.misses += 1
        self.seconds_computed += float(result.metrics.get("seconds") or 0.0)
        if result.extra:  # nothing the cache keys returns extras today; never store half a result
            return
        if self._use_depth:
            self._in_use.add(key)  # before writing: an eviction never takes an entry being written
        tensors_path, meta_path = self._paths(key)
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(tensors_path, save({"update": result.update.detach().to("cpu").contiguous(),
                                               "rng_state": rng_state.detach().to("cpu").contiguous()}))
        meta = {"key": key, "fields": fields, "num_samples": result.num_samples,
                "metrics": {k: v for k, v in result.metrics.items() if k != "update_cache"},
                "step_losses": step_losses, "written": time.time()}
        atomic_write_text(meta_path, json.dumps(meta))
        self._entries()
        self._note_use(key, touch=True)
        self._evict()

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
