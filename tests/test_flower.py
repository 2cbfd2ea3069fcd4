"""Flower engine: message codec, simulation == in-process, failures and invalid updates, loopback deployment."""

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Error, Message, RecordDict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedsafe.config import ExperimentConfig, FLConfig  # noqa: E402
from fedsafe.engines.flower import client_app, codec, trainer_cache  # noqa: E402
from fedsafe.engines.flower.node import node_client_id, node_keys  # noqa: E402
from fedsafe.engines.flower.server import FlowerEngine, server_keys  # noqa: E402
from fedsafe.errors import FedsafeError  # noqa: E402
from fedsafe.fl.client import ClientResult, RoundConfig  # noqa: E402


@pytest.fixture
def data_file(tmp_path) -> Path:
    """Neutral instruction/response pairs (placeholders) as JSONL."""
    path = tmp_path / "pairs.jsonl"
    rows = [{"instruction": f"placeholder instruction {i}: name {i % 5 + 2} colours",
             "response": f"placeholder answer {i}: " + "red green blue " * (i % 3 + 1)} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, data_file, **over) -> ExperimentConfig:
    base = {"name": "flower-test", "seed": 3 + int(os.environ.get("FEDSAFE_TEST_SEED", "0")),  # see conftest.py
            "output_dir": str(tmp_path / "runs"), "model": {"name": "tiny"},
            "lora": {"r": 4, "alpha": 8}, "data": {"max_length": 64, "samples_per_client": 6},
            "roles": [{"name": "benign", "clients": 3, "data": [{"path": str(data_file)}]}],
            "fl": {"rounds": 2, "clients_per_round": 2, "local_steps": 2, "batch_size": 2},
            "eval": {"helpfulness_proxy": False}}
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return ExperimentConfig.model_validate(base)


def _adapter(run_result) -> dict:
    files = sorted(Path(run_result.final_adapter).glob("*.safetensors"))
    return load_file(files[0])


# --- codec -----------------------------------------------------------------------------------------

