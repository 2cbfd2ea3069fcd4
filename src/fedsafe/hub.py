"""Adapters that travel: a portable base-model id, a model card filled with the run's facts, and a push to the
Hugging Face Hub.

A fedsafe adapter is written by PEFT's ``save_pretrained`` (:meth:`fedsafe.rundir.RunDir.save_adapter`), so it has
PEFT's ``adapter_config.json``, ``adapter_model.safetensors`` and a ``README.md`` model card. Its
``base_model_name_or_path`` is the hub id of the base model (``HuggingFaceTB/SmolLM2-135M-Instruct`` for the
embedded model) rather than this machine's cache path, so a copied or pushed adapter loads anywhere with
``AutoPeftModelForCausalLM.from_pretrained``; the local path is kept in the card's ``fedsafe`` metadata. A base
that exists only here (``model.align``'s aligned copy, a local directory, the random ``tiny`` test model) keeps
its local path, and the card says so.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml

CARD_FILE = "README.md"
SOURCE_FILE = "fedsafe_source.json"  # written beside a converted base model (fedsafe.models): names its hub id


def portable_base_id(local: str | None) -> str | None:
    """The hub id of a base model loaded from ``local`` (a cache directory fedsafe converted it into), else
    ``local`` itself: the value ``base_model_name_or_path`` should carry so the adapter loads elsewhere."""
    if not local:
        return local
    source = Path(local).expanduser() / SOURCE_FILE
    if source.is_file():
        try:
            hub_id = json.loads(source.read_text(encoding="utf-8")).get("hub_id")
        except (OSError, ValueError):
            hub_id = None
        if hub_id:
            return str(hub_id)
    return local


def adapter_base(adapter_dir: Path) -> str | None:
    """The model name fedsafe loads an adapter's base with: the card's ``fedsafe.model_name`` (``embedded``:
    fedsafe's shipped copy, no hub needed), else ``base_model_name_or_path``."""
    meta = card_metadata(adapter_dir).get("fedsafe") or {}
    if isinstance(meta, dict) and meta.get("model_name") and not meta.get("aligned"):
        return str(meta["model_name"])
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")


def card_metadata(adapter_dir: Path) -> dict:
    """The YAML front matter of an adapter's README.md ({} when there is none)."""
    path = Path(adapter_dir) / CARD_FILE
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return {}
    try:
        data = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return data if isinstance(data, dict) else {}


def _run_facts(run_dir: Path | None) -> tuple[dict, str, list[dict], list[dict]]:
    """(config dict, config.yaml text, round records, results.csv rows) of the run an adapter belongs to."""
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return {}, "", [], []
    text = (run_dir / "config.yaml").read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        config = {}
    rounds = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("type") == "round":
                rounds.append(rec)
    results = []
    if (run_dir / "results.csv").is_file():
        with open(run_dir / "results.csv", encoding="utf-8", newline="") as f:
            results = list(csv.DictReader(f))
    return config if isinstance(config, dict) else {}, text, rounds, results


def model_card(tag: str, base_id: str | None, local_base: str | None, run_dir: Path | None,
               peft_facts: dict[str, Any] | None = None) -> str:
    """README.md of an adapter: metadata (base_model, library, tags, fedsafe's own record), the run's facts
    (base model, clients and roles, rounds, scenario, aggregator, LoRA, seed), the metrics the run has so far,
    how to load it and the full config."""
    config, config_text, rounds, results = _run_facts(run_dir)
    model = config.get("model") or {}
    model_name = model.get("name")
    aligned = bool(model.get("align"))
    portable = bool(base_id) and base_id != local_base and not aligned
    fedsafe_meta = {"model_name": model_name, "base_model_local_path": local_base, "adapter": str(tag),
                    "aligned": aligned, "run": run_dir.name if run_dir else None}
    meta: dict[str, Any] = {"library_name": "peft", "pipeline_tag": "text-generation",
                            "tags": ["fedsafe", "lora", "federated-learning", "peft"],
                            "fedsafe": fedsafe_meta}
    if portable:
        meta["base_model"] = base_id
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {config.get('name', 'fedsafe')}: LoRA adapter `{tag}`", "",
             "A LoRA adapter trained by [fedsafe](https://pypi.org/project/fedsafe/) (federated LoRA fine-tuning "
             "with safety attacks and defenses). It changes the base model below; it is not a model on its own.", ""]
    if aligned:
        base_line = (f"a safety-aligned copy of `{model_name}` that fedsafe built once on this machine "
                     f"(`model.align`); local path `{local_base}`. Elsewhere, rebuild it with fedsafe from the "
                     "config below before loading this adapter")
    elif portable:
        base_line = f"[{base_id}](https://huggingface.co/{base_id})"
        if model_name == "embedded":
            base_line += " (fedsafe's shipped copy: the Q4_1 GGUF dequantised to fp32)"
    else:
        base_line = f"`{local_base or model_name}` (a local model: copy it with the adapter)"
    rows = [("base model", base_line)]
    roles = config.get("roles") or []
    if roles:
        rows.append(("clients", ", ".join(f"{r.get('name')} x{r.get('clients')}" for r in roles)))
    fl = config.get("fl") or {}
    done = max((r.get("round", 0) for r in rounds), default=0)
    if fl:
        rows.append(("rounds", f"{done} of {fl.get('rounds')} done when this adapter was written"
                               f" ({fl.get('clients_per_round')} clients per round)"))
    if config:
        attacked = any(r.get("malicious") if r.get("malicious") is not None
                       else str(r.get("name", "")).lower().startswith("malicious") for r in roles)
        rows.append(("scenario", str(config.get("scenario") or ("attack" if attacked else "no_attack"))))
        rows.append(("aggregator", str((config.get("aggregator") or {}).get("name"))))
        lora = config.get("lora") or {}
        rows.append(("LoRA", f"r={lora.get('r')}, alpha={lora.get('alpha')}, target {lora.get('target_modules')}"))
        rows.append(("seed", str(config.get("seed"))))
    for key, value in (peft_facts or {}).items():
        rows.append((key, str(value)))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    metric_lines = []
    losses = [(r.get("round"), r.get("mean_loss")) for r in rounds if r.get("mean_loss") is not None]
    if losses:
        metric_lines.append("Mean client training loss per round: "
                            + ", ".join(f"{rnd}: {loss:.4g}" for rnd, loss in losses[-10:] if isinstance(loss, float)))
    if results:
        cols = [c for c in ("scenario", "defense", "rule", "over_refusal", "borderline_refusal", "n_prompts")
                if c in results[0]]
        metric_lines += ["", "From the run's results.csv (Rule: share of harmful prompts refused, %; "
                             "over_refusal: share of everyday prompts refused, %):", "",
                         "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        metric_lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in results]
    lines += ["## Metrics", "", *(metric_lines or ["None yet when this adapter was written "
                                                    "(`fedsafe report RUN_DIR` has the evaluation)."]), ""]
    load_from = base_id if portable else (local_base or model_name)
    lines += ["## Load it", "", "```python", "from peft import AutoPeftModelForCausalLM", "",
              "model = AutoPeftModelForCausalLM.from_pretrained(\"path/to/this/adapter\")  "
              f"# base: {load_from}", "```", "",
              "or `fedsafe eval --adapter path/to/this/adapter` / `fedsafe gate path/to/this/adapter --policy ...`.",
              ""]
    if config_text:
        lines += ["## Configuration", "", "<details><summary>config.yaml of the run</summary>", "", "```yaml",
                  config_text.rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def set_card_base_model(adapter_dir: Path, base_id: str | None) -> None:
    """Put ``base_id`` back as the card's ``base_model`` (PEFT writes the loaded model's local path there)."""
    path = Path(adapter_dir) / CARD_FILE
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return
    _, front, body = text.split("---", 2)
    meta = yaml.safe_load(front) or {}
    if base_id:
        meta["base_model"] = base_id
    else:
        meta.pop("base_model", None)
    path.write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---" + body, encoding="utf-8")


def refresh_card(adapter_dir: Path) -> None:
    """Rewrite an adapter's card with the run's facts as they are now (metrics written after it was saved)."""
    from fedsafe.io import atomic_write_text

    adapter_dir = Path(adapter_dir)
    meta = card_metadata(adapter_dir).get("fedsafe") or {}
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    base_id = config.get("base_model_name_or_path")
    run_dir = adapter_dir.parent.parent if (adapter_dir.parent.parent / "config.yaml").is_file() else None
    text = model_card(meta.get("adapter") or adapter_dir.name, base_id,
                      meta.get("base_model_local_path") or base_id, run_dir)
    peft_tail = _peft_tail(adapter_dir)
    atomic_write_text(adapter_dir / CARD_FILE, text + peft_tail)


def _peft_tail(adapter_dir: Path) -> str:
    """The framework-versions block PEFT appended to the card (kept when fedsafe rewrites it)."""
    path = Path(adapter_dir) / CARD_FILE
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8")
    at = text.find("### Framework versions")
    return "\n" + text[at:] if at >= 0 else ""


def push_adapter(adapter_dir: Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload an adapter directory (card refreshed first) to the Hub repository ``repo_id``; returns its URL."""
    from huggingface_hub import HfApi

    from fedsafe.errors import ConfigError

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "adapters" / "final").is_dir():  # a run directory: its final (or post-hoc) adapter
        adapter_dir = adapter_dir / "adapters" / ("posthoc" if (adapter_dir / "adapters" / "posthoc").is_dir()
                                                  else "final")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter_dir}: not an adapter directory (no adapter_config.json) nor a run directory")
    if (card_metadata(adapter_dir).get("fedsafe") or {}).get("aligned"):
        raise ConfigError(f"{adapter_dir}: its base is a model.align copy that exists only on this machine; "
                          "an adapter pushed without it cannot be loaded")
    refresh_card(adapter_dir)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(adapter_dir), repo_id=repo_id,
                             commit_message="Upload LoRA adapter trained with fedsafe")
    return str(getattr(info, "repo_url", None) or f"https://huggingface.co/{repo_id}")
