"""``fedsafe grid GRID.yaml``: run a matrix of experiment settings and write one combined table and plot.

A grid file holds a base experiment (inline ``config`` and/or a ``base`` YAML file) and a ``matrix`` of
axes; each axis maps a label to overrides (dotted keys, as ``--set``). The settings are the Cartesian
product of the axes (plus any explicit ``settings``)::

    name: attack-vs-defense
    base: ../quickstart.yaml
    matrix:
      scenario:
        no_attack: {roles: [{name: benign, clients: 4, data: [{path: "starter:train"}]}]}
        attack:    {}
      aggregator:
        fedavg: {aggregator.name: fedavg}
        median: {aggregator.name: median}
      defense:
        none:   {posthoc.enabled: false}
        level1: {posthoc.enabled: true, posthoc.level: 1}

Shared parts are computed once: settings that differ only in ``posthoc`` share one federated training
run (the run without a defense is the "attack" row of the run with one; other defense levels start
from its final adapter), the embedded model and generated data come from fedsafe's caches, and every
run's generations are cached by adapter hash. The grid directory holds ``grid.yaml``, ``settings.csv``
(setting -> run directory), the combined ``results.csv`` (same columns as a run's), ``report.md/.html``
and ``runs/<setting>-<time>/`` for each trained or defended run. Its path is printed last.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
from pathlib import Path
from typing import Any

import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.table import Table

from fedsafe.config import ExperimentConfig, _resolve_paths, apply_override, dump_config, load_config
from fedsafe.errors import ConfigError
from fedsafe.rundir import RunDir, atomic_write_text

console = Console(stderr=True)


class GridSetting(BaseModel):
    """One explicitly listed setting: a name and its overrides."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., description="setting name (run directory prefix)")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides, dotted keys as in --set")


