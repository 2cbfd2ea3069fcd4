"""The model a run uses: its ``model`` section's base model, aligned when ``model.align`` is set, and a finished
run's adapter on that base.

This sits above ``data/``: building the aligned copy (:mod:`fedsafe.alignment`) reads data sources, and a
``generate:`` source loads its generator model through :mod:`fedsafe.models`, the align-free loader below
``data/``. So the pipeline, the Flower nodes, the gate and the CLIs load through here; data generation, judges and
anything that names a model directly load through :func:`fedsafe.models.load_base_model`.
"""

from __future__ import annotations

from pathlib import Path

from fedsafe import alignment, models
from fedsafe.errors import ConfigError


def load_model(mc, seed: int = 0) -> models.LoadedModel:
    """The base model a :class:`~fedsafe.config.ModelConfig` describes: ``model.align``'s aligned copy (built
    once and cached by :mod:`fedsafe.alignment`) when it is set, else ``model.name`` itself."""
    if mc.align is None:
        return models.load_base_model(mc.name, mc.device, mc.dtype, mc.quantization, seed=seed)
    aligned = models.load_base_model(str(alignment.aligned_model_dir(mc.name, mc.align)), mc.device, mc.dtype,
                                     mc.quantization)
    aligned.name = mc.name
    return aligned


def load_adapter(path: str | Path, device: str = "cpu", dtype: str = "auto"):
    """A run's (or one adapter directory's) PEFT model with the adapter and, for FedEx-LoRA, its residual applied.

    ``path`` is a run directory (its ``adapters/final``) or an adapter directory. The base model is the run's
    ``model`` section (from the run's config.yaml, seeded with its seed, e.g. for ``tiny``, and aligned when it set
    ``model.align``), else the adapter's ``base_model_name_or_path``. A run with ``fl.lora_aggregation=fedex``
    keeps part of its global model in a dense residual on the base weights
    (``adapters/fedex_residual.safetensors``, fedsafe.fl.lora_aggregation): ``PeftModel.from_pretrained`` alone
    misses it, this loader adds it. The residual belongs to the latest global adapter (``final``, and
    ``posthoc``, trained on top of it); an earlier round's adapter is refused.
    """
    from peft import PeftModel
    from safetensors import safe_open

    from fedsafe.fl.lora_aggregation import RESIDUAL_FILE, apply_residual

    path = Path(path).expanduser()
    adapter = path / "adapters" / "final" if (path / "adapters" / "final").is_dir() else path
    if not (adapter / "adapter_config.json").exists():
        raise ConfigError(f"{path}: neither an adapter directory (adapter_config.json) nor a run directory with "
                          "adapters/final")
    run_config = adapter.parent.parent / "config.yaml"
    if run_config.exists():
        from fedsafe.config import load_config

        cfg = load_config(run_config)
        # the caller's device and dtype, full precision (no k-bit loading): the adapter is read, not trained
        mc = cfg.model.model_copy(update={"device": device, "dtype": dtype, "quantization": None})
        loaded = load_model(mc, seed=cfg.seed)
    else:
        from fedsafe.hub import adapter_base

        loaded = models.load_base_model(adapter_base(adapter) or models.EMBEDDED_NAME, device, dtype)
    model = PeftModel.from_pretrained(loaded.model, str(adapter))
    residual_path = adapter / RESIDUAL_FILE
    if not residual_path.exists():
        residual_path = adapter.parent / RESIDUAL_FILE
    if residual_path.exists():
        with safe_open(str(residual_path), framework="pt") as f:
            meta = f.metadata() or {}
            residual = {k: f.get_tensor(k) for k in f.keys()}
        rnd = int(meta.get("round", 0))
        if adapter.name.startswith("round_") and adapter.name != f"round_{rnd:04d}":
            raise ConfigError(f"{adapter}: this FedEx-LoRA run saved the residual of round {rnd} only; an earlier "
                              "round's adapter without its residual is not its global model")
        apply_residual(model, residual, rnd)
    model.eval()
    return model
