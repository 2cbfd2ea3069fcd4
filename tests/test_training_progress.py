"""Waiting less blind while clients train (issue 34 items 6 and 7): each local step's loss reaches the clients bar
and a per-step ``train/loss``; each client reports the tokens it trained on and its tokens/s."""

import os

import pytest
import torch

from fedsafe.aggregators import get as get_rule
from fedsafe.config import FLConfig
from fedsafe.data.format import tokenize_rows
from fedsafe.engines.inprocess import InProcessEngine
from fedsafe.data.client_data import ClientData
from fedsafe.fl.client import LocalTrainer, RoundConfig
from fedsafe.fl.loop import _ClientProgress, run_rounds
from fedsafe.fl.server import Server
from fedsafe.models import attach_lora, byte_tokenizer, tiny_llama
from fedsafe.rundir import RunDir
from fedsafe.tracking import record_points

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(n=(4, 3)):
    tok = byte_tokenizer()
    trainer = LocalTrainer(attach_lora(tiny_llama(tok, seed=int(os.environ.get("FEDSAFE_TEST_SEED", "0"))),
                                       r=2, alpha=4), tok)
    clients = [ClientData(f"c{k}", "benign",
                          tokenize_rows(tok, [{"instruction": f"item {k} {i}", "response": "x" * (3 + 5 * i + k)}
                                              for i in range(size)], 64))
               for k, size in enumerate(n)]
    return trainer, clients


@pytest.mark.parametrize("path", ["off", "on"])  # one client at a time; the batched pass
def test_each_local_step_reports_its_loss_and_each_client_its_tokens(path):
    trainer, clients = _setup()
    rc = RoundConfig(round=1, lr=0.01, local_steps=3, batch_size=8, seed=0)  # batch >= rows: every row, every step
    engine = InProcessEngine(trainer, clients, path)
    steps = []
    results = engine.fit([c.client_id for c in clients], trainer.flat.get(), rc,
                         on_step=lambda cid, step, loss: steps.append((cid, step, loss)))
    assert engine.training_path["training_path"] == ("sequential" if path == "off" else "batched")
    for client, res in zip(clients, results):
        mine = [(s, loss) for cid, s, loss in steps if cid == client.client_id]
        assert [s for s, _ in mine] == [1, 2, 3]
        losses = [loss for _, loss in mine]
        assert losses[0] == pytest.approx(res.metrics["first_loss"])
        assert losses[-1] == pytest.approx(res.metrics["last_loss"])
        assert sum(losses) / 3 == pytest.approx(res.metrics["loss"])
        # each step runs the forward pass over all the client's rows: 3 x their tokens
        assert res.metrics["tokens"] == 3 * sum(len(e.input_ids) for e in client.examples)
        assert res.metrics["tokens_per_s"] == pytest.approx(res.metrics["tokens"] / res.metrics["compute_seconds"])


def test_clients_bar_shows_the_step_loss_and_tokens_per_s():
    from types import SimpleNamespace

    from rich.progress import Progress

    with Progress(disable=True) as progress:
        task = progress.add_task("round 2: clients", total=2)
        shown = _ClientProgress(progress, task, "round 2: clients", local_steps=10)
        shown.step("c3", 4, 1.23456)
        assert progress.tasks[0].description == "round 2: clients · c3 step 4/10 loss 1.235"
        shown.result(SimpleNamespace(client_id="c3", metrics={"loss": 1.5, "tokens_per_s": 812.4}))
        assert progress.tasks[0].completed == 1
        shown.step("c5", 1, 2.0)
        assert progress.tasks[0].description == "round 2: clients · c5 step 1/10 loss 2.000 · 812 tok/s"
    assert shown.step_losses == {4: [1.23456], 1: [2.0]}


def test_round_loop_logs_the_mean_loss_of_each_local_step_as_train_loss(tmp_path):
    trainer, clients = _setup()
    cfg = FLConfig(rounds=2, local_steps=3, batch_size=8, lr=1e-2, lr_schedule="constant")
    server = Server(cfg, trainer.flat.get(), get_rule("fedavg"), num_clients=2)
    run_dir = RunDir.create(tmp_path, "steps")
    run_rounds(server, InProcessEngine(trainer, clients), clients, run_dir, rounds=2, clients_per_round=2)
    train = run_dir.records("train")
    assert [(r["round"], r["local_step"], r["step"]) for r in train] == [
        (1, 1, 1), (1, 2, 2), (1, 3, 3), (2, 1, 4), (2, 2, 5), (2, 3, 6)]
    for rnd in (1, 2):
        cl = [r for r in run_dir.records("client") if r["round"] == rnd]
        mine = [r for r in train if r["round"] == rnd]
        # the mean over clients of each step's loss: its first and last steps are the clients' first / last losses
        assert mine[0]["loss"] == pytest.approx(sum(r["first_loss"] for r in cl) / len(cl))
        assert mine[-1]["loss"] == pytest.approx(sum(r["last_loss"] for r in cl) / len(cl))
        assert all(r["tokens"] > 0 for r in cl)
    # a tracker gets it as one chart, train/loss, over the local steps of the whole run
    assert record_points(train[4]) == [(5, {"train/loss": train[4]["loss"]})]
    assert torch.isfinite(torch.tensor([r["loss"] for r in train])).all()