@pytest.fixture
def task_identity():
    """Messages need a run/task identity; Flower sets it in its runtimes, tests set it here."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield


def test_round_config_and_result_survive_the_codec():
    rc = RoundConfig(round=3, lr=1e-4, local_steps=5, batch_size=2, seed=9, algorithm="scaffold",
                     scaffold_c=torch.linspace(0, 1, 7), max_grad_norm=None)
    if hasattr(rc, "step_feature_mask"):
        rc.step_feature_mask = torch.tensor([True, False, True, False, False, True, True])
    vec = torch.randn(7)
    content = codec.encode_train(vec, rc, "client_02", "seed: 1", "tk")
    got_vec, got_rc, cid, cfg_yaml, token = codec.decode_train(content)
    assert (cid, cfg_yaml, token) == ("client_02", "seed: 1", "tk")
    torch.testing.assert_close(got_vec, vec)
    for f in rc.__dataclass_fields__:
        a, b = getattr(rc, f), getattr(got_rc, f)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), f
        else:
            assert a == b, f
    res = ClientResult("client_02", torch.randn(7), 8, {"loss": 1.5, "steps": 5, "note": "x"},
                       {"delta_c": torch.ones(7), "ciphertext": b"\x00\x01", "chunks": [b"a", b"bc"],
                        "scale": 2.0, "info": {"k": [1, 2]}, "none": None,
                        "secure_agg": {"format": "ckks-v1", "ciphertexts": [b"c0", b"c1"], "length": 7,
                                       "nested": {"weight": 0.5, "empty": {}}}})
    back = codec.decode_result(codec.encode_result(res))
    torch.testing.assert_close(back.update, res.update)
    assert (back.client_id, back.num_samples, back.metrics) == (res.client_id, 8, res.metrics)
    assert back.extra.keys() == res.extra.keys() and back.extra["chunks"] == [b"a", b"bc"]
    assert back.extra["ciphertext"] == b"\x00\x01" and back.extra["info"] == {"k": [1, 2]}
    assert back.extra["none"] is None and torch.equal(back.extra["delta_c"], torch.ones(7))
    assert back.extra["secure_agg"] == res.extra["secure_agg"]  # HE ciphertexts travel as bytes
    with pytest.raises(FedsafeError, match="extra"):
        codec.encode_result(ClientResult("c", torch.zeros(2), 1, {}, {"bad": object()}))


def test_node_client_id_from_node_config():
    assert node_client_id({"partition-id": 2, "num-partitions": 4}, 4) == "client_02"
    assert node_client_id({"client-id": "client_07"}, 4) == "client_07"
    with pytest.raises(FedsafeError, match="partition-id=5"):
        node_client_id({"partition-id": 5}, 4)


# --- failures and invalid updates through a scripted Grid --------------------------------------------

class ScriptedGrid:
    """A Grid whose SuperNodes run ``handle_*`` in this process; in training some are dead, broken or tampered."""

    def __init__(self, num_nodes, dead=(), raising=(), tamper=None, node_config=None, decrypt_raising=()):
        self.nodes = {1000 + i: {"partition-id": i, "num-partitions": num_nodes, **(node_config or {})}
                      for i in range(num_nodes)}
        self.dead, self.raising, self.tamper = set(dead), set(raising), tamper or {}
        self.decrypt_raising = set(decrypt_raising)
        self.contexts, self.inbox, self.sent = {}, {}, []

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            mid = f"m{len(self.sent)}"
            msg.metadata.__dict__["_message_id"] = mid
            self.sent.append(msg)
            self.inbox[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        from flwr.app import Context

        out = []
        for mid in list(message_ids):
            msg = self.inbox.pop(mid, None)
            node = None if msg is None else msg.metadata.dst_node_id
            train = msg is not None and msg.metadata.message_type == codec.TRAIN
            if msg is None or (train and node in self.dead):
                continue
            decrypt = msg.metadata.message_type == codec.DECRYPT
            if (train and node in self.raising) or (decrypt and node in self.decrypt_raising):
                out.append(Message(Error(code=3, reason="ClientApp raised"), reply_to=msg))
                continue
            ctx = self.contexts.setdefault(node, Context(run_id=1, node_id=node, node_config=self.nodes[node],
                                                         state=RecordDict(), run_config={}))
            handler = {codec.TRAIN: client_app.handle_train, codec.QUERY: client_app.handle_query,
                       codec.DECRYPT: client_app.handle_decrypt}[msg.metadata.message_type]
            try:
                reply = handler(msg, ctx)
            except FedsafeError as exc:  # what Flower does with a ClientApp exception
                out.append(Message(Error(code=3, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
                continue
            if node in self.tamper and msg.metadata.message_type == codec.TRAIN:
                content = reply.content
                content["update"] = codec.ArrayRecord({"vec": codec.to_array(self.tamper[node](
                    torch.from_numpy(content["update"]["vec"].numpy().copy())))})
                reply = Message(content, reply_to=msg)
            out.append(reply)
        return out


def _run_with_grid(cfg, grid):
    from fedsafe.pipeline import run_experiment

    def factory(trainer, clients):
        trainer_cache.register_local("scripted", trainer, clients)
        return FlowerEngine(grid, cfg, clients, token="scripted")

    try:
        return run_experiment(cfg, progress=False, engine_factory=factory)
    finally:
        trainer_cache.unregister_local("scripted")


def test_failed_clients_and_invalid_updates_are_logged_and_the_run_goes_on(tmp_path, data_file, task_identity,
                                                                           caplog):
    # client_01's node never answers; client_02 sends NaN; client_03 sends a vector of the wrong shape
    cfg = _cfg(tmp_path, data_file, roles=[{"name": "benign", "clients": 4, "data": [{"path": str(data_file)}]}],
               fl={"clients_per_round": 4, "rounds": 1}, flower={"round_timeout_s": 1.0, "connect_timeout_s": 5.0})
    nan = lambda u: torch.full_like(u, float("nan"))  # noqa: E731
    short = lambda u: u[:-3]  # noqa: E731
    grid = ScriptedGrid(4, dead={1001}, tamper={1002: nan, 1003: short})
    with caplog.at_level(logging.WARNING, logger="fedsafe"):
        result = _run_with_grid(cfg, grid)
    from fedsafe.rundir import RunDir

    (record,) = RunDir.open(result.run_dir).records("round")
    assert record["clients"] == ["client_00", "client_02", "client_03"]  # the clients that answered
    assert [f["client_id"] for f in record["failed"]] == ["client_01"]
    assert "round_timeout_s" in record["failed"][0]["reason"]
    dropped = {d["client_id"]: d["reason"] for d in record["dropped"]}
    assert "non-finite" in dropped["client_02"] and "shape" in dropped["client_03"]
    assert record["client_weights"] == pytest.approx([1.0, 0.0, 0.0]) and record["update_norm"] > 0
    assert "client client_01 failed" in caplog.text and "dropped update of client_02" in caplog.text
    assert (result.final_adapter / "adapter_config.json").exists()


def test_below_min_results_the_round_leaves_the_adapter_unchanged(tmp_path, data_file, task_identity):
    cfg = _cfg(tmp_path, data_file, fl={"clients_per_round": 3, "rounds": 1},
               flower={"round_timeout_s": 1.0, "connect_timeout_s": 5.0, "min_results": 2})
    result = _run_with_grid(cfg, ScriptedGrid(3, dead={1001}, raising={1002}))
    from fedsafe.rundir import RunDir

    (record,) = RunDir.open(result.run_dir).records("round")
    assert record["clients"] == [] and record["update_norm"] == 0.0
    reasons = {f["client_id"]: f["reason"] for f in record["failed"]}
    assert "min_results" in reasons["client_00"] and "round_timeout_s" in reasons["client_01"]
    assert "ClientApp raised" in reasons["client_02"]
    final = _adapter(result)  # still the initial adapter: PEFT starts every lora_B at zero
    assert all(float(v.abs().max()) == 0.0 for k, v in final.items() if "lora_B" in k)


# --- simulation equals in-process --------------------------------------------------------------------

def test_flower_simulation_equals_inprocess(tmp_path, data_file):
    from fedsafe.engines.flower.simulation import run_flower_experiment
    from fedsafe.pipeline import run_experiment
    from fedsafe.rundir import RunDir

    # SCAFFOLD also checks the client state kept in each SuperNode's Context across rounds
    cfg = _cfg(tmp_path, data_file, fl={"algorithm": "scaffold"})
    a = run_experiment(cfg, progress=False)
    b = run_flower_experiment(cfg, progress=False)
    wa, wb = _adapter(a), _adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    assert a.round_losses == pytest.approx(b.round_losses, rel=1e-6)
    ra, rb = RunDir.open(a.run_dir).records("round"), RunDir.open(b.run_dir).records("round")
    assert [r["clients"] for r in ra] == [r["clients"] for r in rb]
    assert all(r["failed"] == [] for r in rb)
    assert any(float(v.abs().max()) > 0 for k, v in wa.items() if "lora_B" in k)  # training moved B


# --- loopback deployment (separate processes) ---------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_loopback_deployment_two_rounds(tmp_path, data_file):
    from fedsafe.engines.flower.deploy import LocalFederation, write_app
    from fedsafe.rundir import RunDir

    cfg = _cfg(tmp_path, data_file, roles=[{"name": "benign", "clients": 2, "data": [{"path": str(data_file)}]}],
               flower={"round_timeout_s": 240.0, "connect_timeout_s": 120.0})
    with LocalFederation(2, workdir=tmp_path / "fed") as fed:
        pids = fed.pids()
        app = write_app(tmp_path / "app", cfg)
        run_dir = fed.submit(app, timeout_s=540)
    rounds = RunDir.open(run_dir).records("round")
    assert [r["round"] for r in rounds] == [1, 2] and all(r["failed"] == [] for r in rounds)
    assert all(sorted(r["clients"]) == ["client_00", "client_01"] for r in rounds)
    assert (run_dir / "adapters" / "final" / "adapter_config.json").exists()
    time.sleep(1)
    assert not any(_alive(p) for p in pids)


@pytest.mark.slow
def test_killing_a_supernode_mid_round_keeps_the_run_going(tmp_path, data_file):
    import psutil

    from fedsafe.engines.flower.deploy import LocalFederation, write_app
    from fedsafe.rundir import RunDir

    cfg = _cfg(tmp_path, data_file, roles=[{"name": "benign", "clients": 2, "data": [{"path": str(data_file)}]}],
               flower={"round_timeout_s": 60.0, "connect_timeout_s": 120.0, "min_results": 1})
    killed = {}

    def cmdline(proc) -> str:  # a child may exit (or be a zombie) between listing and reading it
        try:
            return " ".join(proc.cmdline())
        except psutil.Error:
            return ""

    def kill_when_training(line: str) -> None:
        # after the nodes are mapped, the next ClientApp process under SuperNode 1 is round 1's training
        if "SuperNodes hold clients" not in line or killed:
            return
        node = psutil.Process(fed.procs["supernode1"].pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any("flwr-clientapp" in cmdline(c) for c in node.children(recursive=True)):
                break
            time.sleep(0.1)
        fed.kill_node(1, sig=signal.SIGKILL)
        killed["at"] = time.monotonic()

    with LocalFederation(2, workdir=tmp_path / "fed") as fed:
        pids = fed.pids()
        app = write_app(tmp_path / "app", cfg)
        run_dir = fed.submit(app, timeout_s=540, on_line=kill_when_training)
    assert killed
    rounds = RunDir.open(run_dir).records("round")
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["clients"] == ["client_00"] and rounds[0]["update_norm"] > 0
    assert [f["client_id"] for f in rounds[0]["failed"]] == ["client_01"]
    assert (run_dir / "adapters" / "round_0001").exists() and (run_dir / "adapters" / "final").exists()
    time.sleep(1)
    assert not any(_alive(p) for p in pids)


@pytest.mark.slow  # ~3 min on 2 cores; tests/test_flower_worker.py kills a worker in a fast scripted run
def test_loopback_warm_worker_killed_mid_run_the_run_completes(tmp_path, data_file):
    """TLS + node auth + warm workers (LocalFederation's defaults): node 0's worker is killed after round 1; the
    next train message's handler restarts it, no client fails, and the run equals the in-process one."""
    from fedsafe.engines.flower.deploy import LocalFederation, write_app
    from fedsafe.pipeline import run_experiment
    from fedsafe.rundir import RunDir

    cfg = _cfg(tmp_path, data_file, roles=[{"name": "benign", "clients": 2, "data": [{"path": str(data_file)}]}],
               fl={"rounds": 3}, flower={"round_timeout_s": 300.0, "connect_timeout_s": 120.0})
    killed = {}

    def kill_worker_after_round_1(line: str) -> None:
        if line.startswith("round   1:") and not killed:
            killed["pid"] = fed.worker_pid(0)
            os.kill(killed["pid"], signal.SIGKILL)

    with LocalFederation(2, workdir=tmp_path / "fed") as fed:
        assert fed.secure and fed.certs is not None and fed.registered == {0, 1}
        pids = fed.pids()
        app = write_app(tmp_path / "app", cfg)
        run_dir = fed.submit(app, timeout_s=540, on_line=kill_worker_after_round_1)
        restarted, kept = fed.worker_pid(0), fed.worker_pid(1)
        worker_pids = [restarted, kept]
    assert killed["pid"] and restarted not in (None, killed["pid"]) and kept is not None
    rounds = RunDir.open(run_dir).records("round")
    assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["failed"] == [] for r in rounds)
    node_log = (tmp_path / "fed" / "supernode0.log").read_text()
    assert node_log.count("is not running: starting it") == 1  # only the restart: the first worker was warm
    reference = run_experiment(cfg, progress=False)
    deployed = {(r["round"], r["client_id"]): r["loss"] for r in RunDir.open(run_dir).records("client")}
    inproc = {(r["round"], r["client_id"]): r["loss"] for r in RunDir.open(reference.run_dir).records("client")}
    assert deployed.keys() == inproc.keys()
    assert [deployed[k] for k in sorted(deployed)] == pytest.approx([inproc[k] for k in sorted(inproc)], rel=1e-4)
    time.sleep(1)
    assert not any(_alive(p) for p in pids + worker_pids)


