"""A SuperNode's warm worker: one long-lived process that keeps the model loaded between Flower messages.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message a SuperNode receives (in both
``--isolation subprocess`` and ``process``), so a ClientApp that builds its model would reload it every
round. ``fedsafe flower supernode`` therefore also starts this worker next to the SuperNode:

- the worker imports torch/transformers once, optionally loads the base model at start (``--config``), and
  builds the run's trainer and its client's data on the first message of a run; later rounds reuse them;
- the ClientApp (:mod:`fedsafe.engines.flower.app`) is a thin handler: it forwards the message content, the
  node config and the node's ``Context.state`` over a local socket and returns the worker's reply. Flower
  still does all transport, scheduling, retries and node management; the worker is not an FL runtime;
- client state that persists across rounds (SCAFFOLD's ``c_i``) travels with each message and stays in
  Flower's ``Context.state``, so a restarted worker loses nothing but its warm model.

Security: the socket is an ``AF_UNIX`` socket (mode 0600) in a directory of mode 0700 owned by the user, and
the worker also checks the peer's uid (``SO_PEERCRED``) on every connection, so only processes of the same
user reach it. Frames are pickled because both ends are that same user's processes.

Failures: no ``worker-dir`` in the node config -> the ClientApp loads the model itself, with a log line. A
worker that is not running (killed, crashed) is restarted by the next message's handler; one that dies while
handling a message is restarted and asked once more. A worker started with ``--config`` holds that model
and refuses runs of another model (at connect and per message) with a reason naming both; a message whose
config does not match the hash it was sent under, or a worker of other fedsafe code, is refused / restarted.

This module imports only the standard library and Flower's records at import time (and
:mod:`fedsafe.engines.flower.node`, which is as light): the thin handler and the launcher must not pay for torch.
The worker process imports the client side with a model (:mod:`fedsafe.engines.flower.client_app`) when it starts.

    python -m fedsafe.engines.flower.worker serve --dir DIR     # the worker (normally started for you)
    python -m fedsafe.engines.flower.worker launch --dir DIR [--config C] -- flower-supernode ...  # + SuperNode
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import pickle
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from fedsafe.engines.flower import trace as _trace
from fedsafe.engines.flower.node import (SETTINGS_NAME, WORKER_DIR, config_hash, model_key, parse_config,
                                         pinned_refusal, read_settings)
from fedsafe.errors import FedsafeError

log = logging.getLogger("fedsafe")

SOCKET_NAME = "worker.sock"
PID_NAME = "worker.pid"
LOG_NAME = "worker.log"
PROTOCOL = 1
START_TIMEOUT_S = float(os.environ.get("FEDSAFE_WORKER_START_TIMEOUT_S", "600"))
_FRAME = struct.Struct("!Q")


# ------------------------------------------------------------------------------------------------
# Records <-> plain picklable values (numpy arrays, scalars, bytes): no torch on the handler side
# ------------------------------------------------------------------------------------------------

def records_to_plain(records) -> dict:
    """A RecordDict as ``{name: (kind, {key: value})}`` with numpy arrays."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    out = {}
    for name, rec in records.items():
        if isinstance(rec, ArrayRecord):
            out[name] = ("arrays", {k: arr.numpy() for k, arr in rec.items()})
        elif isinstance(rec, MetricRecord):
            out[name] = ("metrics", dict(rec))
        elif isinstance(rec, ConfigRecord):
            out[name] = ("config", dict(rec))
        else:
            raise FedsafeError(f"record {name!r} of type {type(rec).__name__} cannot be sent to the warm worker")
    return out


