"""Batched multi-adapter training (fedsafe.fl.batched) gives the adapters of one-at-a-time training.

Every test compares the batched path with :meth:`LocalTrainer.fit` client by client on the tiny random Llama:
same seeds and batches, fp32 on CPU, updates within 1e-5 relative (the base GEMMs run over more, differently
padded rows, so the last bits may differ; a wrong dropout mask, batch or clip is off by 1e-2 or more).
"""

from dataclasses import replace

import pytest
import torch

from fedsafe.data.format import TokenizedExample
from fedsafe.engines.inprocess import InProcessEngine
from fedsafe.fl.batched import CPU_REASON, BatchedTrainer, clip_per_adapter, why_sequential
from fedsafe.data.client_data import ClientData
from fedsafe.fl.client import LocalTrainer, RoundConfig
from fedsafe.models import attach_lora, byte_tokenizer, tiny_llama
from fedsafe.plugins import ClientPipeline, Plugin, PluginSet

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-5


def _examples(tok, seed: int, n: int, lo: int, hi: int) -> list[TokenizedExample]:
    """``n`` random-token examples of lengths in [lo, hi) with the first third unlabelled (a prompt)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=gen))
        ids = torch.randint(3, len(tok), (length,), generator=gen)
        labels = ids.clone()
        labels[: length // 3] = -100
        out.append(TokenizedExample(ids, labels))
    return out


def _setup(test_seed, dropout=0.0, sizes=(6, 5, 3), same_length=False):
    """A LoRA tiny Llama, a perturbed global adapter (so A and B both get gradients) and clients whose data
    differ in content, length (padding) and count (the last one has fewer rows than the batch size)."""
    tok = byte_tokenizer()
    model = attach_lora(tiny_llama(tok, seed=test_seed), r=4, alpha=8, dropout=dropout)
    trainer = LocalTrainer(model, tok)
    ranges = [(20, 21)] * 4 if same_length else [(10, 30), (20, 50), (5, 12), (15, 25)]
    clients = [ClientData(f"c{i}", "benign", _examples(tok, 100 * test_seed + i, n, *ranges[i % 4]))
               for i, n in enumerate(sizes)]
    start = trainer.flat.get()
    start = start + 0.02 * torch.randn(start.shape, generator=torch.Generator().manual_seed(test_seed))
    return trainer, clients, start


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _compare(trainer, clients, start, rc, grouped_gemm=None):
    """Run both paths from the same RNG state; returns (sequential, batched) results and the RNG states after."""
    torch.manual_seed(123)
    seq = [trainer.fit(c, start, rc, {}) for c in clients]
    rng_seq, vec_seq = torch.get_rng_state(), trainer.flat.get()
    torch.manual_seed(456)  # a different state before: the batched path must not depend on it either
    bat = BatchedTrainer(trainer, grouped_gemm=grouped_gemm).fit_many(clients, start, rc)
    rng_bat, vec_bat = torch.get_rng_state(), trainer.flat.get()
    for s, b in zip(seq, bat):
        assert s.client_id == b.client_id
        assert _rel(b.update, s.update) < RTOL, (s.client_id, _rel(b.update, s.update))
        assert b.metrics["seen_examples"] == s.metrics["seen_examples"]
        assert b.metrics["loss"] == pytest.approx(s.metrics["loss"], rel=1e-6)
        assert b.metrics["last_loss"] == pytest.approx(s.metrics["last_loss"], rel=1e-6)
    # the global RNG and the model are left as the sequential path leaves them (later draws see the same state)
    assert torch.equal(rng_seq, rng_bat)
    assert _rel(vec_bat, vec_seq) < RTOL
    # the clients really trained apart: their updates differ far more than the tolerance
    assert _rel(seq[0].update, seq[1].update) > 1e-2
    return seq, bat


@pytest.mark.parametrize("variant", ["adamw_clip_accum", "sgd_fedprox", "b_only_weight_decay", "grouped_bmm"])
def test_batched_round_equals_sequential(test_seed, variant):
    """A round of several clients with different data, lengths and row counts: the same adapters."""
    trainer, clients, start = _setup(test_seed)
    rc = RoundConfig(round=2, lr=0.01, local_steps=3, batch_size=4, seed=test_seed, max_grad_norm=0.05)
    grouped = None
    if variant == "adamw_clip_accum":
        rc = replace(rc, grad_accum=2)
    elif variant == "sgd_fedprox":
        trainer, clients, start = _setup(test_seed, sizes=(6, 5, 4, 8))
        rc = replace(rc, optimizer="sgd", lr=0.5, algorithm="fedprox", prox_mu=0.1)
    elif variant == "b_only_weight_decay":  # FFA-LoRA's factor choice: A frozen, only B trained
        rc = replace(rc, trainable="B", weight_decay=0.1, max_grad_norm=None)
    else:  # every client's batch has the same shape: the LoRA path is one torch.bmm over adapters (the GPU path);
        # a bmm rounds differently from a matmul (~1e-7) and AdamW's step m/(sqrt(v)+eps) amplifies that on
        # coordinates with near-zero gradients, so this checks the kernel with SGD (an update linear in the gradient)
        trainer, clients, start = _setup(test_seed, sizes=(6, 5, 4), same_length=True)
        rc, grouped = replace(rc, optimizer="sgd", lr=0.5), True
    seq, bat = _compare(trainer, clients, start, rc, grouped)
    if variant == "b_only_weight_decay":
        a_mask = trainer.flat.mask("A")
        assert all(float(r.update[a_mask].abs().max()) == 0.0 for r in bat)


def test_batched_round_with_lora_dropout_equals_sequential(test_seed):
    """LoRA dropout draws each client's masks from that client's seeded RNG in sequential order: same masks."""
    trainer, clients, start = _setup(test_seed, dropout=0.1)
    rc = RoundConfig(round=1, lr=0.01, local_steps=3, batch_size=4, seed=test_seed, max_grad_norm=0.05)
    seq, _bat = _compare(trainer, clients, start, rc)
    # dropout acts: the same client without it trains to a different adapter
    plain, _clients, _start = _setup(test_seed, dropout=0.0)
    no_dropout = plain.fit(clients[0], start, rc, {})
    assert _rel(no_dropout.update, seq[0].update) > 1e-3


def test_batched_clip_per_adapter_is_clip_grad_norm_of_each():
    """Per-adapter clipping of stacked gradients equals torch's clip_grad_norm_ on each adapter's tensors
    (adapter 0 above the bound, adapter 1 below it)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (2, 2, 2)]
    stacks = []
    for shape in shapes:
        s = torch.zeros(2, *shape, requires_grad=True)
        s.grad = torch.randn(2, *shape, generator=gen)
        s.grad[1] *= 0.01
        stacks.append(s)
    separate = [[s.grad[k].clone().requires_grad_() for s in stacks] for k in range(2)]
    expected_norms = []
    for k in range(2):
        params = [torch.zeros_like(g, requires_grad=True) for g in separate[k]]
        for p, g in zip(params, separate[k]):
            p.grad = g.detach().clone()
        expected_norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        separate[k] = [p.grad for p in params]
    norms = clip_per_adapter(stacks, 1.0)
    assert norms.tolist() == pytest.approx(expected_norms, rel=1e-6)
    assert expected_norms[0] > 1.0 > expected_norms[1]  # one clipped, one not
    for k in range(2):
        for s, g in zip(stacks, separate[k]):
            torch.testing.assert_close(s.grad[k], g, rtol=1e-6, atol=0)