def test_loopback_unregistered_supernode_is_refused_and_the_run_completes(tmp_path, data_file):
    """A SuperNode with a valid TLS CA but a key the SuperLink never registered cannot join; the run goes on."""
    from fedsafe.engines.flower.deploy import LocalFederation, write_app
    from fedsafe.rundir import RunDir

    cfg = _cfg(tmp_path, data_file, roles=[{"name": "benign", "clients": 2, "data": [{"path": str(data_file)}]}],
               fl={"rounds": 1}, flower={"round_timeout_s": 300.0, "connect_timeout_s": 120.0,
                                         "min_available_clients": 2})
    lines = []
    with LocalFederation(2, workdir=tmp_path / "fed") as fed:
        intruder = fed.start_node(2, partition_id=0, register=False)  # claims client_00 with its own key
        pids = fed.pids()
        app = write_app(tmp_path / "app", cfg)
        run_dir = fed.submit(app, timeout_s=540, on_line=lines.append)
        assert fed.registered == {0, 1}
        intruder_log = (tmp_path / "fed" / "supernode2.log").read_text()
    mapped = [line for line in lines if "SuperNodes hold clients" in line]
    assert mapped and "2 SuperNodes hold clients ['client_00', 'client_01']" in mapped[0]
    assert "held by two SuperNodes" not in "".join(lines)  # the intruder never reached the server's node list
    (record,) = RunDir.open(run_dir).records("round")
    assert sorted(record["clients"]) == ["client_00", "client_01"] and record["failed"] == []
    assert "Failed to activate SuperNode" in intruder_log  # the SuperLink refused its key (Flower exit code 305)
    assert "Receiving" not in intruder_log  # it never got a message
    assert intruder.pid in pids
    time.sleep(1)
    assert not any(_alive(p) for p in pids)


