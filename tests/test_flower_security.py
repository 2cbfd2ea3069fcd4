"""Flower deployment security (issue 30): the Control API is not served to SuperNodes' network, the CA's signing
key is kept apart from the SuperLink's files, and `fedsafe flower local` leaves no keys behind."""

import asyncio
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from typer.testing import CliRunner  # noqa: E402

from fedsafe.config import ExperimentConfig, dump_config  # noqa: E402
from fedsafe.errors import FedsafeError  # noqa: E402

INTRUDER_HOST = "127.0.0.2"  # the Fleet listener's address: all an intruder on the network can reach (loopback)


@pytest.fixture
def data_file(tmp_path) -> Path:
    """Neutral instruction/response pairs (placeholders) as JSONL."""
    path = tmp_path / "pairs.jsonl"
    rows = [{"instruction": f"placeholder instruction {i}", "response": f"placeholder answer {i}: red green"}
            for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, data_file, **over) -> ExperimentConfig:
    base = {"name": "flower-security", "seed": 3, "output_dir": str(tmp_path / "runs"), "model": {"name": "tiny"},
            "lora": {"r": 4, "alpha": 8}, "data": {"max_length": 64, "samples_per_client": 4},
            "roles": [{"name": "benign", "clients": 2, "data": [{"path": str(data_file)}]}],
            "fl": {"rounds": 1, "clients_per_round": 2, "local_steps": 1, "batch_size": 2},
            "eval": {"helpfulness_proxy": False},
            "flower": {"round_timeout_s": 240.0, "connect_timeout_s": 120.0}}
    base.update(over)
    return ExperimentConfig.model_validate(base)


# --- the loopback deployment, attacked ----------------------------------------------------------------