class _ChangesTraining(Plugin):
    name = "test_changes_training"

    def local_training(self, trainer):
        return trainer


class _OnlyReadsTrainer(_ChangesTraining):
    name = "test_only_reads_trainer"

    def changes_local_training(self):
        return None


class _ScalesUpdate(Plugin):
    """A client_update hook that draws from the global RNG: it sees the state the sequential path leaves."""

    name = "test_scales_update"

    def client_update(self, result, client, global_vec, rc, trainer):
        factor = 1.0 + float(torch.rand(()))
        return replace(result, update=result.update * factor, metrics={**result.metrics, "factor": factor})


def test_batched_fallback_is_decided_from_declared_plugin_properties():
    """A plug-in that overrides local_training changes training (sequential) unless it declares otherwise."""
    assert "local_training" in PluginSet([_ChangesTraining(None, None)]).sequential_training()["test_changes_training"]
    assert PluginSet([_OnlyReadsTrainer(None, None), _ScalesUpdate(None, None)]).sequential_training() == {}


def test_batched_engine_falls_back_and_says_why(test_seed):
    """The engine trains one at a time when a plug-in changes local training, the config says off, or the trainer
    or round is one the batched path does not reproduce, and records which path ran and why."""
    trainer, clients, start = _setup(test_seed)
    rc = RoundConfig(round=1, lr=0.01, local_steps=1, batch_size=4, seed=test_seed)
    ids = [c.client_id for c in clients]
    engine = InProcessEngine(trainer, clients, "on",
                             PluginSet([_ChangesTraining(None, None)]).sequential_training())
    engine.fit(ids, start, rc)
    assert engine.training_path["training_path"] == "sequential"
    assert engine.training_path["training_path_reason"].startswith("test_changes_training: its local_training hook")
    assert InProcessEngine(trainer, clients, "off").why_sequential(ids, rc) == "fl.batched_clients=off"
    assert InProcessEngine(trainer, clients, "on").why_sequential(ids, rc) is None
    # auto: batched on an accelerator only; on a CPU the round record says why it ran one at a time
    assert InProcessEngine(trainer, clients, "auto").why_sequential(ids, rc) == CPU_REASON
    if torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        trainer.model.to("cuda")
        try:
            assert InProcessEngine(trainer, clients, "auto").why_sequential(ids, rc) is None
        finally:
            trainer.model.to("cpu")
    assert "scaffold" in why_sequential(trainer, replace(rc, algorithm="scaffold"), 3)
    assert "level=step" in why_sequential(trainer, replace(rc, step_feature_mask=torch.ones(3, dtype=bool)), 3)
    assert why_sequential(trainer, rc, 1) == "fewer than 2 clients this round"

    class DPLike(LocalTrainer):  # e.g. DP-SGD replaces the training step by subclassing the trainer
        pass

    assert "DPLike" in why_sequential(DPLike(trainer.model, trainer.tokenizer), rc, 3)
    with_terms = LocalTrainer(trainer.model, trainer.tokenizer, loss_terms=[lambda m, b, o: 0.0])
    assert "loss terms" in why_sequential(with_terms, rc, 3)
    from fedsafe.errors import ConfigError

    with pytest.raises(ConfigError, match="fl.batched_clients must be one of auto, on, off, got 'fast'"):
        InProcessEngine(trainer, clients, "fast")


