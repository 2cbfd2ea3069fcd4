"""The ``fedsafe`` command line: run, info, report, gate, eval, generate, grid, cache."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from fedsafe.errors import FedsafeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="fedsafe: secure federated fine-tuning of LLMs (safety attacks, privacy, secure aggregation).")
console = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)])
    for noisy in ("transformers", "urllib3", "datasets", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def fedsafe_version() -> str:
    """The installed fedsafe version (the package metadata), or 'unknown' from a bare source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedsafe")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        print(f"fedsafe {fedsafe_version()}")
        raise typer.Exit(0)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print fedsafe's version and exit")) -> None:
    _setup_logging(verbose)


# top-level keys of a grid file (fedsafe.grid.GridSpec) that an experiment file never has
_GRID_KEYS = ("matrix", "settings", "base", "share_training")


def refuse_grid_file(path: Path) -> None:
    """A grid file given to ``fedsafe run`` is named as one, with the command that runs it."""
    import yaml

    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # load_config reports these, naming the file
    if isinstance(data, dict) and any(k in data for k in _GRID_KEYS):
        keys = ", ".join(f"{k}:" for k in _GRID_KEYS if k in data)
        raise FedsafeError(f"{path} is a grid file (it has {keys}), a matrix of experiments: run it with "
                           f"`fedsafe grid {path}` (`fedsafe grid {path} --dry-run` lists its settings)")


def print_config_help(prefix: str = "") -> None:
    """Every config field under ``prefix`` as 'path  default  description' (``fedsafe run --help-config``)."""
    from pydantic_core import PydanticUndefined

    from fedsafe.config import known_field_paths

    rows = []
    for path, info in known_field_paths().items():
        if prefix and not (path == prefix or path.startswith(prefix + ".")):
            continue
        if info.default is not PydanticUndefined:
            default = repr(info.default)
        elif info.default_factory is not None:
            default = "(section)" if "." not in path or hasattr(info.default_factory, "model_fields") else "..."
        else:
            default = "(required)"
        rows.append((path, default if len(default) <= 30 else default[:27] + "...", info.description or ""))
    if not rows:
        raise FedsafeError(f"--help-config {prefix}: no such field or section")
    width = max(len(r[0]) for r in rows)
    for path, default, description in rows:
        print(f"{path:<{width}}  {default:<12}  {description}")