def test_secure_aggregation_ciphertexts_travel_through_flower(tmp_path, data_file):
    """CKKS-encrypted updates (bytes in ClientResult.extra) through Flower simulation == plaintext in-process."""
    pytest.importorskip("tenseal")
    from fedsafe.engines.flower.simulation import run_flower_experiment
    from fedsafe.pipeline import run_experiment
    from fedsafe.rundir import RunDir

    base = dict(roles=[{"name": "benign", "clients": 2, "data": [{"path": str(data_file)}]}],
                fl={"rounds": 1, "local_steps": 1, "lr": 0.02, "lr_schedule": "constant"})
    plain = run_experiment(_cfg(tmp_path, data_file, **base), progress=False)
    he = run_flower_experiment(_cfg(tmp_path, data_file, secure_agg={"enabled": True, "prune_start": 0,
                                                                     "prune_end": 0}, **base), progress=False)
    (record,) = RunDir.open(he.run_dir).records("round")
    assert record["aggregator_info"]["secure_agg"] and record["failed"] == []
    wa, wb = _adapter(plain), _adapter(he)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5)
    assert any(float(v.abs().max()) > 0 for k, v in wb.items() if "lora_B" in k)


# --- secure aggregation in a deployment: keys from `fedsafe flower keys`, a SuperNode decrypts -------------