def test_batched_engine_runs_client_update_hooks_as_sequential(test_seed):
    """Batched and sequential engines give the same results through client_update hooks, including a hook that
    draws from the global RNG (it sees the state the client's own training left), and call on_result per client."""
    trainer, clients, start = _setup(test_seed, dropout=0.1)
    rc = RoundConfig(round=1, lr=0.01, local_steps=2, batch_size=4, seed=test_seed, max_grad_norm=0.05)
    ids = [c.client_id for c in clients]
    pipeline = ClientPipeline(trainer, [_ScalesUpdate(None, None)])
    out = {}
    for mode in ("off", "on"):
        engine = InProcessEngine(pipeline, clients, mode)
        seen = []
        torch.manual_seed(7 if mode == "off" else 8)
        out[mode] = engine.fit(ids, start, rc, on_result=lambda r: seen.append(r.client_id))
        assert seen == ids
        assert engine.training_path["training_path"] == ("batched" if mode == "on" else "sequential")
    for s, b in zip(out["off"], out["on"]):
        assert b.metrics["factor"] == s.metrics["factor"]
        assert _rel(b.update, s.update) < RTOL


def test_batched_clients_config_field():
    """fl.batched_clients is auto | on | off (YAML's bare off / on are booleans: they mean off / on); anything else
    names the field."""
    from fedsafe.config import load_config
    from fedsafe.errors import ConfigError

    assert load_config(None, ["model.name=tiny"]).fl.batched_clients == "auto"
    assert load_config(None, ["model.name=tiny", "fl.batched_clients=off"]).fl.batched_clients == "off"
    assert load_config(None, ["model.name=tiny", "fl.batched_clients=on"]).fl.batched_clients == "on"
    with pytest.raises(ConfigError, match="fl.batched_clients: Input should be 'auto', 'on' or 'off'"):
        load_config(None, ["model.name=tiny", "fl.batched_clients=fast"])