@app.command()
def run(config: Optional[Path] = typer.Argument(None, help="experiment YAML (default: the quickstart)"),
        set_: list[str] = typer.Option([], "--set", help="override a field: --set fl.rounds=5 (repeatable)"),
        resume: Optional[Path] = typer.Option(None, "--resume", help="continue an interrupted run directory"),
        engine: str = typer.Option("inprocess", "--engine", help="inprocess | flower"),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="repeat the run per seed (3 means seeds 0,1,2; "
                                                                  "or a list such as 0,4,7): a grid directory "
                                                                  "with means and 95% intervals"),
        no_progress: bool = typer.Option(False, "--no-progress", help="hide progress bars"),
        gate_exit: bool = typer.Option(False, "--gate-exit", help="exit 1 when the config's release gate "
                                                                  "(gate: {policy: ...}) fails, 0 when it passes"),
        help_config: bool = typer.Option(False, "--help-config", help="list every config field (path, default, "
                                                                      "description) and exit; with a config "
                                                                      "argument such as fl, only that section"),
        ) -> None:
    """Run an experiment from a config file (or the quickstart) and print its run directory."""
    from fedsafe.config import load_config, quickstart_path

    if help_config:  # `fedsafe run --help-config [SECTION]`: the argument names a section, not a file
        print_config_help(str(config) if config is not None else "")
        return
    if config is not None and config.is_file():
        refuse_grid_file(config)
    if resume is not None:
        if config is not None or set_ or seeds is not None:
            raise FedsafeError("--resume continues a run with its saved config; do not pass a config, --set "
                               "or --seeds (a repeated run is a grid: fedsafe grid ... --resume GRID_DIR)")
        cfg = None
    else:
        cfg = load_config(config if config is not None else quickstart_path(), set_)
    if cfg is not None and (seeds is not None or cfg.seeds is not None):
        from fedsafe.pipeline import check_inputs

        check_inputs(cfg)  # every input file, before the grid directory is made (a run checks its own)
        # one setting repeated per seed: a grid of one setting (summary.csv, intervals, resumable)
        from fedsafe.grid import GridSpec, parse_seeds, print_results, run_grid

        if engine != "inprocess":
            raise FedsafeError(f"--seeds / seeds: runs the in-process engine only, not --engine {engine}")
        # grid.yaml then holds the whole experiment: `fedsafe grid GRID_DIR/grid.yaml --resume GRID_DIR` continues it
        spec = GridSpec(name=cfg.name, output_dir=cfg.output_dir, config=cfg.model_dump(mode="json"))
        grid_dir = run_grid(spec, [(cfg.name, cfg)], progress=not no_progress,
                            seeds=parse_seeds(seeds) if seeds is not None else None)
        print_results(grid_dir, f"{cfg.name}: seeds {', '.join(map(str, parse_seeds(seeds) if seeds else cfg.seeds))}")
        print(grid_dir)
        from fedsafe.rundir import grid_run_dirs

        _refuse_untrained(grid_run_dirs(grid_dir))
        if gate_exit:
            _gate_exit(grid_run_dirs(grid_dir))
        return
    if engine == "flower":
        from fedsafe.engines.flower.simulation import run_flower_experiment

        result = run_flower_experiment(cfg, resume=resume, progress=not no_progress)
    elif engine == "inprocess":
        from fedsafe.pipeline import run_experiment

        result = run_experiment(cfg, resume=resume, progress=not no_progress)
    else:
        raise FedsafeError(f"--engine {engine!r} is not one of inprocess, flower")
    print(result.run_dir)
    _refuse_untrained([Path(result.run_dir)])
    if gate_exit:
        _gate_exit([Path(result.run_dir)])


def _refuse_untrained(run_dirs: list[Path]) -> None:
    """Exit non-zero (2) when every round of a run was skipped: its final adapter is the initial one."""
    from fedsafe.rundir import RunDir

    for run_dir in run_dirs:
        rounds = RunDir(run_dir).records("round")
        if rounds and all(r.get("skipped") for r in rounds):
            reasons = sorted({str(r["skipped"]) for r in rounds})
            raise FedsafeError(f"every round of {run_dir} was skipped, so it trained nothing (its final adapter is "
                               f"the initial one): {'; '.join(reasons)[:400]}")


def _gate_exit(run_dirs: list[Path]) -> None:
    """--gate-exit: exit 1 unless every run's gate.json passed (2 when a run has no gate verdict)."""
    from fedsafe.evaluation.gate.verdict import GATE_JSON, run_gate_exit_code

    codes = [run_gate_exit_code(d) for d in run_dirs]
    if not codes or 2 in codes:
        missing = [str(d) for d, c in zip(run_dirs, codes) if c == 2] or ["(no runs)"]
        raise FedsafeError(f"--gate-exit: no gate verdict ({GATE_JSON}) in {', '.join(missing)}; enable the "
                           f"gate in the config (gate: {{policy: gate.yaml}})")
    if any(codes):
        raise typer.Exit(1)


