"""Flower deployment security (issue 30): the Control API is not served to SuperNodes' network, the CA's signing
key is kept apart from the SuperLink's files, and `fedsafe flower local` leaves no keys behind."""

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from typer.testing import CliRunner  # noqa: E402

from fedsafe.config import ExperimentConfig, dump_config  # noqa: E402
from fedsafe.engines.flower.deploy import RUN_DIR_PATTERN  # noqa: E402
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


def _fedsafe(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "fedsafe"), "flower", *args]


def _wait_listening(host: str, port: int, proc, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited early: {log.read_text()[-2000:]}"
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on {host}:{port} after {timeout_s} s: {log.read_text()[-2000:]}")


def test_intruder_holding_the_ca_cannot_register_list_or_submit_and_registered_nodes_train(tmp_path, data_file):
    """Set up as the README does (`fedsafe flower certs`, `superlink --certs`, `register`, `supernode`, `submit`),
    on loopback: an intruder who reaches the SuperNodes' address with the public ca.crt is refused every Control and
    Runtime call, by Flower's CLI and by Flower's own HTTP clients, and cannot connect to the Control port from that
    address; the two registered nodes train a round."""
    import httpx
    from flwr.proto.control_pb2 import ListNodesRequest, ListRunsRequest, RegisterNodeRequest, StartRunRequest
    from flwr.proto.fleet_pb2 import RegisterNodeFleetRequest
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.runtime.runtime_http_client import RuntimeHttpClient
    from flwr.supernode.fleet_http_client import FleetHttpClient

    from fedsafe.engines.flower.deploy import _start, flower_env, free_port, stop_group, write_connection
    from fedsafe.engines.flower.worker import stop_worker
    from fedsafe.rundir import RunDir

    env = flower_env(tmp_path / "operator_home")
    env["OMP_NUM_THREADS"] = "1"
    fleet_port, control_port = free_port(), free_port()
    fleet, control = f"{INTRUDER_HOST}:{fleet_port}", f"127.0.0.1:{control_port}"
    certs = tmp_path / "certs"
    config = tmp_path / "exp.yaml"
    config.write_text(dump_config(_cfg(tmp_path, data_file)))
    for args in (("certs", "--out", str(certs), "--nodes", "3", "--host", INTRUDER_HOST),
                 ("app", str(tmp_path / "app"), "--config", str(config))):
        subprocess.run(_fedsafe(*args), env=env, check=True, capture_output=True, timeout=120)
    ca, spare_public_key = certs / "ca.crt", (certs / "nodes" / "node2.pub").read_bytes()  # node2: never registered
    procs, worker_dirs = {}, []
    try:
        procs["superlink"] = _start(_fedsafe("superlink", "--host", INTRUDER_HOST, "--port", str(fleet_port),
                                             "--control-port", str(control_port), "--certs", str(certs)),
                                    env, tmp_path / "superlink.log")
        _wait_listening("127.0.0.1", control_port, procs["superlink"], tmp_path / "superlink.log")
        _wait_listening(INTRUDER_HOST, fleet_port, procs["superlink"], tmp_path / "superlink.log")
        for i in (0, 1):
            registered = subprocess.run(_fedsafe("register", str(certs / "nodes" / f"node{i}.pub"), "--superlink",
                                                 control, "--root-certificates", str(ca)),
                                        env=env, capture_output=True, text=True, timeout=120)
            assert registered.returncode == 0 and "as SuperNode" in registered.stdout, registered.stderr[-1000:]
            worker_dirs.append(tmp_path / f"worker{i}")
            procs[f"node{i}"] = _start(_fedsafe("supernode", "--superlink", fleet, "--partition-id", str(i),
                                                "--port", str(free_port()), "--root-certificates", str(ca),
                                                "--auth-key", str(certs / "nodes" / f"node{i}.key"),
                                                "--worker-dir", str(worker_dirs[-1]), "--config", str(config),
                                                "--threads", "1"),
                                       env, tmp_path / f"node{i}.log")

        # Flower's CLI, pointed at the address SuperNodes use, with the CA certificate
        intruder = flower_env(tmp_path / "intruder_home")
        write_connection(tmp_path / "intruder_home", fleet, root_certificates=ca)
        answers = _flwr_json({"register": ["supernode", "register", str(certs / "nodes" / "node2.pub"), "fedsafe"],
                              "list nodes": ["supernode", "list", "fedsafe"], "list runs": ["ls", "fedsafe"],
                              "submit": ["run", str(tmp_path / "app"), "fedsafe"]}, intruder)
        assert len(answers) == 4
        for what, answer in answers.items():
            assert answer["success"] is False, (what, answer)
            assert "not served on the Fleet listener" in answer["error-message"], (what, answer)

        # Flower's own HTTP clients, every Control and Runtime RPC the intruder wants: 404 on the Fleet listener
        def status_of(call) -> int:
            with pytest.raises(httpx.HTTPStatusError) as err:
                call()
            return err.value.response.status_code

        ca_bytes = ca.read_bytes()
        control_client = ControlHttpClient.from_server_address(fleet, False, ca_bytes, [])
        runtime_client = RuntimeHttpClient.from_server_address(fleet, False, ca_bytes, [])
        statuses = {"RegisterNode": status_of(lambda: control_client.RegisterNode(
                        RegisterNodeRequest(public_key=spare_public_key))),
                    "ListNodes": status_of(lambda: control_client.ListNodes(ListNodesRequest())),
                    "ListRuns": status_of(lambda: control_client.ListRuns(ListRunsRequest())),
                    "StartRun": status_of(lambda: control_client.StartRun(StartRunRequest())),
                    "AcquireTask": status_of(lambda: runtime_client.AcquireTask(AcquireTaskRequest()))}
        assert statuses == dict.fromkeys(statuses, 404)
        # the Fleet API's own self-registration is off under node authentication
        fleet_client = FleetHttpClient.from_server_address(fleet, False, ca_bytes, [])
        self_registration = RegisterNodeFleetRequest(public_key=spare_public_key)
        assert status_of(lambda: fleet_client.RegisterNode(self_registration)) >= 400
        # the Control listener is not on the intruder's address at all
        with pytest.raises(httpx.ConnectError):
            ControlHttpClient.from_server_address(f"{INTRUDER_HOST}:{control_port}", False, ca_bytes,
                                                  []).ListNodes(ListNodesRequest())

        # the operator, on the server machine, still has the Control API: the two registered nodes only
        write_connection(tmp_path / "operator_home", control, root_certificates=ca)
        (operator_nodes,) = _flwr_json({"list nodes": ["supernode", "list", "fedsafe"]}, env).values()
        assert operator_nodes["success"] is True and len(operator_nodes["nodes"]) == 2

        submitted = subprocess.run(_fedsafe("submit", str(tmp_path / "app"), "--superlink", control,
                                            "--root-certificates", str(ca)),
                                   env=env, capture_output=True, text=True, timeout=400)
        assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-2000:]
        run_dir = Path(RUN_DIR_PATTERN.search(submitted.stdout + submitted.stderr).group(1))
    finally:
        for name in sorted(procs, key=lambda n: n == "superlink"):
            stop_group(procs[name])
        for wdir in worker_dirs:
            stop_worker(wdir, signal.SIGKILL)
    (record,) = RunDir.open(run_dir).records("round")
    assert sorted(record["clients"]) == ["client_00", "client_01"] and record["failed"] == []


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
    from fedsafe.engines.flower.superlink import fleet_only

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
    from fedsafe.engines.flower import cli as flower_cli
    from fedsafe.engines.flower.deploy import write_certs

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
    from fedsafe.engines.flower.superlink import is_loopback, main

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.org")
    with pytest.raises(SystemExit) as exc:
        main(["--control-host", "0.0.0.0", "--control-port", "9091", "--", "--insecure"])
    assert exc.value.code == 2


# --- certificate layout, `local` cleanup ---------------------------------------------------------------

def test_certs_keep_the_ca_signing_key_and_node_keys_out_of_the_superlink_directory(tmp_path):
    from cryptography import x509

    from fedsafe.engines.flower.deploy import write_certs

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
    from fedsafe.engines.flower import deploy as flower_deploy
    from fedsafe.engines.flower.cli import flower_app

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
