"""The spine end to end on the tiny model: run directory contents, PEFT-loadable adapters, resume
equality after a crash mid-round, and errors for bad input that name the field or path."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fedsafe.config import load_config
from fedsafe.engines.inprocess import InProcessEngine
from fedsafe.pipeline import run_experiment


def _cfg(tmp_path, *extra):
    seed = int(os.environ.get("FEDSAFE_TEST_SEED", "0"))  # the suite's global seed (conftest.py)
    return load_config(None, [
        "model.name=tiny", f"seed={seed}", f"output_dir={tmp_path}", "name=t", "fl.rounds=3", "fl.local_steps=2",
        "fl.batch_size=2", "data.samples_per_client=8", "data.max_length=96", "roles.0.clients=3",
        "fl.clients_per_round=2", "fl.lr=0.01", "data.heldout=[{path: 'starter:heldout'}]", "data.heldout_max=6",
        "eval.helpfulness_proxy=false", *extra])


def test_run_directory_layout_and_peft_loadable_adapter(tmp_path, test_seed):
    res = run_experiment(_cfg(tmp_path), progress=False)
    d = res.run_dir
    assert (d / "config.yaml").exists() and (d / "env.json").exists()
    env = json.loads((d / "env.json").read_text())
    assert env["seed"] == test_seed and env["packages"]["torch"]
    recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in recs if r["type"] == "client"]
    rounds = [r for r in recs if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert len(clients) == 6 and all({"loss", "steps", "samples", "seconds"} <= set(c) for c in clients)
    for tag in ("round_0001", "round_0002", "round_0003", "final"):
        assert (d / "adapters" / tag / "adapter_model.safetensors").exists()
    # 12 AdamW steps at lr 0.01 pull a random model towards the bytes of English text: a large, systematic
    # drop (measured 0.25-0.26 nats over seeds 0-2), not a float-noise outcome
    assert res.heldout_loss_before is not None and res.heldout_loss_after < res.heldout_loss_before - 0.05, (
        res.heldout_loss_before, res.heldout_loss_after)

    # the final adapter loads with plain PEFT onto the same base model and reproduces the global vector
    from peft import PeftModel

    from fedsafe.fl.params import FlatLoRA
    from fedsafe.models import byte_tokenizer, tiny_llama

    base = tiny_llama(byte_tokenizer(), seed=test_seed)
    peft = PeftModel.from_pretrained(base, str(d / "adapters" / "final"))
    saved = load_file(str(d / "adapters" / "final" / "adapter_model.safetensors"))
    lora = {n: p for n, p in peft.named_parameters() if "lora_" in n}
    assert len(lora) == len(saved)
    for name, tensor in saved.items():
        loaded = lora[name.replace(".weight", ".default.weight")]
        torch.testing.assert_close(loaded.detach(), tensor)
    assert FlatLoRA  # imported for the layout contract used by save_adapter


def test_resume_after_crash_mid_round_gives_the_same_adapter(tmp_path, monkeypatch):
    full = run_experiment(_cfg(tmp_path / "a"), progress=False)
    expected = load_file(str(full.run_dir / "adapters" / "final" / "adapter_model.safetensors"))

    calls = {"n": 0}
    original = InProcessEngine.fit

    def crash_in_round_two(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed while round 2 trains
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InProcessEngine, "fit", crash_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_cfg(tmp_path / "b"), progress=False)
    monkeypatch.setattr(InProcessEngine, "fit", original)
    run_dirs = list((tmp_path / "b").iterdir())
    assert len(run_dirs) == 1
    interrupted = run_dirs[0]
    # round 1 is kept, nothing of round 2 was written
    assert (interrupted / "adapters" / "round_0001").exists()
    assert not (interrupted / "adapters" / "round_0002").exists()
    resumed = run_experiment(resume=interrupted, progress=False)
    got = load_file(str(resumed.run_dir / "adapters" / "final" / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)
    rounds = [json.loads(x)["round"] for x in (interrupted / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["type"] == "round"]
    assert rounds == [1, 2, 3]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedsafe.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("args, needle", [
    (["run", "no/such/config.yaml"], "config file not found"),
    (["run", "--set", "fl.roundz=2"], "fl.roundz: unknown field"),
    (["run", "--set", "fl.lr=-1"], "fl.lr"),
    (["run", "--set", "model.name=tiny", "--set", "roles.0.data.0.path=/nonexistent/data.jsonl"],
     "/nonexistent/data.jsonl"),
    (["run", "--resume", "/nonexistent/run"], "not a fedsafe run directory"),
])
def test_cli_bad_input_is_one_clear_error(tmp_path, args, needle):
    out = _cli(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    text = " ".join((out.stderr + out.stdout).split())
    assert needle in text
    assert "Traceback" not in out.stderr


def test_cli_wrong_field_name_lists_fields(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "answer": "b"}\n')
    out = _cli("run", "--set", "model.name=tiny", "--set", f"output_dir={tmp_path}",
               "--set", f"roles.0.data.0.path={data}", cwd=tmp_path)
    assert out.returncode == 2
    text = " ".join(out.stderr.split())
    assert "instruction_field='instruction' is not a field" in text and "answer" in text


def test_info_prints_versions_and_device():
    out = _cli("info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["packages"]["torch"] and "cuda_available" in info


def test_embedded_model_end_to_end(tmp_path, test_seed):
    cfg = load_config(None, [f"output_dir={tmp_path}", f"seed={test_seed}", "name=e2e", "roles.0.clients=2",
                             "fl.clients_per_round=2", "fl.rounds=1", "fl.local_steps=2", "data.samples_per_client=8",
                             "data.max_length=128", "eval.helpfulness_proxy=false"])
    res = run_experiment(cfg, progress=False)
    assert (res.run_dir / "adapters" / "final" / "adapter_config.json").exists()
    losses = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    client_losses = [r["loss"] for r in losses if r["type"] == "client"]
    assert len(client_losses) == 2 and all(0 < x < 10 for x in client_losses)