@app.command()
def gate(target: Path = typer.Argument(..., metavar="ADAPTER_OR_RUN_DIR",
                                       help="a PEFT adapter, or a run directory (its post-hoc adapter, else final)"),
         policy: Path = typer.Option(..., "--policy", help="release policy YAML (see configs/gate.yaml)"),
         json_out: Optional[Path] = typer.Option(None, "--json", help="write the JSON verdict here"),
         strict: bool = typer.Option(False, "--strict", help="pass a metric only when its whole 95% interval "
                                                             "lies on the passing side"),
         reference: Optional[str] = typer.Option(None, "--reference", help="helpfulness reference: an adapter / "
                                                                           "run directory, or base"),
         model: Optional[str] = typer.Option(None, "--model", help="base model of a bare adapter (default: the "
                                                                   "run's config.yaml)"),
         no_progress: bool = typer.Option(False, "--no-progress", help="hide progress bars")) -> None:
    """Release gate: evaluate an adapter against a policy; exit 0 on PASS, 1 on FAIL, 2 on bad input."""
    from fedsafe.evaluation.gate.verdict import gate_command

    code = gate_command(target, policy, json_out=json_out, strict=strict, reference=reference, model_name=model,
                        progress=not no_progress)
    raise typer.Exit(code)


@app.command()
def info(json_out: bool = typer.Option(False, "--json", help="the full dump: every installed package, the lock, "
                                                             "the device")) -> None:
    """Print fedsafe's version, the base model and where it lives, the device, the cache and the data directory."""
    import json

    from fedsafe.models import EMBEDDED_ID, cache_dir
    from fedsafe.rundir import environment_info

    env = environment_info()
    model_dir = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    cached = (model_dir / "config.json").exists()
    data_dir = Path("..") / "shared" / "data"
    env["cache_dir"] = str(cache_dir())
    env["embedded_cached"] = cached
    env["base_model"] = {"name": EMBEDDED_ID, "local_path": str(model_dir) if cached else None}
    env["data_dir"] = {"path": str(data_dir.resolve()), "found": data_dir.is_dir()}
    if json_out:
        print(json.dumps(env, indent=2))
        return
    packages = env["packages"]
    if env.get("cuda_device"):
        device = f"cuda ({env['cuda_device']})"
    else:
        device = f"cpu ({env['cpu_count']} cores, torch uses {env['torch_threads']} threads)"
    where = (str(model_dir) if cached else f"not yet dequantised; the first run writes it to {model_dir}")
    lines = [("fedsafe", f"{packages.get('fedsafe') or fedsafe_version()} (python {env['python']}, "
                         f"torch {packages.get('torch')}, transformers {packages.get('transformers')}, "
                         f"peft {packages.get('peft')})"),
             ("base model", f"{EMBEDDED_ID} (model.name: embedded, shipped in the wheel)"),
             ("local path", where),
             ("device", device),
             ("cache dir", f"{env['cache_dir']} (FEDSAFE_CACHE)"),
             ("data dir", f"{data_dir} " + ("found" if data_dir.is_dir() else
                                            "not found (configs/demo.yaml and the paper configs read it; the "
                                            "quickstart does not)")),
             ("lock", _lock_line(env.get("lock")))]
    for key, value in lines:
        print(f"{key + ':':<12} {value}")
    print("(fedsafe info --json: every package and the full environment)")


def _lock_line(lock) -> str:
    if not isinstance(lock, dict):
        return str(lock)
    return ", ".join(f"{k} {v}" for k, v in lock.items() if not isinstance(v, (dict, list)))[:120] or "-"


