"""``fedsafe flower ...``: run an experiment as a real Flower deployment (SuperLink, SuperNodes, flwr run)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import typer

flower_app = typer.Typer(no_args_is_help=True, help="Flower deployment helpers: keys, certs, app, superlink, "
                                                    "register, supernode, submit, local.")

INSECURE_WARNING = ("WARNING: plain text (--insecure): updates travel unencrypted and any process that reaches the "
                    "SuperLink can join as a SuperNode; use `fedsafe flower certs` and TLS outside a trusted network")
CONTROL_ADDRESS = "127.0.0.1:9091"  # the Control API of `fedsafe flower superlink` (default), on the server machine
CONTROL_HELP = ("the SuperLink's Control API HOST:PORT (default: this machine's, as `fedsafe flower superlink` "
                "serves it; from elsewhere, tunnel to it: ssh -L 9091:127.0.0.1:9091 SERVER); not the SuperNodes' "
                "Fleet port")
UNAUTHENTICATED_CONTROL = (
    "the Control API (register nodes, list nodes and runs, submit runs: code the SuperLink executes) and the Runtime "
    "API have no authentication in Flower 1.41 without Flower Enterprise (its only account login is OIDC, `flwr.ee`), "
    "and Flower's CLI cannot present a client certificate; a non-loopback --control-host lets anyone who reaches it "
    "register a node of their own and run code on this machine")


def _tls_choice(insecure: bool, given: bool, what: str) -> None:
    """Plain text only when asked for (then a warning); TLS files and --insecure together are a mistake."""
    if insecure and given:
        raise typer.BadParameter(f"--insecure and {what} exclude each other")
    if not insecure and not given:
        raise typer.BadParameter(f"give {what} (from `fedsafe flower certs`), or --insecure for plain text")
    if insecure:
        typer.echo(INSECURE_WARNING, err=True)


@flower_app.command("certs")
def certs_command(out: Path = typer.Option(..., "--out", "-o", help="directory for the CA, server and node keys"),
                  nodes: int = typer.Option(2, "--nodes", min=1, help="how many SuperNode key pairs to make"),
                  host: list[str] = typer.Option([], "--host", help="a name or IP address the SuperLink is reached "
                                                                   "at (repeatable; localhost and 127.0.0.1 are "
                                                                   "always included)")) -> None:
    """Make a test CA, a SuperLink TLS certificate and SuperNode key pairs (trials; production: your own CA)."""
    from fedsafe.engines.flower.deploy import write_certs

    certs = write_certs(out, nodes, host)
    typer.echo(f"wrote {out}:\n"
               f"  {certs.ca}  the CA certificate (public): for every SuperNode (--root-certificates), "
               "`register` and `submit`\n"
               f"  {certs.superlink_dir}/  the SuperLink's only: ca.crt, server.pem, server.key "
               f"(`fedsafe flower superlink --certs {certs.superlink_dir}`)\n"
               f"  {certs.ca_key}  SECRET, the CA's signing key: keep it off the SuperLink (offline); whoever holds "
               "it can mint a server certificate\n"
               f"  {certs.nodes[0][0].parent}/node0.key .. node{nodes - 1}.key  SECRET, one per SuperNode "
               "(--auth-key), to that node only\n"
               f"  {certs.nodes[0][0].parent}/node0.pub .. node{nodes - 1}.pub  register each on the server "
               f"machine: `fedsafe flower register {certs.nodes[0][1]} --root-certificates {certs.ca}`")


@flower_app.command("keys")
def keys_command(out: Path = typer.Option(..., "--out", "-o", help="directory for clients.ctx and server.ctx"),
                 config: Optional[Path] = typer.Option(None, "--config", "-c",
                                                       help="experiment YAML (its secure_agg.ckks parameters)"),
                 set_: list[str] = typer.Option([], "--set", help="override a field, e.g. "
                                                                  "--set secure_agg.ckks.global_scale=1e12"),
                 force: bool = typer.Option(False, "--force", help="replace an existing key set")) -> None:
    """Make the CKKS keys of a secure_agg deployment: clients.ctx (secret, for SuperNodes) and server.ctx (public)."""
    from fedsafe.config import load_config
    from fedsafe.plugins import deployment_keys

    cfg = load_config(config, set_)
    spec = deployment_keys(cfg)  # the key parameters of the plug-in that encrypts updates (secure_agg.ckks)
    if spec is None:
        raise typer.BadParameter("no registered plug-in of this config uses deployment keys")
    if not spec.enabled:
        typer.echo(f"note: this config has {spec.section}.enabled=false; set it to true for the run that uses these "
                   "keys", err=True)
    keys = spec.keyring.write(spec.params, out, overwrite=force)
    typer.echo(f"key set {keys.key_id} ({spec.keyring.describe(spec.params)}):\n"
               f"  {keys.clients}  SECRET (mode 0600): copy to every SuperNode only, "
               f"`fedsafe flower supernode ... --he-context {keys.clients.name}`\n"
               f"  {keys.server}  public: for the server, `fedsafe flower app ... --he-context {keys.server}`")


def check_deployable(cfg) -> None:
    """Refuse at once what cannot run on separate machines (the plug-ins' checks with a Flower deployment)."""
    from fedsafe.errors import ConfigError
    from fedsafe.plugins import check_config

    try:
        check_config(cfg, engine_may_be_flower=True)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


@flower_app.command("app")
def app_command(app_dir: Path = typer.Argument(..., help="directory to write the Flower app into"),
                config: Optional[Path] = typer.Option(None, "--config", "-c", help="experiment YAML"),
                set_: list[str] = typer.Option([], "--set", help="override a field: --set fl.rounds=5"),
                he_context: Optional[Path] = typer.Option(None, "--he-context", help="secure_agg: the server's "
                                                          "public server.ctx of `fedsafe flower keys` (a path on "
                                                          "the server machine)")) -> None:
    """Write a Flower app (pyproject.toml + module) that runs CONFIG with fedsafe on a SuperLink."""
    from fedsafe.config import load_config
    from fedsafe.engines.flower.deploy import write_app

    from fedsafe.engines.flower.node import encrypted_keys

    cfg = load_config(config, set_)
    check_deployable(cfg)
    spec = encrypted_keys(cfg)
    if spec is None:
        if he_context is not None:
            typer.echo("note: --he-context is ignored: no plug-in of the config encrypts updates (secure_agg)",
                       err=True)
    elif he_context is None:
        typer.echo(f"note: {spec.section}.enabled: pass --he-context server.ctx here or to `fedsafe flower submit`",
                   err=True)
    elif he_context.exists():  # refuse the secret file here already, on the author's machine
        spec.keyring.read(he_context, "server", spec.params, who="--he-context")
    path = write_app(app_dir, cfg, he_context)
    typer.echo(f"wrote {path / 'pyproject.toml'} ({cfg.num_clients} clients: start one SuperNode per client with "
               f"partition-id 0..{cfg.num_clients - 1}); submit with `fedsafe flower submit {path} "
               "--superlink HOST:PORT`")


def superlink_certs(certs: Path):
    """The SuperLink's TLS files in ``certs`` (or its ``superlink/``); refuses a directory holding other secrets."""
    from fedsafe.engines.flower.deploy import Certs

    if (certs / "superlink" / "server.pem").exists():  # the output directory of `fedsafe flower certs`
        certs = certs / "superlink"
    files = Certs(certs / "ca.crt", certs / "server.pem", certs / "server.key", [])
    for path in (files.ca, files.server_cert, files.server_key):
        if not path.exists():
            raise typer.BadParameter(f"--certs {certs}: {path.name} is missing (make it with `fedsafe flower certs`)")
    foreign = sorted(p.name for p in certs.iterdir() if p.name == "ca.key" or re.fullmatch(r"node\d+\.key", p.name))
    if foreign:
        raise typer.BadParameter(f"--certs {certs} also holds {', '.join(foreign)}: the CA's signing key and the "
                                 "SuperNodes' private keys must not lie where the SuperLink reads (whoever reads "
                                 "its files could mint certificates or act as a node); move them away, or make "
                                 "new ones with `fedsafe flower certs` (ca/ and nodes/ apart from superlink/)")
    return files


@flower_app.command("superlink")
def superlink_command(host: str = typer.Option("0.0.0.0", help="address of the Fleet API, the only API "
                                               "SuperNodes need; the only one served there"),
                      port: int = typer.Option(9093, help="port of the Fleet API"),
                      control_host: str = typer.Option("127.0.0.1", "--control-host", help="address of the "
                                                       "Control API (register, submit, list) and the Runtime API "
                                                       "(SuperExec); loopback unless "
                                                       "--i-understand-unauthenticated-control"),
                      control_port: int = typer.Option(9091, "--control-port", help="port of the Control and "
                                                       "Runtime APIs"),
                      unauthenticated_control: bool = typer.Option(
                          False, "--i-understand-unauthenticated-control",
                          help="allow a non-loopback --control-host although Flower 1.41 cannot authenticate its "
                               "callers: anyone who reaches it can register nodes and run code here"),
                      certs: Optional[Path] = typer.Option(None, "--certs", help="the SuperLink's directory of "
                                                           "`fedsafe flower certs` (its superlink/: ca.crt, "
                                                           "server.pem, server.key): TLS"),
                      node_auth: bool = typer.Option(True, "--node-auth/--no-node-auth", help="with --certs: only "
                                                     "SuperNodes registered with `fedsafe flower register` join"),
                      insecure: bool = typer.Option(False, "--insecure", help="plain text, anyone may join "
                                                    "(trusted networks only)")) -> None:
    """Start a SuperLink: the Fleet API on --host:--port, the Control and Runtime APIs on 127.0.0.1:--control-port;
    TLS and SuperNode authentication with --certs, plain text only with --insecure."""
    from fedsafe.engines.flower.deploy import flower_env, superlink_command as cmd
    from fedsafe.engines.flower.superlink import is_loopback

    _tls_choice(insecure, certs is not None, "--certs")
    if port == control_port:
        raise typer.BadParameter(f"--port and --control-port are both {port}: the Fleet API and the Control API "
                                 "need their own ports")
    if not is_loopback(control_host):
        if not unauthenticated_control:
            raise typer.BadParameter(f"--control-host {control_host} is not a loopback address, and "
                                     f"{UNAUTHENTICATED_CONTROL}. Keep it on 127.0.0.1 and register/submit on "
                                     "the server machine or through an SSH tunnel (ssh -L 9091:127.0.0.1:9091 "
                                     "SERVER), or pass --i-understand-unauthenticated-control on a network where "
                                     "everyone who can reach it is trusted")
        typer.echo(f"WARNING: Control API exposed on {control_host}:{control_port}: {UNAUTHENTICATED_CONTROL}",
                   err=True)
    files = superlink_certs(certs) if certs is not None else None
    args = cmd(port, host, certs=files, node_auth=node_auth, control_port=control_port, control_host=control_host,
               allow_unauthenticated_control=unauthenticated_control)
    typer.echo(f"SuperNodes: --superlink {host}:{port} (Fleet API only); register and submit: --superlink "
               f"{control_host}:{control_port} (Control API)", err=True)
    os.execvpe(args[0], args, flower_env(os.environ.get("FLWR_HOME")))


@flower_app.command("register")
def register_command(public_key: Path = typer.Argument(..., help="a SuperNode's public key (nodeN.pub of "
                                                       "`fedsafe flower certs`)"),
                     superlink: str = typer.Option(CONTROL_ADDRESS, help=CONTROL_HELP),
                     root_certificates: Path = typer.Option(..., "--root-certificates",
                                                            help="the CA of the SuperLink's certificate (ca.crt)"),
                     name: Optional[str] = typer.Option(None, help="a name for the node")) -> None:
    """Let the SuperNode holding this key join (``flwr supernode register`` on a SuperLink with node auth)."""
    from fedsafe.engines.flower.deploy import flower_env, register_node, write_connection

    with tempfile.TemporaryDirectory(prefix="fedsafe-flwr-") as home:
        write_connection(home, superlink, root_certificates=root_certificates)
        node_id = register_node(public_key, flower_env(home), name=name)
    typer.echo(f"registered {public_key} as SuperNode {node_id}")


@flower_app.command("supernode")
def supernode_command(superlink: str = typer.Option(..., help="SuperLink address HOST:PORT"),
                      partition_id: Optional[int] = typer.Option(None, help="which client of the config (0-based)"),
                      client_id: Optional[str] = typer.Option(None, help="or the client id, e.g. client_03"),
                      data_path: Optional[Path] = typer.Option(None, help="train on this local file instead of "
                                                                          "the config's partition"),
                      port: int = typer.Option(9094, help="local port of the SuperNode's runtime API"),
                      he_context: Optional[Path] = typer.Option(None, "--he-context", help="secure_agg: the "
                                                                "clients' secret clients.ctx of `fedsafe flower "
                                                                "keys`"),
                      root_certificates: Optional[Path] = typer.Option(None, "--root-certificates", help="the CA "
                                                                       "of the SuperLink's certificate (TLS)"),
                      auth_key: Optional[Path] = typer.Option(None, "--auth-key", help="this node's private key "
                                                              "(nodeN.key of `fedsafe flower certs`), registered "
                                                              "on the SuperLink"),
                      insecure: bool = typer.Option(False, "--insecure", help="plain text (trusted networks only)"),
                      worker: bool = typer.Option(True, "--worker/--no-worker", help="keep the model loaded in a "
                                                  "warm worker process between rounds (default) instead of "
                                                  "loading it for every message"),
                      worker_dir: Optional[Path] = typer.Option(None, "--worker-dir", help="private directory "
                                                                "(0700) of the warm worker's socket (default: a "
                                                                "new temporary one)"),
                      config: Optional[Path] = typer.Option(None, "--config", "-c", help="load this experiment's "
                                                            "base model in the warm worker at start; runs of "
                                                            "another model are then refused"),
                      threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads of the "
                                                            "warm worker (default: torch's; split the cores when "
                                                            "several SuperNodes share a machine)"),
                      poll: float = typer.Option(0.2, "--poll", min=0.0, help="cap in seconds on the SuperNode's "
                                                 "hard-coded waits (3 s after an empty pull, 0.5 s for a reply); "
                                                 "0 keeps Flower's own timing; raise it for hundreds of nodes")
                      ) -> None:
    """Start a SuperNode that holds one fedsafe client, with a warm worker that keeps the model loaded."""
    from fedsafe.engines.flower.deploy import flower_env, supernode_command as cmd, with_worker

    _tls_choice(insecure, root_certificates is not None, "--root-certificates")
    if he_context is not None:  # a wrong file fails here, not in the first round
        from fedsafe.config import ExperimentConfig
        from fedsafe.plugins import deployment_keys

        spec = deployment_keys(ExperimentConfig())  # no config here: the key parameters are checked per run
        if spec is None:
            raise typer.BadParameter("--he-context: no registered plug-in uses deployment keys")
        spec.keyring.read(he_context, "clients", who="--he-context")
    if config is not None and not worker:
        raise typer.BadParameter("--config preloads the warm worker's model: it needs --worker")
    wdir = None
    if worker:
        from fedsafe.engines.flower.worker import private_dir

        wdir = private_dir(worker_dir)
        typer.echo(f"warm worker: {wdir} (log {wdir / 'worker.log'})", err=True)
    args = cmd(superlink, port, partition_id=partition_id, client_id=client_id,
               data_path=str(data_path) if data_path else None, he_context=str(he_context) if he_context else None,
               root_certificates=root_certificates, auth_key=auth_key, worker_dir=wdir, poll_s=poll)
    if wdir is not None:
        args = with_worker(args, wdir, config, threads)
    os.execvpe(args[0], args, flower_env(os.environ.get("FLWR_HOME")))