def _run(tmp_path, name, extra):
    import json
    import sys
    from pathlib import Path

    from fedsafe.config import load_config
    from fedsafe.pipeline import run_experiment

    sys.path.insert(0, str(Path(__file__).parent))
    import plugin_cases

    cfg = load_config(None, [*plugin_cases.BASE, f"output_dir={tmp_path}", f"name={name}", *extra])
    res = run_experiment(cfg, progress=False)
    from safetensors.torch import load_file

    t = load_file(str(Path(res.run_dir) / "adapters" / "final" / "adapter_model.safetensors"))
    vec = torch.cat([t[k].reshape(-1).float() for k in sorted(t)])
    rounds = [r for line in (Path(res.run_dir) / "metrics.jsonl").read_text().splitlines()
              if (r := json.loads(line))["type"] == "round"]
    return vec, rounds


def test_batched_run_equals_sequential_run_and_records_the_path(tmp_path):
    """A whole tiny run (2 rounds of 3 clients, plugin_cases' plain case): the same final adapter batched and one
    at a time, each round record saying which path ran; a plug-in that changes local training (constrained
    updates' loss terms) falls back, and the record says why."""
    batched, rec_b = _run(tmp_path, "batched", ["fl.batched_clients=on"])
    sequential, rec_s = _run(tmp_path, "sequential", ["fl.batched_clients=off"])
    assert _rel(batched, sequential) < RTOL
    assert [r["training_path"] for r in rec_b] == ["batched", "batched"]
    assert [(r["training_path"], r["training_path_reason"]) for r in rec_s] == [
        ("sequential", "fl.batched_clients=off")] * 2
    _vec, rec_c = _run(tmp_path, "constrained", ["constrained.l2_mu=1000", "fl.batched_clients=on"])
    assert [r["training_path"] for r in rec_c] == ["sequential", "sequential"]
    assert rec_c[0]["training_path_reason"].startswith("constrained_updates: its local_training hook")


def test_batched_generate_with_k_adapters_equals_one_at_a_time(test_seed):
    """generate_adapters: greedy completions under K adapters from one generate call per prompt batch equal
    loading each adapter and calling generate (prompts of different lengths: left padding, several batches)."""
    from fedsafe.generation import generate, generate_adapters

    trainer, _clients, start = _setup(test_seed)
    gen = torch.Generator().manual_seed(test_seed + 1)
    vecs = [start + 0.5 * torch.randn(start.shape, generator=gen) for _ in range(3)]
    prompts = ["Tell me a story", "Hi", "What is the capital of a country far away?", "List three colours", "Why"]
    kw = dict(max_new_tokens=8, batch_size=2)
    expected = []
    for v in vecs:
        trainer.flat.set(v)
        expected.append(generate(trainer.model, trainer.tokenizer, prompts, **kw))
    trainer.flat.set(start)
    got = generate_adapters(trainer.model, trainer.tokenizer, trainer.flat, vecs, prompts, **kw)
    assert got == expected
    assert expected[0] != expected[1]  # the adapters really differ in what they generate
    assert trainer.flat.get().equal(start)  # the model's own adapter is untouched


def _batched_round_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "batched_round.py"
    spec = importlib.util.spec_from_file_location("batched_round_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batched_round_benchmark_counts_the_work_it_sets_against_the_gemm_peak():
    """The benchmark's hardware-limit table rests on FlopCounterMode's count: 2mnk for an (m, k) x (k, n) matmul,
    and a backward pass counts its gradient matmuls too (here dW only: the input needs no gradient)."""
    bench = _batched_round_benchmark()
    a, b = torch.randn(6, 5), torch.randn(5, 7)
    assert bench.counted_flops(lambda: torch.mm(a, b)) == 2 * 6 * 5 * 7
    w = torch.randn(7, 5, requires_grad=True)
    forward = bench.counted_flops(lambda: a @ w.T)
    assert bench.counted_flops(lambda: (a @ w.T).sum().backward()) == 2 * forward  # + dW (no dX: a needs no grad)
    assert bench.gemm_peak(size=64, repeats=2) > 0