@app.command()
def push(target: Path = typer.Argument(..., metavar="ADAPTER_OR_RUN_DIR",
                                       help="an adapter directory, or a run directory (its post-hoc adapter, else "
                                            "final)"),
         repo_id: str = typer.Argument(..., help="Hugging Face Hub repository, e.g. you/smollm2-fedsafe-lora"),
         private: bool = typer.Option(False, "--private", help="create the repository as private")) -> None:
    """Upload an adapter (model card refreshed with the run's results) to the Hugging Face Hub."""
    from fedsafe.hub import push_adapter

    print(push_adapter(target, repo_id, private=private))


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run directory")) -> None:
    """Write report.md and report.html (plots inline) for a run directory."""
    from fedsafe.report import write_report
    from fedsafe.rundir import RunDir

    if not (run_dir / "grid.yaml").exists():  # a grid directory has no config.yaml of its own
        RunDir.open(run_dir)
    md, html = write_report(run_dir)
    print(md)
    print(html)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``kill``, a container stop), raised in the main thread like Ctrl-C."""


_SIGNALLED: list[int] = []  # click may turn the exception into a plain KeyboardInterrupt: remember the signal


def _on_sigterm(signum, frame) -> None:
    _SIGNALLED.append(signum)
    raise Terminated()


def main() -> None:
    """Console entry point: user errors print one clear message and exit 2; SIGTERM and Ctrl-C say what was
    kept and how to continue."""
    import signal

    _register_optional_commands()
    _SIGNALLED.clear()
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding application): leave its handler alone
        pass
    try:
        _run_app()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_app() -> None:
    """``app()`` with the console script's handling of user errors and interruptions."""
    try:
        app()
    except FedsafeError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        sys.exit(2)
    except OSError as exc:  # a full disk, a read-only file system, a file that cannot be read or written
        console.print(f"[bold red]error:[/] {escape(_os_error_message(exc))}", soft_wrap=True, highlight=False)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        _exit_interrupted(isinstance(exc, Terminated))
    except SystemExit as exc:  # typer turns Ctrl-C (and our SIGTERM) into exit status 130 before we see it
        if exc.code == 130 or _SIGNALLED:
            _exit_interrupted(False)
        raise


def _exit_interrupted(terminated: bool) -> None:
    terminated = terminated or bool(_SIGNALLED)
    console.print(f"[yellow]{escape(_interrupted_message(terminated))}[/]", soft_wrap=True, highlight=False)
    sys.exit(143 if terminated else 130)


def _interrupted_message(terminated: bool) -> str:
    """What survives an interruption and how to continue: the run's finished rounds, the generated data."""
    from fedsafe.rundir import RunDir

    what = "terminated (SIGTERM)" if terminated else "interrupted"
    run_dir = RunDir.current
    if run_dir is not None:
        kept = f"the finished rounds of {run_dir} are saved; continue with `fedsafe run --resume {run_dir}`"
    else:
        kept = "finished rounds are saved; continue with `fedsafe run --resume RUN_DIR`"
    return (f"{what}: {kept}. Generated data (attack data, responses) is cached batch by batch: running the "
            "same command again continues it")


def _os_error_message(exc: OSError) -> str:
    """One line for an OSError: the path, the reason and, when a run was writing, that its checkpoints are
    intact and how to continue it."""
    import errno

    from fedsafe.rundir import RunDir

    what = f"{exc.filename}: " if exc.filename else ""
    text = f"{what}{exc.strerror or exc}"
    run_dir = RunDir.current
    if exc.errno not in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG) or run_dir is None:
        return text
    grid = run_dir.parent.parent if run_dir.parent.name == "runs" else None
    if grid is not None and (grid / "grid.yaml").exists():
        how = f"fedsafe grid {grid / 'grid.yaml'} --resume {grid}"
    else:
        how = f"fedsafe run --resume {run_dir}"
    fix = "free space" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "make it writable"
    return (f"could not write {text}. The checkpoints of {run_dir} are intact (each is written whole, then "
            f"renamed; the round in progress is redone); {fix} and continue with `{how}`")


def _register_optional_commands() -> None:
    """Mount sub-commands whose modules exist (generate, eval, grid, cache, attack)."""
    import importlib

    for module, attr, name in (("fedsafe.data.datagen", "generate_app", "generate"),
                               ("fedsafe.evaluation.cli", "eval_app", "eval"),
                               ("fedsafe.grid", "grid_command", "grid"),
                               ("fedsafe.cache_cli", "cache_app", "cache"),
                               ("fedsafe.attacks.privacy_extraction.cli", "attack_app", "attack"),
                               ("fedsafe.engines.flower.cli", "flower_app", "flower")):
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=name)
        else:
            app.command(name=name)(obj)


if __name__ == "__main__":
    main()
