"""``fedsafe flower ...``: run an experiment as a real Flower deployment (SuperLink, SuperNodes, flwr run)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import typer

flower_app = typer.Typer(no_args_is_help=True, help="Flower deployment helpers: keys, app, superlink, supernode, "
                                                    "submit, local.")


@flower_app.command("keys")
def keys_command(out: Path = typer.Option(..., "--out", "-o", help="directory for clients.ctx and server.ctx"),
                 config: Optional[Path] = typer.Option(None, "--config", "-c",
                                                       help="experiment YAML (its secure_agg.ckks parameters)"),
                 set_: list[str] = typer.Option([], "--set", help="override a field, e.g. "
                                                                  "--set secure_agg.ckks.global_scale=1e12"),
                 force: bool = typer.Option(False, "--force", help="replace an existing key set")) -> None:
    """Make the CKKS keys of a secure_agg deployment: clients.ctx (secret, for SuperNodes) and server.ctx (public)."""
    from fedsafe.config import load_config
    from fedsafe.defenses.he_keys import context_summary, write_key_files

    cfg = load_config(config, set_)
    if not cfg.secure_agg.enabled:
        typer.echo("note: this config has secure_agg.enabled=false; set it to true for the run that uses these keys",
                   err=True)
    keys = write_key_files(cfg.secure_agg.ckks, out, overwrite=force)
    typer.echo(f"key set {keys.key_id} (CKKS {context_summary(cfg.secure_agg.ckks)}, "
               f"{cfg.secure_agg.ckks.security_label()}):\n"
               f"  {keys.clients}  SECRET (mode 0600): copy to every SuperNode only, "
               f"`fedsafe flower supernode ... --he-context {keys.clients.name}`\n"
               f"  {keys.server}  public: for the server, `fedsafe flower app ... --he-context {keys.server}`")


@flower_app.command("app")
def app_command(app_dir: Path = typer.Argument(..., help="directory to write the Flower app into"),
                config: Optional[Path] = typer.Option(None, "--config", "-c", help="experiment YAML"),
                set_: list[str] = typer.Option([], "--set", help="override a field: --set fl.rounds=5"),
                he_context: Optional[Path] = typer.Option(None, "--he-context", help="secure_agg: the server's "
                                                          "public server.ctx of `fedsafe flower keys` (a path on "
                                                          "the server machine)")) -> None:
    """Write a Flower app (pyproject.toml + module) that runs CONFIG with fedsafe on a SuperLink."""
    from fedsafe.config import load_config
    from fedsafe.engines.flower_deploy import write_app

    cfg = load_config(config, set_)
    if not cfg.secure_agg.enabled:
        if he_context is not None:
            typer.echo("note: --he-context is ignored: the config has secure_agg.enabled=false", err=True)
    elif he_context is None:
        typer.echo("note: secure_agg.enabled: pass --he-context server.ctx here or to `fedsafe flower submit`",
                   err=True)
    elif he_context.exists():  # refuse the secret file here already, on the author's machine
        from fedsafe.defenses.he_keys import SERVER, read_key_file

        read_key_file(he_context, SERVER, cfg.secure_agg.ckks, who="--he-context")
    path = write_app(app_dir, cfg, he_context)
    typer.echo(f"wrote {path / 'pyproject.toml'} ({cfg.num_clients} clients: start one SuperNode per client with "
               f"partition-id 0..{cfg.num_clients - 1}); submit with `fedsafe flower submit {path} "
               "--superlink HOST:PORT`")


@flower_app.command("superlink")
def superlink_command(host: str = typer.Option("0.0.0.0", help="address to listen on"),
                      port: int = typer.Option(9093, help="HTTP port (Fleet, Control and Runtime APIs)")) -> None:
    """Start a SuperLink without TLS (trusted networks only; for TLS run flower-superlink with its TLS flags)."""
    from fedsafe.engines.flower_deploy import flower_env, superlink_command as cmd

    args = cmd(port, host)
    os.execvpe(args[0], args, flower_env(os.environ.get("FLWR_HOME")))


@flower_app.command("supernode")
def supernode_command(superlink: str = typer.Option(..., help="SuperLink address HOST:PORT"),
                      partition_id: Optional[int] = typer.Option(None, help="which client of the config (0-based)"),
                      client_id: Optional[str] = typer.Option(None, help="or the client id, e.g. client_03"),
                      data_path: Optional[Path] = typer.Option(None, help="train on this local file instead of "
                                                                          "the config's partition"),
                      port: int = typer.Option(9094, help="local port of the SuperNode's runtime API"),
                      he_context: Optional[Path] = typer.Option(None, "--he-context", help="secure_agg: the "
                                                                "clients' secret clients.ctx of `fedsafe flower "
                                                                "keys`")) -> None:
    """Start a SuperNode that holds one fedsafe client."""
    from fedsafe.engines.flower_deploy import flower_env, supernode_command as cmd

    if he_context is not None:  # a wrong file fails here, not in the first round
        from fedsafe.defenses.he_keys import CLIENTS, read_key_file

        read_key_file(he_context, CLIENTS, who="--he-context")
    args = cmd(superlink, port, partition_id=partition_id, client_id=client_id,
               data_path=str(data_path) if data_path else None, he_context=str(he_context) if he_context else None)
    os.execvpe(args[0], args, flower_env(os.environ.get("FLWR_HOME")))


@flower_app.command("submit")
def submit_command(app_dir: Path = typer.Argument(..., help="app written by `fedsafe flower app`"),
                   superlink: str = typer.Option(..., help="SuperLink address HOST:PORT"),
                   set_: list[str] = typer.Option([], "--set", help="override a field of the embedded config"),
                   resume: Optional[str] = typer.Option(None, help="continue this run directory (server side)"),
                   he_context: Optional[str] = typer.Option(None, "--he-context", help="secure_agg: the server's "
                                                            "public server.ctx, a path on the server machine")) -> None:
    """``flwr run`` the app on a SuperLink and stream its logs."""
    from fedsafe.engines.flower_deploy import flower_env, flwr_run_command, write_connection

    with tempfile.TemporaryDirectory(prefix="fedsafe-flwr-") as home:
        write_connection(home, superlink)
        raise typer.Exit(subprocess.call(flwr_run_command(app_dir, set_, resume, he_context=he_context),
                                         env=flower_env(home)))


@flower_app.command("local")
def local_command(config: Optional[Path] = typer.Argument(None, help="experiment YAML"),
                  set_: list[str] = typer.Option([], "--set", help="override a field: --set fl.rounds=5"),
                  timeout_s: float = typer.Option(3600, help="stop everything after this long")) -> None:
    """Run CONFIG as a deployment on this machine: a SuperLink and one SuperNode per client on 127.0.0.1."""
    from fedsafe.config import load_config
    from fedsafe.engines.flower_deploy import LocalFederation, write_app

    cfg = load_config(config, set_)
    fed = LocalFederation(cfg.num_clients)
    server_ctx = None
    if cfg.secure_agg.enabled:  # a key set for this run: the nodes get clients.ctx, the ServerApp server.ctx
        from fedsafe.defenses.he_keys import write_key_files

        keys = write_key_files(cfg.secure_agg.ckks, fed.workdir / "keys")
        fed.he_context, server_ctx = keys.clients, keys.server
    with fed:
        app = write_app(fed.workdir / "app", cfg, server_ctx)
        run_dir = fed.submit(app, timeout_s=timeout_s, on_line=lambda line: typer.echo(line, nl=False))
    print(run_dir)
