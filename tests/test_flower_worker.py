"""The SuperNode's warm worker (engines/flower/worker.py), the thin ClientApp, TLS certificates and the trace.

The worker tests drive the real ClientApp handlers of ``fedsafe.engines.flower.app`` through a scripted Grid in
this process; the worker is a real separate process reached over its private socket. Full deployments
(SuperLink, SuperNodes) with workers are in test_flower.py.
"""

import logging
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Error, Message  # noqa: E402
from test_flower import ScriptedGrid, _adapter, _cfg, data_file, task_identity  # noqa: E402,F401

from fedsafe.engines.flower import codec, trainer_cache  # noqa: E402
from fedsafe.engines.flower import worker as wk  # noqa: E402
from fedsafe.engines.flower.node import WORKER_DIR, query_reply  # noqa: E402
from fedsafe.engines.flower.server import FlowerEngine  # noqa: E402
from fedsafe.errors import FedsafeError  # noqa: E402
from fedsafe.fl.client import RoundConfig  # noqa: E402


class WorkerGrid(ScriptedGrid):
    """SuperNodes whose ClientApp is fedsafe's deployed one: each forwards to its own warm worker process."""

    def __init__(self, num_nodes, worker_dirs, after_train=None):
        super().__init__(num_nodes, node_config=None)
        for i, node in enumerate(sorted(self.nodes)):
            self.nodes[node] = {**self.nodes[node], WORKER_DIR: str(worker_dirs[i])}
        self.after_train = after_train
        self.trained = 0

    def pull_messages(self, message_ids):
        from flwr.app import Context, RecordDict

        from fedsafe.engines.flower import app as flower_app

        out = []
        for mid in list(message_ids):
            msg = self.inbox.pop(mid, None)
            if msg is None:
                continue
            node = msg.metadata.dst_node_id
            ctx = self.contexts.setdefault(node, Context(run_id=1, node_id=node, node_config=self.nodes[node],
                                                         state=RecordDict(), run_config={}))
            handler = {codec.TRAIN: flower_app.train, codec.QUERY: flower_app.query,
                       codec.DECRYPT: flower_app.decrypt}[msg.metadata.message_type]
            try:
                out.append(handler(msg, ctx))
            except FedsafeError as exc:  # what Flower does with a ClientApp exception
                out.append(Message(Error(code=3, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
            if msg.metadata.message_type == codec.TRAIN:
                self.trained += 1
                if self.after_train is not None:
                    self.after_train(self.trained)
        return out


@pytest.fixture
def worker_dirs(tmp_path):
    dirs = [wk.private_dir(tmp_path / "workers" / f"node{i}") for i in range(2)]
    for d in dirs:  # owned by this test process: a worker exits when pytest does
        wk.write_settings(d, None, os.getpid())
    yield dirs
    for d in dirs:
        wk.stop_worker(d, signal.SIGKILL)


def _wait_dead(pid: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while wk.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not wk.pid_alive(pid)


def test_run_through_warm_workers_equals_inprocess_and_survives_a_killed_worker(tmp_path, data_file, worker_dirs,
                                                                                 task_identity, caplog):
    """Both nodes train on warm workers (started by the first message's handler); node 0's worker is killed
    after round 1 and restarted by round 2's handler; SCAFFOLD's c_i lives in Context.state, so the run still
    equals the in-process one."""
    from fedsafe.pipeline import run_experiment
    from fedsafe.rundir import RunDir

    cfg = _cfg(tmp_path, data_file, roles=[{"name": "benign", "clients": 2, "data": [{"path": str(data_file)}]}],
               fl={"rounds": 3, "algorithm": "scaffold"},
               flower={"round_timeout_s": 600.0, "connect_timeout_s": 5.0})
    pids = {}

    def kill_after_round_1(trained: int) -> None:
        if trained == 2:  # both round-1 replies are in
            pids["first"] = wk.worker_pid(worker_dirs[0])
            pids["other"] = wk.worker_pid(worker_dirs[1])
            os.kill(pids["first"], signal.SIGKILL)
            _wait_dead(pids["first"])

    trainer_cache.BUILT.clear()
    grid = WorkerGrid(2, worker_dirs, after_train=kill_after_round_1)
    with caplog.at_level(logging.INFO, logger="fedsafe"):
        deployed = run_experiment(cfg, progress=False, engine_factory=lambda trainer, clients: FlowerEngine(
            grid, cfg, clients, token="not-local"))
    reference = run_experiment(cfg, progress=False)

    rounds = RunDir.open(deployed.run_dir).records("round")
    assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["failed"] == [] for r in rounds)
    assert deployed.round_losses == pytest.approx(reference.round_losses, rel=1e-5)
    wa, wb = _adapter(reference), _adapter(deployed)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)
    restarted = wk.worker_pid(worker_dirs[0])
    assert restarted is not None and restarted != pids["first"]  # node 0 got a new worker ...
    assert wk.worker_pid(worker_dirs[1]) == pids["other"]  # ... node 1 kept its warm one for all rounds
    assert caplog.text.count("is not running: starting it") == 3  # both at the first message, node 0 once more
    assert not trainer_cache.BUILT  # nothing was built in this process: the workers trained
    for d in worker_dirs:
        assert stat.S_IMODE(os.stat(d / wk.SOCKET_NAME).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_pinned_worker_refuses_another_model_with_a_reason(tmp_path, data_file, worker_dirs, task_identity):
    """A worker started with --config holds that model: another run's model is refused at connect and per message."""
    from fedsafe.config import dump_config

    pinned_cfg = _cfg(tmp_path, data_file, seed=101)  # tiny is initialised from the seed: another model
    path = tmp_path / "pinned.yaml"
    path.write_text(dump_config(pinned_cfg))
    wk.write_settings(worker_dirs[0], path, os.getpid())
    run_cfg = _cfg(tmp_path, data_file, fl={"rounds": 1})
    node_config = {"partition-id": 0, WORKER_DIR: str(worker_dirs[0])}
    content = codec.encode_train(torch.zeros(3), RoundConfig(round=1, lr=1e-3, local_steps=1, batch_size=2, seed=1),
                              "client_00", dump_config(run_cfg), "tok")
    with pytest.raises(FedsafeError, match="warm worker holds model 'tiny'.*restart the SuperNode"):
        query_reply(content, node_config)  # at connect: this node is never sampled

    from flwr.app import Context, RecordDict

    from fedsafe.engines.flower import app as flower_app

    msg = Message(content, dst_node_id=1, message_type=codec.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m1"
    ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    with pytest.raises(FedsafeError, match="warm worker refused the train message: .*holds model 'tiny'"):
        flower_app.train(msg, ctx)
    assert wk.worker_pid(worker_dirs[0]) is not None  # a refusal does not kill the worker
    assert not ctx.state  # and changes no client state


def test_no_worker_dir_trains_in_the_clientapp_process_with_a_log_line(tmp_path, data_file, task_identity, caplog):
    from flwr.app import Context, RecordDict

    from fedsafe.config import dump_config
    from fedsafe.engines.flower import app as flower_app

    trainer_cache.BUILT.clear()
    cfg = _cfg(tmp_path, data_file, fl={"rounds": 1})
    node_config = {"partition-id": 0}
    built = trainer_cache.trainer_for("tok", dump_config(cfg), node_config)  # what a ClientApp process builds
    start = built.trainer.flat.get().clone()
    content = codec.encode_train(start, RoundConfig(round=1, lr=1e-3, local_steps=1, batch_size=2, seed=1),
                              "client_00", dump_config(cfg), "tok")
    msg = Message(content, dst_node_id=1, message_type=codec.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m1"
    ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    with caplog.at_level(logging.INFO, logger="fedsafe"):
        reply = flower_app.train(msg, ctx)
    assert "no warm worker on this SuperNode" in caplog.text
    res = codec.decode_result(reply.content)
    assert res.client_id == "client_00" and res.update.shape == start.shape and float(res.update.norm()) > 0
    assert list(trainer_cache.BUILT.values()) == [built]  # trained on the model built in this process


def test_worker_directory_must_be_private(tmp_path):
    made = wk.private_dir(tmp_path / "w")
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(FedsafeError, match="mode 755; it must be 0700"):
        wk.check_private_dir(loose)


def test_thin_clientapp_and_query_import_no_torch(tmp_path, data_file):
    """The per-message ClientApp process must not pay for torch/transformers when a worker trains or for a query.

    (The query validates the experiment config, whose ``roles[].attack`` validator currently imports
    ``fedsafe.attacks.adaptive`` and so torch even for ``attack: null``; transformers and peft stay out.)"""
    from fedsafe.config import dump_config

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(dump_config(_cfg(tmp_path, data_file)))
    code = ("import sys, fedsafe.engines.flower.app as app\n"
            "assert 'torch' not in sys.modules\n"
            "from flwr.app import ConfigRecord, RecordDict\n"
            "from fedsafe.engines.flower.node import query_reply\n"
            f"cfg = open({str(cfg_path)!r}).read()\n"
            "reply = query_reply(RecordDict({'fedsafe': ConfigRecord({'config': cfg, 'token': 't'})}), "
            "{'partition-id': 1})\n"
            "assert reply['fedsafe']['client_id'] == 'client_01'\n"
            "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_certs_make_a_ca_a_server_certificate_and_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from fedsafe.engines.flower.deploy import write_certs

    certs = write_certs(tmp_path / "certs", num_nodes=2, hosts=["link.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "link.example.org"} <= set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.0.0.5"} <= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert len(certs.nodes) == 2 and certs.nodes[0][1].read_bytes() != certs.nodes[1][1].read_bytes()
    for private, public in certs.nodes:  # the formats flower-supernode and `flwr supernode register` read
        key = load_ssh_private_key(private.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    for secret in (certs.server_key, certs.nodes[0][0], certs.ca_key):
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600


def test_tls_is_the_default_and_plain_text_needs_insecure(tmp_path):
    from typer.testing import CliRunner

    from fedsafe.engines.flower.cli import flower_app
    from fedsafe.engines.flower.deploy import superlink_command, supernode_command, write_certs

    certs = write_certs(tmp_path / "c", 1)
    link = superlink_command(9999, certs=certs)
    assert "--insecure" not in link and "--enable-supernode-auth" in link and str(certs.server_cert) in link
    node = supernode_command("127.0.0.1:9999", 9998, partition_id=0, root_certificates=certs.ca,
                             auth_key=certs.nodes[0][0])
    assert "--insecure" not in node and str(certs.nodes[0][0].resolve()) in node
    with pytest.raises(FedsafeError, match="needs TLS"):
        supernode_command("127.0.0.1:9999", 9998, partition_id=0, auth_key=certs.nodes[0][0])
    result = CliRunner().invoke(flower_app, ["submit", str(tmp_path), "--superlink", "127.0.0.1:9999"])
    assert result.exit_code != 0 and "--insecure for plain text" in result.output


def test_trace_breakdown_joins_server_clientapp_and_worker_events():
    from fedsafe.engines.flower.trace import breakdown

    events = [{"t": 0.0, "pid": 1, "event": "server_push", "mid": "a", "round": 2},
              {"t": 0.5, "pid": 7, "event": "proc_start", "at": 0.4},
              {"t": 1.4, "pid": 7, "event": "app_import_start"}, {"t": 1.5, "pid": 7, "event": "app_import_end"},
              {"t": 1.6, "pid": 7, "event": "forward_start", "mid": "a"},
              {"t": 1.7, "pid": 9, "event": "handler_start", "mid": "a"},
              {"t": 1.7, "pid": 9, "event": "model_ready", "mid": "a"},
              {"t": 1.8, "pid": 9, "event": "fit_start", "mid": "a"},
              {"t": 2.8, "pid": 9, "event": "fit_end", "mid": "a"},
              {"t": 2.9, "pid": 9, "event": "handler_end", "mid": "a"},
              {"t": 3.0, "pid": 7, "event": "forward_end", "mid": "a"},
              {"t": 4.0, "pid": 1, "event": "server_reply", "mid": "a"}]
    (row,) = breakdown(events)
    assert row["round"] == 2 and row["total"] == pytest.approx(4.0)
    assert row["SuperNode pull + SuperExec poll + ClientApp process spawn"] == pytest.approx(0.4)
    assert row["interpreter start, flwr imports, Runtime API pull, FAB install"] == pytest.approx(1.0)
    assert row["local training"] == pytest.approx(1.0)
    assert sum(v for k, v in row.items() if k not in ("mid", "round", "total")) == pytest.approx(4.0)
