"""Adapters that travel (issue 34 item 5): the hub id as base_model_name_or_path, PEFT's save_pretrained with a
model card holding the run's facts, files readable per umask, loading with plain PEFT, and a push (no network)."""

import json
import os
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedsafe.fl.params import FlatLoRA
from fedsafe.models import attach_lora, byte_tokenizer, tiny_llama
from fedsafe.rundir import RunDir

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def saved(tmp_path, test_seed):
    """A tiny model loaded from a 'converted cache' directory that names its hub id, one saved adapter."""
    base_dir = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    base_dir.mkdir(parents=True)
    (base_dir / "fedsafe_source.json").write_text(json.dumps({"hub_id": HUB_ID}))
    model = tiny_llama(byte_tokenizer(), seed=test_seed)
    model.name_or_path = str(base_dir)  # what transformers sets when loading from that directory
    peft_model = attach_lora(model, r=4, alpha=8, seed=test_seed)
    flat = FlatLoRA(peft_model)
    run = RunDir.create(tmp_path / "runs", "exp")
    run.path.joinpath("config.yaml").write_text(yaml.safe_dump({
        "name": "exp", "seed": 3, "model": {"name": "embedded"}, "lora": {"r": 4, "alpha": 8},
        "roles": [{"name": "benign", "clients": 2}, {"name": "malicious", "clients": 1}],
        "fl": {"rounds": 2, "clients_per_round": 3}, "aggregator": {"name": "krum"}}))
    run.log({"type": "round", "round": 1, "mean_loss": 2.5})
    old_mask = os.umask(0o022)
    try:
        vec = flat.get() + 0.01 * torch.randn(flat.numel, generator=torch.Generator().manual_seed(test_seed))
        adapter = run.save_adapter(peft_model, flat, vec, "final")
    finally:
        os.umask(old_mask)
    return adapter, vec, flat, base_dir, run


def test_adapter_config_names_the_hub_id_and_the_card_keeps_the_local_path(saved):
    adapter, vec, flat, base_dir, run = saved
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID
    card = (adapter / "README.md").read_text()
    meta = yaml.safe_load(card.split("---", 2)[1])
    assert meta["base_model"] == HUB_ID and meta["library_name"] == "peft"
    assert meta["fedsafe"]["base_model_local_path"] == str(base_dir) and meta["fedsafe"]["model_name"] == "embedded"
    body = card.split("---", 2)[2]
    for fact in (HUB_ID, "benign x2, malicious x1", "1 of 2 done", "| scenario | attack |", "| aggregator | krum |",
                 "r=4, alpha=8", "| seed | 3 |", "1: 2.5", "```yaml", "- PEFT "):  # last: PEFT's own card lines
        assert fact in body, fact


def test_saved_tensors_are_the_vector_and_files_follow_the_umask(saved):
    adapter, vec, flat, base_dir, run = saved
    state = load_file(str(adapter / "adapter_model.safetensors"))
    assert set(state) == set(flat.state_dict(vec))
    assert torch.equal(flat.from_state_dict(state), vec)
    for f in adapter.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert adapter.stat().st_mode & 0o777 == 0o755
    assert not [p for p in adapter.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_plain_peft_loads_it(saved, test_seed):
    from peft import PeftModel

    adapter, vec, flat, base_dir, run = saved
    fresh = tiny_llama(byte_tokenizer(), seed=test_seed)
    loaded = PeftModel.from_pretrained(fresh, str(adapter), is_trainable=True)
    assert torch.equal(FlatLoRA(loaded).get(), vec)


def test_fedsafe_loads_a_bare_copy_with_its_embedded_base(saved, monkeypatch, tmp_path):
    """A copied adapter (no run directory above it) loads fedsafe's embedded base, not a hub download."""
    import shutil

    import fedsafe.models as models
    from fedsafe.run_model import load_adapter
    from fedsafe.hub import adapter_base

    adapter = saved[0]
    copy = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(adapter, copy)
    assert adapter_base(copy) == "embedded"
    asked = []
    monkeypatch.setattr(models, "load_base_model", lambda name, *a, **k: asked.append(name) or
                        models.LoadedModel(tiny_llama(byte_tokenizer(), seed=0), byte_tokenizer(), name, "cpu"))
    load_adapter(copy)
    assert asked == ["embedded"]


def test_push_uploads_the_adapter_with_a_refreshed_card(saved, monkeypatch, capsys):
    import huggingface_hub

    from fedsafe.cli import main

    adapter, vec, flat, base_dir, run = saved
    (run.path / "results.csv").write_text("setting,scenario,defense,rule,over_refusal,n_prompts\n"
                                          "exp,attack,none,62.5,1.0,64\n")
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message=""):
            calls.append(("upload_folder", folder_path, repo_id, sorted(os.listdir(folder_path))))
            return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/1",
                                              commit_message=commit_message, commit_description="", oid="1" * 40)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(sys, "argv", ["fedsafe", "push", str(run.path), "someone/exp-lora", "--private"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)
    assert ("create_repo", "someone/exp-lora", True, True) in calls
    upload = next(c for c in calls if c[0] == "upload_folder")
    assert upload[1] == str(adapter) and upload[2] == "someone/exp-lora"
    assert upload[3] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = (adapter / "README.md").read_text()
    assert "| attack | none | 62.5 | 1.0 | 64 |" in card and "- PEFT " in card
    assert "someone/exp-lora" in capsys.readouterr().out