@flower_app.command("submit")
def submit_command(app_dir: Path = typer.Argument(..., help="app written by `fedsafe flower app`"),
                   superlink: str = typer.Option(CONTROL_ADDRESS, help=CONTROL_HELP),
                   set_: list[str] = typer.Option([], "--set", help="override a field of the embedded config"),
                   resume: Optional[str] = typer.Option(None, help="continue this run directory (server side)"),
                   he_context: Optional[str] = typer.Option(None, "--he-context", help="secure_agg: the server's "
                                                            "public server.ctx, a path on the server machine"),
                   root_certificates: Optional[Path] = typer.Option(None, "--root-certificates", help="the CA of "
                                                                    "the SuperLink's certificate (TLS)"),
                   insecure: bool = typer.Option(False, "--insecure", help="plain text (trusted networks only)")
                   ) -> None:
    """``flwr run`` the app on a SuperLink and stream its logs."""
    from fedsafe.engines.flower.deploy import flower_env, flwr_run_command, write_connection

    _tls_choice(insecure, root_certificates is not None, "--root-certificates")
    with tempfile.TemporaryDirectory(prefix="fedsafe-flwr-") as home:
        write_connection(home, superlink, root_certificates=root_certificates)
        raise typer.Exit(subprocess.call(flwr_run_command(app_dir, set_, resume, he_context=he_context),
                                         env=flower_env(home)))