# Round 1 prunes 30% (of LoRA A; B is still zero and kept whole) with a mask that every party derives from
# the initial adapter, identical in every run; round 2 prunes nothing. A later pruned round would rank
# magnitudes that CKKS noise (~1e-9, different in every run) can reorder among near-ties, so two HE runs
# could legitimately prune different coordinates and their adapters could not be compared.
_HE = {"enabled": True, "prune_start": 0.3, "prune_end": 0.0}


def _assert_same_he_rounds(run_dir: Path, reference_dir: Path) -> None:
    """A deployed HE run did what the in-process HE run did: same masks, same adapters up to CKKS noise.

    Round 1 starts from the same adapter in both runs, so its result differs only by CKKS noise (~1e-9).
    Round 2 starts from adapters that differ by that noise, which AdamW can amplify on coordinates whose
    gradient is ~0 (its step is ~lr * g / |g|), so a later adapter gets a looser bound; a wrong aggregate
    (a weight, the mask, a client missing) is off by ~1e-2 at this learning rate. Measured on the final
    adapter: 5e-7..1e-5 over FEDSAFE_TEST_SEED 0-7; test_secure_agg's similar run reached 4.8e-5 on some
    seeds, so the bound is 1e-3 (it was 1e-4: a 2x margin there).
    """
    from fedsafe.rundir import RunDir

    rounds, reference = RunDir.open(run_dir).records("round"), RunDir.open(reference_dir).records("round")
    assert [r["round"] for r in rounds] == [r["round"] for r in reference] and all(r["failed"] == [] for r in rounds)
    assert all(sorted(r["clients"]) == ["client_00", "client_01"] for r in rounds)
    info = [r["aggregator_info"] for r in rounds]
    assert all(i["secure_agg"] for i in info) and info[0]["he_kept_values"] < info[0]["he_total_values"]  # pruned
    assert [i["he_mask_digest"] for i in info] == [r["aggregator_info"]["he_mask_digest"] for r in reference]
    assert all(r["he_bytes"] > 0 for r in RunDir.open(run_dir).records("client"))  # the clients encrypted
    for tag, atol in (("round_0001", 1e-6), ("final", 1e-6 if len(rounds) == 1 else 1e-3)):
        got, want = (load_file(next((d / "adapters" / tag).glob("*.safetensors"))) for d in (run_dir, reference_dir))
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=lambda m: f"{tag} {k}: {m}")
    assert any(float(v.abs().max()) > 1e-3 for k, v in got.items() if "lora_B" in k)  # training moved B