def plain_to_records(plain: dict):
    """Inverse of :func:`records_to_plain`."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    records = RecordDict()
    for name, (kind, values) in plain.items():
        if kind == "arrays":
            records[name] = ArrayRecord({k: Array(v) for k, v in values.items()})
        elif kind == "metrics":
            records[name] = MetricRecord(values)
        else:
            records[name] = ConfigRecord(values)
    return records


# ------------------------------------------------------------------------------------------------
# Directory, socket and frames
# ------------------------------------------------------------------------------------------------

def private_dir(path: str | Path | None = None) -> Path:
    """Create (mode 0700) or check the worker directory: owned by this user, no access for anyone else."""
    if path is None:
        base = os.environ.get("XDG_RUNTIME_DIR") or None
        return Path(tempfile.mkdtemp(prefix="fedsafe-worker-", dir=base))  # mkdtemp: mode 0700
    path = Path(path).expanduser().resolve()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private_dir(path)
    return path


def check_private_dir(path: Path) -> None:
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise FedsafeError(f"node config {WORKER_DIR}={path} is owned by uid {st.st_uid}, not by this user "
                           f"({os.getuid()}): the warm worker's socket must be private")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise FedsafeError(f"node config {WORKER_DIR}={path} has mode {stat.S_IMODE(st.st_mode):o}; it must be 0700 "
                           "(only this user may reach the warm worker)")




def code_stamp() -> str:
    """fedsafe's version and the code of the worker protocol: a worker of other code is restarted."""
    import fedsafe

    here = Path(__file__).parent
    parts = [fedsafe.__version__, str(PROTOCOL), sys.executable]
    for name in ("worker.py", "node.py", "codec.py", "client_app.py", "trainer_cache.py"):
        with contextlib.suppress(OSError):
            parts.append(str((here / name).stat().st_mtime_ns))
    return "|".join(parts)


def send_frame(sock: socket.socket, obj) -> None:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_FRAME.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the warm worker closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket):
    (n,) = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    return pickle.loads(_recv_exact(sock, n))


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _proc_start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[19])  # a zombie is not alive
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int | None, start_ticks: int | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, given its start time, is still the same process."""
    if not pid:
        return False
    ticks = _proc_start_ticks(int(pid))
    if ticks is None:
        return False
    return start_ticks is None or ticks == start_ticks


def worker_pid(wdir: Path) -> int | None:
    """The pid of the worker of ``wdir`` if it is running."""
    try:
        pid = int((wdir / PID_NAME).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            is_worker = b"fedsafe.engines.flower.worker" in f.read()
    except OSError:
        return None
    return pid if is_worker and pid_alive(pid) else None


def stop_worker(wdir: str | Path, sig=signal.SIGTERM) -> None:
    """Stop the worker of ``wdir`` (if it runs)."""
    pid = worker_pid(Path(wdir))
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


# ------------------------------------------------------------------------------------------------
# The worker process
# ------------------------------------------------------------------------------------------------

class WarmWorker:
    """Serves train / decrypt requests of one SuperNode's ClientApps with a model kept in memory."""

    def __init__(self, wdir: Path):
        self.wdir = wdir
        self.settings = read_settings(wdir)
        self.stamp = code_stamp()
        self.lock = threading.Lock()

    def load(self) -> None:
        """Import the heavy modules and, with a preload config, load the base model now."""
        from fedsafe.engines.flower import client_app, trainer_cache  # noqa: F401 (torch, transformers, fedsafe)
        import fedsafe.data  # noqa: F401
        import fedsafe.models  # noqa: F401
        import fedsafe.pipeline  # noqa: F401

        if self.settings.get("threads"):  # SuperNodes sharing one machine split its cores
            import torch

            torch.set_num_threads(int(self.settings["threads"]))
        config = self.settings.get("config")
        if config:
            from fedsafe.config import load_config
            from fedsafe.run_model import load_model

            cfg = load_config(config)
            t0 = time.perf_counter()
            trainer_cache.PRELOADED[model_key(cfg)] = load_model(cfg.model, seed=cfg.seed)
            log.info("warm worker: loaded %s in %.1f s", cfg.model.name, time.perf_counter() - t0)

    def handle(self, req: dict) -> dict:
        if req.get("stamp") != self.stamp:
            return {"ok": False, "restart": True,
                    "reason": f"the warm worker runs other fedsafe code ({self.stamp} != {req.get('stamp')})"}
        op = req.get("op")
        from fedsafe.engines.flower import client_app

        content = plain_to_records(req["content"])
        meta = content["fedsafe"]
        node_config = req["node_config"]
        expect = config_hash(meta["config"], node_config, meta.get("he_key_id"))
        if req.get("config_hash") != expect:
            return {"ok": False, "reason": "the message's experiment config does not match the config hash the "
                                           f"ClientApp sent ({req.get('config_hash')} != {expect})"}
        why = pinned_refusal(self.settings, parse_config(meta["config"]))
        if why:
            return {"ok": False, "reason": why}
        if op == "train":
            state = plain_to_records(req["state"])
            reply = client_app.train_reply(content, node_config, state, req.get("mid"))
            return {"ok": True, "content": records_to_plain(reply), "state": records_to_plain(state),
                    "config_hash": expect}
        if op == "decrypt":
            reply = client_app.decrypt_reply(content, node_config)
            return {"ok": True, "content": records_to_plain(reply), "config_hash": expect}
        return {"ok": False, "reason": f"unknown warm worker request {op!r}"}

    def serve_connection(self, conn: socket.socket) -> None:
        with conn:
            if peer_uid(conn) != os.getuid():
                log.warning("warm worker: refused a connection from uid %d", peer_uid(conn))
                return
            try:
                req = recv_frame(conn)
            except (ConnectionError, EOFError, pickle.UnpicklingError):
                return
            with self.lock:
                try:
                    reply = self.handle(req)
                except FedsafeError as exc:
                    reply = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
                except Exception as exc:  # noqa: BLE001 -- the reason goes back to the server as a Flower error
                    log.error("warm worker: %s", traceback.format_exc())
                    reply = {"ok": False, "reason": f"warm worker raised {exc!r}"}
            with contextlib.suppress(OSError):
                send_frame(conn, reply)