def _flwr_json(commands: dict[str, list[str]], env: dict) -> dict[str, dict]:
    """Run Flower's own CLI (--format json), the commands side by side; their JSON answers (it exits 0 on
    failure too)."""
    procs = {what: subprocess.Popen(["flwr", *args, "--format", "json"], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for what, args in commands.items()}
    answers = {}
    try:
        for what, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            start = out.find("{")
            assert start >= 0, f"flwr {commands[what]}: exit {proc.returncode}, no JSON: {out[-400:]} {err[-400:]}"
            answers[what] = json.loads(out[start:])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return answers


def test_intruder_holding_the_ca_cannot_register_list_or_submit_and_registered_nodes_train(tmp_path, data_file):
    """As the README sets it up (certs, superlink --certs, register): an intruder who reaches the SuperNodes' port
    with the public ca.crt is refused every Control and Runtime call, by Flower's CLI and by Flower's own HTTP
    clients; the Control listener is not on the address it reaches; the two registered nodes train a round."""
    import httpx
    from flwr.proto.control_pb2 import ListNodesRequest, ListRunsRequest, RegisterNodeRequest, StartRunRequest
    from flwr.proto.fleet_pb2 import RegisterNodeFleetRequest
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.runtime.runtime_http_client import RuntimeHttpClient
    from flwr.supernode.fleet_http_client import FleetHttpClient

    from fedsafe.engines.flower_deploy import LocalFederation, flower_env, write_app, write_connection
    from fedsafe.rundir import RunDir

    cfg = _cfg(tmp_path, data_file)
    app = write_app(tmp_path / "app", cfg)
    (tmp_path / "exp.yaml").write_text(dump_config(cfg))  # the warm workers load the model while the intruder tries
    with LocalFederation(2, workdir=tmp_path / "fed", fleet_host=INTRUDER_HOST,
                         worker_config=tmp_path / "exp.yaml") as fed:
        assert fed.superlink == f"{INTRUDER_HOST}:{fed.port}" and fed.registered == {0, 1}
        spare_public_key = fed.certs.nodes[2][1].read_bytes()  # a key pair the operator never registered
        ca = fed.certs.ca.read_bytes()

        # Flower's CLI, pointed at the address SuperNodes use, with the CA certificate
        intruder = flower_env(tmp_path / "intruder_home")
        write_connection(tmp_path / "intruder_home", fed.superlink, root_certificates=fed.certs.ca)
        answers = _flwr_json({"register": ["supernode", "register", str(fed.certs.nodes[2][1]), "fedsafe"],
                              "list nodes": ["supernode", "list", "fedsafe"], "list runs": ["ls", "fedsafe"],
                              "submit": ["run", str(app), "fedsafe"]}, intruder)
        assert len(answers) == 4
        for what, answer in answers.items():
            assert answer["success"] is False, (what, answer)
            assert "not served on the Fleet listener" in answer["error-message"], (what, answer)

        # Flower's own HTTP clients, every Control and Runtime RPC the intruder wants: 404 on the Fleet listener
        def status_of(call) -> int:
            with pytest.raises(httpx.HTTPStatusError) as err:
                call()
            return err.value.response.status_code

        control = ControlHttpClient.from_server_address(fed.superlink, False, ca, [])
        runtime = RuntimeHttpClient.from_server_address(fed.superlink, False, ca, [])
        statuses = {"RegisterNode": status_of(lambda: control.RegisterNode(
                        RegisterNodeRequest(public_key=spare_public_key))),
                    "ListNodes": status_of(lambda: control.ListNodes(ListNodesRequest())),
                    "ListRuns": status_of(lambda: control.ListRuns(ListRunsRequest())),
                    "StartRun": status_of(lambda: control.StartRun(StartRunRequest())),
                    "AcquireTask": status_of(lambda: runtime.AcquireTask(AcquireTaskRequest()))}
        assert statuses == dict.fromkeys(statuses, 404)
        # the Fleet API's own self-registration is off under node authentication
        fleet = FleetHttpClient.from_server_address(fed.superlink, False, ca, [])
        assert status_of(lambda: fleet.RegisterNode(RegisterNodeFleetRequest(public_key=spare_public_key))) >= 400
        # the Control listener is not on the intruder's address at all
        with pytest.raises(httpx.ConnectError):
            ControlHttpClient.from_server_address(f"{INTRUDER_HOST}:{fed.control_port}", False, ca,
                                                  []).ListNodes(ListNodesRequest())

        # the operator, on the server machine, still has the Control API: two nodes, none of the intruder's
        (operator_nodes,) = _flwr_json({"list nodes": ["supernode", "list", "fedsafe"]}, fed.env).values()
        assert operator_nodes["success"] is True
        assert len(operator_nodes["nodes"]) == 2

        run_dir = fed.submit(app, timeout_s=400)
        pids = fed.pids()
    (record,) = RunDir.open(run_dir).records("round")
    assert sorted(record["clients"]) == ["client_00", "client_01"] and record["failed"] == []
    for pid in pids:  # every process the federation started is gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --- the Fleet-only listener (fast) ------------------------------------------------------------------------

def _call(app, path: str, port: int) -> int:
    """Send one HTTP request to an ASGI app as if it arrived on ``port``; its status (200 when passed on)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "method": "POST", "headers": [], "server": ("127.0.0.1", port)}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"]


def test_fleet_listener_serves_only_the_fleet_api():
    from fedsafe.engines.superlink import fleet_only

    async def flower_app(scope, receive, send):  # stands in for Flower's app: answers everything
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = fleet_only(flower_app, fleet_port=9093)
    for path in ("/v1/fleet/pull-messages", "/v1/fleet/activate-node", "/health"):
        assert _call(app, path, 9093) == 200, path
    for path in ("/v1/control/register-node", "/v1/control/list-nodes", "/v1/control/list-runs",
                 "/v1/control/start-run", "/v1/runtime/acquire-task", "/v1/runtime/pull-task-input", "/docs",
                 "/openapi.json", "/v1/fleet", "/V1/control/list-nodes", "/", "/v1/fleet/../control/list-nodes",
                 "/v1/fleet/./x"):
        assert _call(app, path, 9093) == 404, path
    for path in ("/v1/control/register-node", "/v1/runtime/acquire-task", "/v1/fleet/pull-messages"):
        assert _call(app, path, 9091) == 200, path  # the control listener serves every API


def test_superlink_keeps_control_on_loopback_unless_told_and_refuses_foreign_keys(tmp_path, monkeypatch):
    from fedsafe.engines import flower_cli
    from fedsafe.engines.flower_deploy import write_certs

    certs = write_certs(tmp_path / "certs", 1)
    started = []
    monkeypatch.setattr(os, "execvpe", lambda file, args, env: started.append(args))
    runner = CliRunner()

    result = runner.invoke(flower_cli.flower_app, ["superlink", "--certs", str(tmp_path / "certs")])
    assert result.exit_code == 0, result.output
    (args,) = started
    launcher, flower = args[:args.index("--")], args[args.index("--") + 1:]
    assert launcher[launcher.index("--control-host") + 1] == "127.0.0.1"
    assert launcher[launcher.index("--control-port") + 1] == "9091"
    assert "--allow-unauthenticated-control" not in launcher
    assert flower[flower.index("--port") + 1] == "9093" and "--enable-supernode-auth" in flower
    assert flower[flower.index("--ssl-keyfile") + 1] == str(certs.server_key)

    result = runner.invoke(flower_cli.flower_app, ["superlink", "--certs", str(certs.superlink_dir),
                                                   "--control-host", "0.0.0.0"])
    assert result.exit_code == 2 and "no authentication" in result.output and len(started) == 1
    result = runner.invoke(flower_cli.flower_app, ["superlink", "--certs", str(certs.superlink_dir),
                                                   "--control-host", "0.0.0.0",
                                                   "--i-understand-unauthenticated-control"])
    assert result.exit_code == 0 and "--allow-unauthenticated-control" in started[-1]
    result = runner.invoke(flower_cli.flower_app, ["superlink", "--certs", str(certs.superlink_dir),
                                                   "--control-port", "9093"])
    assert result.exit_code == 2 and "need their own ports" in result.output

    old_layout = tmp_path / "old"  # ca.key next to the SuperLink's files, as `certs` wrote them before
    old_layout.mkdir()
    for path in (certs.ca, certs.server_cert, certs.server_key, certs.ca_key):
        (old_layout / path.name).write_bytes(path.read_bytes())
    result = runner.invoke(flower_cli.flower_app, ["superlink", "--certs", str(old_layout)])
    assert result.exit_code == 2 and "ca.key" in result.output and len(started) == 2


def test_superlink_launcher_refuses_a_non_loopback_control_host():
    from fedsafe.engines.superlink import is_loopback, main

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.org")
    with pytest.raises(SystemExit) as exc:
        main(["--control-host", "0.0.0.0", "--control-port", "9091", "--", "--insecure"])
    assert exc.value.code == 2


# --- certificate layout, `local` cleanup ---------------------------------------------------------------

def test_certs_keep_the_ca_signing_key_and_node_keys_out_of_the_superlink_directory(tmp_path):
    from cryptography import x509

    from fedsafe.engines.flower_deploy import write_certs

    certs = write_certs(tmp_path / "certs", num_nodes=2)
    superlink_dir = certs.server_cert.parent  # what `fedsafe flower superlink --certs` reads
    assert sorted(p.name for p in superlink_dir.iterdir()) == ["ca.crt", "server.key", "server.pem"]
    (ca_key,) = (tmp_path / "certs").rglob("ca.key")
    assert ca_key == certs.ca_key and ca_key.parent != superlink_dir
    assert all(private.parent != superlink_dir for private, _ in certs.nodes)
    for directory in (superlink_dir, ca_key.parent, certs.nodes[0][0].parent):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
    for secret in (ca_key, certs.server_key, certs.nodes[0][0], certs.nodes[1][0]):
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600, secret
    assert (superlink_dir / "ca.crt").read_bytes() == certs.ca.read_bytes()
    x509.load_pem_x509_certificate(certs.ca.read_bytes())


@pytest.mark.parametrize("failure", [KeyboardInterrupt, FedsafeError])
def test_local_removes_its_keys_and_work_directory_on_every_exit(tmp_path, data_file, monkeypatch, failure):
    """`fedsafe flower local` with secure_agg writes the clients' secret CKKS context and node keys into its work
    directory; a run that is interrupted or fails leaves none of it behind (processes are not started here)."""
    from fedsafe.engines import flower_deploy
    from fedsafe.engines.flower_cli import flower_app

    made = []
    real_post_init = flower_deploy.LocalFederation.__post_init__

    def post_init(self):
        real_post_init(self)
        made.append(self)

    def enter(self):  # what __enter__ writes (certificates and node keys), without starting Flower
        self.certs = flower_deploy.write_certs(self.workdir / "certs", self.num_nodes + 1)
        return self

    def submit(self, *args, **kwargs):
        assert (self.workdir / "keys").is_dir() and any((self.workdir / "keys").iterdir())
        raise failure("stopped")

    monkeypatch.setattr(flower_deploy.LocalFederation, "__post_init__", post_init)
    monkeypatch.setattr(flower_deploy.LocalFederation, "__enter__", enter)
    monkeypatch.setattr(flower_deploy.LocalFederation, "submit", submit)
    config = tmp_path / "exp.yaml"
    config.write_text(dump_config(_cfg(tmp_path, data_file, secure_agg={"enabled": True})))
    result = CliRunner().invoke(flower_app, ["local", str(config), "--no-worker"])
    assert result.exit_code != 0
    (fed,) = made
    assert not fed.workdir.exists(), sorted(str(p.relative_to(fed.workdir)) for p in fed.workdir.rglob("*"))