class GridSpec(BaseModel):
    """A matrix of experiment settings over one base configuration."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("grid", description="grid name; the directory is <output_dir>/<name>-<time>")
    output_dir: str = Field("runs", description="parent of the grid directory")
    base: str | None = Field(None, description="experiment YAML the settings start from (relative to this file)")
    config: dict[str, Any] = Field(default_factory=dict, description="inline experiment fields over `base`")
    matrix: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=dict, description="axis -> label -> overrides; settings are the product of the axes")
    settings: list[GridSetting] = Field(default_factory=list, description="extra explicit settings")
    share_training: bool = Field(True, description="settings differing only in posthoc share one training run")


def load_grid(path: str | Path, overrides: list[str] | None = None) -> tuple[GridSpec, list[tuple[str, ExperimentConfig]]]:
    """Read a grid file and expand it into named, validated experiment configs."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"grid file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
        spec = GridSpec.model_validate(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"grid file {p} is not valid YAML: {exc}") from exc
    except ValidationError as err:
        lines = [f"invalid grid file ({p}):"] + [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise ConfigError("\n".join(lines)) from None
    base_cfg = load_config((p.parent / spec.base) if spec.base else None)
    base = base_cfg.model_dump(mode="json")
    inline = copy.deepcopy(spec.config)
    _resolve_paths(inline, p.parent)
    _deep_merge(base, inline)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        apply_override(base, key.strip(), yaml.safe_load(value))
    named: list[tuple[str, dict]] = []
    if spec.matrix:
        axes = [[(label, ovr or {}) for label, ovr in axis.items()] for axis in spec.matrix.values()]
        for combo in itertools.product(*axes):
            named.append(("-".join(label for label, _ in combo), _merge_overrides([o for _, o in combo])))
    named += [(s.name, s.set) for s in spec.settings]
    if not named:
        named = [(spec.name, {})]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ConfigError(f"grid {p}: setting names must be unique, got {names}")
    settings = []
    for name, ovr in named:
        data = copy.deepcopy(base)
        ovr = copy.deepcopy(ovr)
        _resolve_paths(ovr, p.parent)
        for key, value in ovr.items():
            try:
                apply_override(data, key, value)
            except ConfigError as exc:
                raise ConfigError(f"grid setting {name!r}: {exc}") from None
        data["name"] = name
        try:
            settings.append((name, ExperimentConfig.model_validate(data)))
        except ValidationError as err:
            msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise ConfigError(f"grid setting {name!r}: {msgs}") from None
    return spec, settings


def _deep_merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


def _merge_overrides(parts: list[dict]) -> dict:
    out: dict = {}
    for part in parts:
        out.update(part)
    return out


def training_key(cfg: ExperimentConfig) -> str:
    """What determines a federated training run: everything except the name and the post-hoc defense."""
    data = cfg.model_dump(mode="json")
    data.pop("name", None)
    data.pop("posthoc", None)
    data.pop("output_dir", None)
    return json.dumps(data, sort_keys=True)


def defense_label(cfg: ExperimentConfig) -> str:
    """The ``defense`` value a setting's defended row carries in results.csv."""
    return f"posthoc_l{cfg.posthoc.level}" if cfg.posthoc.enabled else "none"


def defend_trained(cfg: ExperimentConfig, trained_run: Path, progress: bool = True) -> Path:
    """Apply ``cfg.posthoc`` to the final adapter of an already trained run, evaluate, and report."""
    from safetensors.torch import load_file

    from fedsafe.defenses.posthoc import posthoc_defense
    from fedsafe.fl.params import FlatLoRA
    from fedsafe.models import attach_lora, load_base_model
    from fedsafe.pipeline import Session, _evaluate, _write_report
    from fedsafe.rundir import environment_info

    run_dir = RunDir.create(cfg.output_dir, cfg.name)
    atomic_write_text(run_dir.config_path, dump_config(cfg))
    loaded = load_base_model(cfg.model.name, cfg.model.device, cfg.model.dtype, cfg.model.quantization, seed=cfg.seed)
    run_dir.write_json("env.json", environment_info(cfg.seed, str(loaded.device)))
    peft_model = attach_lora(loaded.model, cfg.lora.r, int(cfg.lora.alpha), cfg.lora.dropout,
                             cfg.lora.target_modules, seed=cfg.seed)
    flat = FlatLoRA(peft_model)
    session = Session(cfg, run_dir, peft_model, loaded.tokenizer, flat, flat.get())
    final_vec = flat.from_state_dict(load_file(str(Path(trained_run) / "adapters" / "final" / "adapter_model.safetensors")))
    run_dir.log({"type": "shared_training", "round": cfg.fl.rounds, "trained_run": str(trained_run)})
    console.print(f"[bold]{cfg.name}:[/] defending the final adapter of {trained_run}")
    defended = posthoc_defense(session, final_vec, console=console)
    session.save_adapter(defended, "posthoc")
    if cfg.eval.prompts:
        _evaluate(session, defended, round_idx=cfg.fl.rounds, defense=defense_label(cfg))
    _write_report(run_dir)
    return run_dir.path


def plan_training(settings: list[tuple[str, ExperimentConfig]], share: bool = True
                  ) -> list[tuple[str, list[tuple[str, ExperimentConfig]]]]:
    """Group settings into training runs: [(trainer setting, members)].

    Settings that differ only in ``posthoc`` share one run; its trainer is the first member with a
    defense (whose run also yields the undefended row), so no group trains twice.
    """
    groups: dict[str, list[tuple[str, ExperimentConfig]]] = {}
    for name, cfg in settings:
        groups.setdefault(training_key(cfg) if share else name, []).append((name, cfg))
    plan = []
    for members in groups.values():
        trainer = next((n for n, c in members if c.posthoc.enabled), members[0][0])
        plan.append((trainer, members))
    return plan


def run_grid(spec: GridSpec, settings: list[tuple[str, ExperimentConfig]], progress: bool = True) -> Path:
    """Run every setting (sharing training where possible); return the grid directory."""
    from fedsafe.pipeline import run_experiment
    from fedsafe.report import read_results, write_report, write_results

    grid_dir = RunDir.create(spec.output_dir, spec.name).path
    atomic_write_text(grid_dir / "grid.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    runs_root = grid_dir / "runs"
    groups = plan_training(settings, spec.share_training)
    combined: list[dict] = []
    setting_rows: list[tuple[str, str, str]] = []  # setting, run_dir, how
    console.print(f"[bold]grid:[/] {grid_dir} ({len(settings)} settings, {len(groups)} training runs)")
    for trainer_name, members in groups:
        trainer_cfg = dict(members)[trainer_name]
        trainer_cfg = trainer_cfg.model_copy(update={"output_dir": str(runs_root)})
        console.rule(f"[bold]{trainer_name}")
        trained = run_experiment(trainer_cfg, progress=progress).run_dir
        trained_rows = read_results(trained)
        for name, cfg in members:
            if name == trainer_name:
                rows, where, how = trained_rows, trained, "trained"
            elif not cfg.posthoc.enabled:
                rows = [r for r in trained_rows if r["defense"] == "none"]
                where, how = trained, f"shares training with {trainer_name}"
            else:
                cfg = cfg.model_copy(update={"output_dir": str(runs_root)})
                where = defend_trained(cfg, trained, progress=progress)
                rows, how = read_results(where), f"defends the model trained by {trainer_name}"
            setting_rows.append((name, str(Path(where).relative_to(grid_dir)), how))
            for r in rows:
                if r not in combined:
                    combined.append(r)
        write_results(grid_dir, combined)
        _write_settings(grid_dir, setting_rows)
    write_report(grid_dir)
    return grid_dir


def _write_settings(grid_dir: Path, rows: list[tuple[str, str, str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["setting", "run_dir", "how"])
    w.writerows(rows)
    atomic_write_text(grid_dir / "settings.csv", buf.getvalue())


def print_results(run_dir: Path, title: str) -> None:
    """The combined results table on the console (stderr), in the paper's layout."""
    from fedsafe.report import read_results, results_table

    header, body = results_table(read_results(run_dir))
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 3 else "right")
    for row in body:
        table.add_row(*row)
    console.print(table)
    console.print("Rule: % of responses with a refusal string (higher is safer). Helpfulness proxy: "
                  "perplexity of held-out reference answers (offline proxy, lower is better).")


def select_settings(settings: list[tuple[str, ExperimentConfig]], patterns: list[str]) -> list[tuple[str, ExperimentConfig]]:
    """The settings whose name matches any of the shell-style ``patterns`` (all of them when none is given)."""
    if not patterns:
        return settings
    import fnmatch

    chosen = [(name, cfg) for name, cfg in settings if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not chosen:
        raise ConfigError(f"--only {' '.join(patterns)}: no setting matches; settings: "
                          f"{', '.join(name for name, _ in settings)}")
    return chosen


def grid_command(grid_file: Path = typer.Argument(..., help="grid YAML: a base experiment and a matrix of settings"),
                 set_: list[str] = typer.Option([], "--set", help="override a base field for every setting"),
                 only: list[str] = typer.Option([], "--only", help="run only the settings with this name "
                                                                  "(shell-style pattern; repeatable)"),
                 dry_run: bool = typer.Option(False, "--dry-run", help="list the settings and exit"),
                 no_progress: bool = typer.Option(False, "--no-progress", help="hide progress bars")) -> None:
    """Run a matrix of settings (shared training where possible) and print one combined table."""
    spec, settings = load_grid(grid_file, set_)
    settings = select_settings(settings, only)
    if dry_run:
        for name, cfg in settings:
            print(f"{name}\taggregator={cfg.aggregator.name}\tattack={cfg.has_attack}\tdefense={defense_label(cfg)}")
        return
    grid_dir = run_grid(spec, settings, progress=not no_progress)
    print_results(grid_dir, f"{spec.name}: {len(settings)} settings")
    console.print(f"report: {grid_dir / 'report.html'}")
    print(grid_dir)