@pytest.fixture
def he_keys(tmp_path):
    pytest.importorskip("tenseal")
    from fedsafe.defenses.secure_aggregation.keys import write_key_files
    from fedsafe.defenses.secure_aggregation.params import CKKSParams

    return write_key_files(CKKSParams(), tmp_path / "keys")


def test_server_and_supernodes_refuse_wrong_key_files(tmp_path, data_file, he_keys, task_identity):
    from flwr.app import Context

    from fedsafe.config import dump_config
    from fedsafe.defenses.secure_aggregation.keys import write_key_files
    from fedsafe.defenses.secure_aggregation.params import CKKSParams
    from fedsafe.errors import ConfigError

    cfg = _cfg(tmp_path, data_file, secure_agg=_HE)
    assert server_keys(cfg, str(he_keys.server)).key_id == he_keys.key_id
    assert server_keys(_cfg(tmp_path, data_file), str(he_keys.server)) is None  # HE off: no keys needed
    with pytest.raises(FedsafeError, match="needs the server's public CKKS context"):
        server_keys(cfg, None)
    with pytest.raises(ConfigError, match="holds the secret key"):
        server_keys(cfg, str(he_keys.clients))
    other = write_key_files(CKKSParams(), tmp_path / "other")
    query = Message(RecordDict({"fedsafe": codec.run_meta(dump_config(cfg), "t", he_keys.key_id)}), dst_node_id=1000,
                    message_type=codec.QUERY)

    def node(**node_config):
        return Context(run_id=1, node_id=1000, node_config={"partition-id": 1, **node_config}, state=RecordDict(),
                       run_config={})

    for node_config, message in [({}, "holds no CKKS keys"),
                                 ({"he-context": str(tmp_path / "absent.ctx")}, "no such file"),
                                 ({"he-context": str(he_keys.server)}, "public context"),
                                 ({"he-context": str(other.clients)}, "key set")]:
        with pytest.raises(FedsafeError, match=message):  # at connect: the node is never sampled
            client_app.handle_query(query, node(**node_config))
    reply = client_app.handle_query(query, node(**{"he-context": str(he_keys.clients)}))
    assert reply.content["fedsafe"]["client_id"] == "client_01"
    # the server's file and the config say N=8192; keys made for other CKKS parameters are refused
    wide = write_key_files(CKKSParams(poly_modulus_degree=16384, coeff_mod_bit_sizes=(60, 40, 40, 60)),
                           tmp_path / "wide")
    with pytest.raises(ConfigError, match=r"secure_agg\.ckks is N=8192"):
        node_keys({"he-context": str(wide.clients)}, cfg, he_keys.key_id)
    with pytest.raises(ConfigError, match=r"secure_agg\.ckks is N=8192"):
        server_keys(cfg, str(wide.server))