@flower_app.command("local")
def local_command(config: Optional[Path] = typer.Argument(None, help="experiment YAML"),
                  set_: list[str] = typer.Option([], "--set", help="override a field: --set fl.rounds=5"),
                  timeout_s: float = typer.Option(3600, help="stop everything after this long"),
                  insecure: bool = typer.Option(False, "--insecure", help="plain text and no node authentication "
                                                "(default: TLS with a fresh test CA, only registered nodes join)"),
                  worker: bool = typer.Option(True, "--worker/--no-worker", help="a warm worker per SuperNode keeps "
                                              "the model loaded between rounds"),
                  poll: float = typer.Option(0.2, "--poll", min=0.0, help="cap in seconds on each SuperNode's "
                                             "hard-coded waits (0: Flower's own 3 s / 0.5 s)")) -> None:
    """Run CONFIG as a deployment on this machine: a SuperLink and one SuperNode per client on 127.0.0.1."""
    from fedsafe.config import dump_config, load_config
    from fedsafe.engines.flower.deploy import LocalFederation, write_app
    from fedsafe.engines.flower.node import encrypted_keys

    cfg = load_config(config, set_)
    check_deployable(cfg)
    if insecure:
        typer.echo(INSECURE_WARNING, err=True)
    # the work directory holds the clients' secret CKKS context, the node keys and the CA: removed on every exit
    fed = LocalFederation(cfg.num_clients, secure=not insecure, warm_worker=worker, poll_s=poll, remove_workdir=True)

    def terminated(signum, frame):  # SIGTERM/SIGHUP unwind like Ctrl-C, so the finally below still runs
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if worker:  # the workers load the base model while the SuperLink and the run start
            fed.worker_config = fed.workdir / "experiment.yaml"
            fed.worker_config.write_text(dump_config(cfg))
        server_ctx = None
        spec = encrypted_keys(cfg)
        if spec is not None:  # a key set for this run: the nodes get clients.ctx, the ServerApp server.ctx
            keys = spec.keyring.write(spec.params, fed.workdir / "keys")
            fed.he_context, server_ctx = keys.clients, keys.server
        with fed:
            try:
                app = write_app(fed.workdir / "app", cfg, server_ctx)
                run_dir = fed.submit(app, timeout_s=timeout_s, on_line=lambda line: typer.echo(line, nl=False))
            except Exception:  # the logs go with the work directory: show their ends first
                for name in ("superlink", "flwr_run"):
                    if tail := fed.log_tail(name):
                        typer.echo(f"--- last lines of {name}.log ---\n{tail}", err=True)
                raise
    finally:
        fed.close()  # idempotent; also covers a failure before `with fed` (keys written, nothing started)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(run_dir)
