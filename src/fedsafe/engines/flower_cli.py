"""``fedsafe flower ...``: run an experiment as a real Flower deployment (SuperLink, SuperNodes, flwr run)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import typer

flower_app = typer.Typer(no_args_is_help=True, help="Flower deployment helpers: app, superlink, supernode, "
                                                    "submit, local.")


@flower_app.command("app")
def app_command(app_dir: Path = typer.Argument(..., help="directory to write the Flower app into"),
                config: Optional[Path] = typer.Option(None, "--config", "-c", help="experiment YAML"),
                set_: list[str] = typer.Option([], "--set", help="override a field: --set fl.rounds=5")) -> None:
    """Write a Flower app (pyproject.toml + module) that runs CONFIG with fedsafe on a SuperLink."""
    from fedsafe.config import load_config
    from fedsafe.engines.flower_deploy import write_app

    cfg = load_config(config, set_)
    path = write_app(app_dir, cfg)
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
                      port: int = typer.Option(9094, help="local port of the SuperNode's runtime API")) -> None:
    """Start a SuperNode that holds one fedsafe client."""
    from fedsafe.engines.flower_deploy import flower_env, supernode_command as cmd

    args = cmd(superlink, port, partition_id=partition_id, client_id=client_id,
               data_path=str(data_path) if data_path else None)
    os.execvpe(args[0], args, flower_env(os.environ.get("FLWR_HOME")))


@flower_app.command("submit")
def submit_command(app_dir: Path = typer.Argument(..., help="app written by `fedsafe flower app`"),
                   superlink: str = typer.Option(..., help="SuperLink address HOST:PORT"),
                   set_: list[str] = typer.Option([], "--set", help="override a field of the embedded config"),
                   resume: Optional[str] = typer.Option(None, help="continue this run directory (server side)")) -> None:
    """``flwr run`` the app on a SuperLink and stream its logs."""
    from fedsafe.engines.flower_deploy import flower_env, flwr_run_command, write_connection

    with tempfile.TemporaryDirectory(prefix="fedsafe-flwr-") as home:
        write_connection(home, superlink)
        raise typer.Exit(subprocess.call(flwr_run_command(app_dir, set_, resume), env=flower_env(home)))


@flower_app.command("local")
def local_command(config: Optional[Path] = typer.Argument(None, help="experiment YAML"),
                  set_: list[str] = typer.Option([], "--set", help="override a field: --set fl.rounds=5"),
                  timeout_s: float = typer.Option(3600, help="stop everything after this long")) -> None:
    """Run CONFIG as a deployment on this machine: a SuperLink and one SuperNode per client on 127.0.0.1."""
    from fedsafe.config import load_config
    from fedsafe.engines.flower_deploy import LocalFederation, write_app

    cfg = load_config(config, set_)
    with LocalFederation(cfg.num_clients) as fed:
        app = write_app(fed.workdir / "app", cfg)
        run_dir = fed.submit(app, timeout_s=timeout_s, on_line=lambda line: typer.echo(line, nl=False))
    print(run_dir)