def test_deployed_secure_aggregation_decrypts_on_a_supernode(tmp_path, data_file, he_keys, task_identity, caplog):
    """The deployment path in one process: nodes build their own encrypting workers from the key file, the
    server holds the public context only, a SuperNode decrypts (the next one when it fails) == in-process HE."""
    from fedsafe.pipeline import run_experiment
    from fedsafe.rundir import RunDir

    cfg = _cfg(tmp_path, data_file, roles=[{"name": "benign", "clients": 2, "data": [{"path": str(data_file)}]}],
               secure_agg=_HE, fl={"lr": 0.02, "lr_schedule": "constant"},
               flower={"round_timeout_s": 120.0, "connect_timeout_s": 5.0, "decrypt_timeout_s": 60.0})
    server = server_keys(cfg, str(he_keys.server))

    def deploy(grid):  # an unregistered token: every SuperNode builds its own model, data and key holder
        return run_experiment(cfg, progress=False, he_server_context=server.context,
                              engine_factory=lambda trainer, clients: FlowerEngine(grid, cfg, clients, token="he",
                                                                                      he_key_id=server.key_id))

    grid = ScriptedGrid(2, node_config={"he-context": str(he_keys.clients)}, decrypt_raising={1000})
    with caplog.at_level(logging.INFO, logger="fedsafe"):
        deployed = deploy(grid)
    _assert_same_he_rounds(deployed.run_dir, run_experiment(cfg, progress=False).run_dir)
    # node 1000 (client_00 answered first) fails to decrypt every round; node 1001 takes over
    decrypts = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == codec.DECRYPT]
    assert decrypts == [1000, 1001, 1000, 1001]
    assert "SuperNode 1000 (client client_00) could not decrypt" in caplog.text
    # when no key holder can decrypt, the run stops with the reasons (finished rounds are checkpointed)
    with pytest.raises(FedsafeError, match="no key-holding SuperNode decrypted"):
        deploy(ScriptedGrid(2, node_config={"he-context": str(he_keys.clients)}, decrypt_raising={1000, 1001}))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stop_group_ends_the_whole_group_also_when_it_ignores_sigterm(tmp_path):
    """stop_group sends its signal to the process group, then SIGKILL to what outlived it (a child that ignores
    SIGTERM, as Flower's app processes may): afterwards no process of the group is left."""
    from fedsafe.engines.flower.deploy import _start, stop_group

    def until(condition, timeout_s=30.0):  # a loaded machine may take a while to start or reap a process
        deadline = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)
        return condition()

    graceful = _start(["sleep", "300"], dict(os.environ), tmp_path / "graceful.log")
    log = tmp_path / "stubborn.log"
    stubborn = _start(["bash", "-c", "trap '' TERM; sleep 300 & echo started; wait"], dict(os.environ), log)
    assert until(lambda: "started" in log.read_text())  # the trap is set and the child runs
    assert _group_alive(graceful.pid) and _group_alive(stubborn.pid)
    stop_group(graceful, wait_s=5)
    assert graceful.returncode == -signal.SIGTERM and until(lambda: not _group_alive(graceful.pid))
    stop_group(stubborn, wait_s=0.5)
    assert stubborn.returncode == -signal.SIGKILL and until(lambda: not _group_alive(stubborn.pid))
    stop_group(stubborn, wait_s=0.5)  # a group that is gone already: nothing to do