def _watch_owner(settings: dict) -> None:
    """Exit when the SuperNode that owns this worker is gone (so no worker outlives its node)."""
    owner, ticks = settings.get("owner_pid"), settings.get("owner_start")
    if not owner:
        return
    while pid_alive(owner, ticks):
        time.sleep(1.0)
    os._exit(0)


def serve(wdir: Path) -> None:
    """Run the worker of ``wdir`` until it is killed or its SuperNode exits."""
    check_private_dir(wdir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fedsafe worker %(levelname)s: %(message)s")
    _trace.mark("worker_start", at=_trace.process_start_time())
    (wdir / PID_NAME).write_text(f"{os.getpid()}\n")  # before the imports: a starting worker is not started twice
    worker = WarmWorker(wdir)
    threading.Thread(target=_watch_owner, args=(worker.settings,), daemon=True).start()
    worker.load()
    path = wdir / SOCKET_NAME
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.listen(8)
    _trace.mark("worker_ready")
    log.info("warm worker %d ready on %s", os.getpid(), path)
    while True:
        conn, _ = server.accept()
        worker.serve_connection(conn)


# ------------------------------------------------------------------------------------------------
# The ClientApp side: forward a message to the worker, (re)starting it when needed
# ------------------------------------------------------------------------------------------------

def _worker_env(env: dict | None = None) -> dict:
    env = dict(os.environ if env is None else env)
    # OpenMP threads that spin while idle steal the CPU from the SuperNode's other processes
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def start_worker(wdir: Path) -> subprocess.Popen:
    """Start the worker of ``wdir`` in its own session (it outlives this ClientApp process, not its SuperNode)."""
    logf = open(wdir / LOG_NAME, "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "fedsafe.engines.flower.worker", "serve", "--dir", str(wdir)],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, env=_worker_env())
    finally:
        logf.close()


def _connect(wdir: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(wdir / SOCKET_NAME))
    except OSError:
        sock.close()
        raise
    return sock


def _log_tail(wdir: Path, n: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " | ".join((wdir / LOG_NAME).read_text(errors="replace").strip().splitlines()[-n:])
    return ""


def connect_or_start(wdir: Path, start_timeout_s: float = START_TIMEOUT_S) -> socket.socket | None:
    """A connection to the worker of ``wdir``: started (or waited for) if needed; None if it cannot start."""
    try:
        return _connect(wdir)
    except OSError:
        pass
    with open(wdir / "start.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one handler (re)starts the worker; others wait for it
        proc = None
        if worker_pid(wdir) is None:
            log.warning("fedsafe: the warm worker of %s is not running: starting it (it loads the model once; "
                        "later messages reuse it)", wdir)
            proc = start_worker(wdir)
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            try:
                return _connect(wdir)
            except OSError:
                pass
            if (proc is not None and proc.poll() is not None) or (proc is None and worker_pid(wdir) is None):
                log.warning("fedsafe: the warm worker of %s exited while starting (%s): loading the model in "
                            "this ClientApp process instead", wdir, _log_tail(wdir))
                return None
            time.sleep(0.05)
        log.warning("fedsafe: the warm worker of %s did not start within %.0f s: loading the model in this "
                    "ClientApp process instead", wdir, start_timeout_s)
        return None


def forward(op: str, message, context):
    """Send a ``train``/``decrypt`` message to this node's warm worker; its reply Message, or None (no worker).

    A worker that dies during the message is restarted and asked once more; a refusal (other model, config
    hash) raises :class:`FedsafeError` with the worker's reason, which Flower returns to the server.
    """
    from flwr.app import Message

    wdir = Path(str(context.node_config[WORKER_DIR]))
    check_private_dir(wdir)
    content = message.content
    meta = content["fedsafe"]
    mid = message.metadata.message_id
    _trace.mark("forward_start", mid=mid)
    req = {"stamp": code_stamp(), "op": op, "mid": mid, "content": records_to_plain(content),
           "node_config": dict(context.node_config),
           "config_hash": config_hash(meta["config"], context.node_config, meta.get("he_key_id"))}
    if op == "train":
        req["state"] = records_to_plain(context.state)
    reply = None
    for attempt in range(3):
        conn = connect_or_start(wdir)
        if conn is None:
            return None
        try:
            with conn:
                send_frame(conn, req)
                reply = recv_frame(conn)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            log.warning("fedsafe: the warm worker of %s failed during a %s message (%r); restarting it", wdir, op,
                        exc)
            stop_worker(wdir, signal.SIGKILL)
            reply = None
            continue
        if reply.get("restart"):  # a worker of other fedsafe code: replace it
            log.warning("fedsafe: %s; restarting it", reply["reason"])
            stop_worker(wdir, signal.SIGKILL)
            _wait_gone(wdir)
            reply = None
            continue
        break
    if reply is None:
        raise FedsafeError(f"the warm worker of {wdir} failed three times on this {op} message; see "
                           f"{wdir / LOG_NAME}")
    if not reply["ok"]:
        raise FedsafeError(f"warm worker refused the {op} message: {reply['reason']}")
    if reply.get("config_hash") != req["config_hash"]:
        raise FedsafeError("the warm worker answered for another experiment config")
    if op == "train":
        for name, record in plain_to_records(reply["state"]).items():
            context.state[name] = record
    out = Message(plain_to_records(reply["content"]), reply_to=message)
    _trace.mark("forward_end", mid=mid)
    return out


def _wait_gone(wdir: Path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while worker_pid(wdir) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------
# Launcher: the worker next to a SuperNode
# ------------------------------------------------------------------------------------------------

def write_settings(wdir: Path, config: str | Path | None, owner_pid: int, threads: int | None = None) -> dict:
    """Record the SuperNode that owns the worker, the model it preloads (pinned) and its torch threads."""
    settings = {"owner_pid": owner_pid, "owner_start": _proc_start_ticks(owner_pid), "config": None,
                "threads": threads}
    if config:
        from fedsafe.config import load_config

        cfg = load_config(config)
        settings.update(config=str(Path(config).resolve()), model_key=model_key(cfg), model_name=cfg.model.name)
    tmp = wdir / (SETTINGS_NAME + ".tmp")
    tmp.write_text(json.dumps(settings))
    tmp.replace(wdir / SETTINGS_NAME)
    return settings


def launch(supernode_args: list[str], wdir: Path, config: str | Path | None = None, env: dict | None = None,
           threads: int | None = None):
    """Start the warm worker, then become the SuperNode (``exec``): the worker's owner is this pid."""
    wdir = private_dir(wdir)
    stop_worker(wdir, signal.SIGKILL)  # a worker of an earlier SuperNode in this directory
    write_settings(wdir, config, os.getpid(), threads)
    logf = open(wdir / LOG_NAME, "ab")
    subprocess.Popen([sys.executable, "-m", "fedsafe.engines.flower.worker", "serve", "--dir", str(wdir)],
                     stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=_worker_env(env),
                     close_fds=True)
    logf.close()
    os.execvpe(supernode_args[0], supernode_args, env if env is not None else os.environ)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedsafe.engines.flower.worker",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve", help="run the worker of DIR")
    p_serve.add_argument("--dir", required=True, type=Path)
    p_launch = sub.add_parser("launch", help="start the worker of DIR, then exec the SuperNode command after --")
    p_launch.add_argument("--dir", required=True, type=Path)
    p_launch.add_argument("--config", default=None, help="preload this experiment's base model (and pin it)")
    p_launch.add_argument("--threads", type=int, default=None, help="torch threads of the worker")
    p_launch.add_argument("supernode", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.dir.resolve())
    else:
        cmd = [a for a in args.supernode if a != "--"]
        if not cmd:
            parser.error("launch needs the SuperNode command after --")
        launch(cmd, args.dir, args.config, threads=args.threads)


if __name__ == "__main__":
    main()