def test_loopback_deployment_with_secure_aggregation(tmp_path, data_file, he_keys):
    """SuperLink + 2 SuperNodes as processes: the nodes hold clients.ctx, the ServerApp server.ctx; a SuperNode
    decrypts the round's sum; the result is the in-process HE run's, and every process is gone afterwards.

    One round (pruned 30%): the scripted-grid test above runs the same handlers over two rounds in one process;
    each extra deployed round costs ~40 s of ClientApp process start-ups on 2 cores.
    """
    from fedsafe.engines.flower.deploy import LocalFederation, write_app
    from fedsafe.pipeline import run_experiment

    cfg = _cfg(tmp_path, data_file, roles=[{"name": "benign", "clients": 2, "data": [{"path": str(data_file)}]}],
               secure_agg=_HE, fl={"rounds": 1, "lr": 0.02, "lr_schedule": "constant"},
               flower={"round_timeout_s": 240.0, "connect_timeout_s": 120.0, "decrypt_timeout_s": 240.0})
    with LocalFederation(2, workdir=tmp_path / "fed", he_context=he_keys.clients) as fed:
        pids = fed.pids()
        app = write_app(tmp_path / "app", cfg, he_context=he_keys.server)
        run_dir = fed.submit(app, timeout_s=540)
    reference = run_experiment(cfg, progress=False)
    _assert_same_he_rounds(run_dir, reference.run_dir)
    server_log = (tmp_path / "fed" / "flwr_run.log").read_text()
    assert server_log.count("decrypted the encrypted sum") == 1  # a SuperNode decrypted, at the first try
    assert f'he-context = "{he_keys.server}"' in (app / "pyproject.toml").read_text()  # the public file only
    time.sleep(1)
    assert not any(_alive(p) or _group_alive(p) for p in pids)  # SuperLink, SuperNodes and their children


def test_deployed_client_rebuilds_its_partition_or_trains_on_its_own_file(tmp_path, data_file, task_identity):
    """The ClientApp path of a real SuperNode (no shared model): rebuilt partition == in-process; data-path works."""
    from fedsafe.pipeline import run_experiment
    from fedsafe.rundir import RunDir

    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"question": f"placeholder question {i}", "answer": f"placeholder reply {i}"})
                           + "\n" for i in range(5)))
    cfg = _cfg(tmp_path, data_file, roles=[{"name": "benign", "clients": 2, "data": [{"path": str(data_file)}]}],
               fl={"rounds": 1}, flower={"round_timeout_s": 120.0, "connect_timeout_s": 5.0})
    grid = ScriptedGrid(2)
    grid.nodes[1001] = {"client-id": "client_01", "data-path": str(own), "instruction-field": "question",
                        "response-field": "answer"}
    # an unregistered token: every SuperNode builds its own model and data from the config in the message
    flower_run = run_experiment(cfg, progress=False,
                                engine_factory=lambda trainer, clients: FlowerEngine(grid, cfg, clients, token="x"))
    plain = run_experiment(cfg, progress=False)
    by_client = {r["client_id"]: r for r in RunDir.open(flower_run.run_dir).records("client")}
    by_client_plain = {r["client_id"]: r for r in RunDir.open(plain.run_dir).records("client")}
    assert by_client["client_00"]["loss"] == pytest.approx(by_client_plain["client_00"]["loss"], rel=1e-6)
    assert by_client["client_01"]["samples"] == 5 != by_client_plain["client_01"]["samples"]
    assert trainer_cache.BUILT  # the nodes really built their own workers
