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

Seeds: ``seeds: [0, 1, 2]`` in the grid file (or in its experiment config), or ``--seeds 3`` (seeds
0, 1, 2) or ``--seeds 0,4,7`` on the command line, repeats every setting once per seed, in
``runs/<setting>-s<seed>-<time>/``. ``results.csv`` and ``outcomes.jsonl`` (per-prompt values) keep
one row per (setting, seed); ``summary.csv`` and the report give each setting's mean, standard deviation
and 95% interval over seeds and prompts, and paired differences (see :mod:`fedsafe.stats`). Seeds run
in turn, all settings of seed 0 first. Shared work: settings that share training share it per seed,
generated attack data is cached by its seed, and evaluations share one generation cache
(``<grid>/cache``), so the base model's round-0 evaluation runs once. Client trainings with the same
inputs (global adapter, client rows and seeds, round config, model: :mod:`fedsafe.fl.update_cache`) run
once across the grid's runs, e.g. round 1's benign clients under every attack and rule of a seed, and the
attackers' honest update h under every attack that only transforms it; ``<grid>/reuse.json`` and the last
lines printed say how many were reused (``reuse_updates: false`` or ``--no-reuse`` turns it off); the cache keeps
at most 4 GiB, least recently used entries evicted first (``update_cache_limit``, ``--update-cache-limit`` or
``$FEDSAFE_UPDATE_CACHE_LIMIT``; ``fedsafe cache info`` / ``clear --updates``). ``fedsafe grid GRID.yaml --resume
GRID_DIR`` continues an interrupted grid: a finished (setting, seed) is not rerun, and a training run
interrupted after a checkpoint continues from it.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import itertools
import json
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.table import Table

import fedsafe.plugins
from fedsafe.config import ExperimentConfig, _resolve_paths, apply_override, dump_config, load_config
from fedsafe.defenses.presets import EXPLICIT, editable_dump, leaf_keys
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
    reuse_updates: bool = Field(True, description="client trainings with the same inputs (global adapter, client "
                                                  "data and seeds, round config, model) run once across the grid's "
                                                  "runs and are read back from <grid>/cache/updates "
                                                  "(fedsafe.fl.update_cache); --no-reuse turns it off")
    update_cache_limit: str | int | None = Field(None, description="the most <grid>/cache/updates may take (bytes "
                                                                   "or 4GiB, 500MB, none), least recently used "
                                                                   "entries evicted first (default: "
                                                                   "$FEDSAFE_UPDATE_CACHE_LIMIT, else 4GiB)")
    seeds: list[int] | None = Field(None, min_length=1, description="run every setting once per seed "
                                                                   "(default: the config's seeds, else its seed)")


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
        if isinstance(raw, dict) and not {"matrix", "settings", "base", "config"} & set(raw):
            raise ConfigError(f"{p} is an experiment file, not a grid file (it has no matrix:, settings:, base: "
                              f"or config:): run it with `fedsafe run {p}`") from None
        lines = [f"invalid grid file ({p}):"] + [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise ConfigError("\n".join(lines)) from None
    base_cfg = load_config((p.parent / spec.base) if spec.base else None)
    # the dump holds every default; `explicit` (the keys a user set) lets `defense: <name>` refuse only real conflicts
    base, explicit = editable_dump(base_cfg)
    inline = copy.deepcopy(spec.config)
    _resolve_paths(inline, p.parent)
    _deep_merge(base, inline)
    explicit |= leaf_keys(inline)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        apply_override(base, key.strip(), yaml.safe_load(value))
        explicit |= leaf_keys({key.strip(): yaml.safe_load(value)})
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
            cfg = ExperimentConfig.model_validate(data, context={EXPLICIT: explicit | leaf_keys(ovr)})
            settings.append((name, cfg))
        except ValidationError as err:
            msgs = "; ".join((f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "")
                             + e["msg"].removeprefix("Value error, ") for e in err.errors())
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
    """What determines a federated training run: everything except the name, the output directory and the
    sections of plug-ins that act only after training (the post-hoc defense; ``Plugin.after_training_only``)."""
    data = cfg.model_dump(mode="json")
    data.pop("name", None)
    data.pop("output_dir", None)
    for section in fedsafe.plugins.after_training_only_sections():
        *parents, leaf = section.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return json.dumps(data, sort_keys=True)


def _defended(cfg: ExperimentConfig) -> bool:
    """Whether a plug-in of ``cfg`` defends the trained model after training (the grid's defended settings)."""
    return bool(fedsafe.plugins.after_training_defenses(cfg))


def plan_training(settings: list[tuple[str, ExperimentConfig]], share: bool = True
                  ) -> list[tuple[str, list[tuple[str, ExperimentConfig]]]]:
    """Group settings into training runs: [(trainer setting, members)].

    Settings that differ only in after-training sections (``posthoc``: :func:`training_key`) share one run; its
    trainer is the first member with such a defense (whose run also yields the undefended row), so no group
    trains twice.
    """
    groups: dict[str, list[tuple[str, ExperimentConfig]]] = {}
    for name, cfg in settings:
        groups.setdefault(training_key(cfg) if share else name, []).append((name, cfg))
    plan = []
    for members in groups.values():
        trainer = next((n for n, c in members if _defended(c)), members[0][0])
        plan.append((trainer, members))
    return plan


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: ``3`` means seeds 0, 1, 2; ``0,4,7`` (or ``5,``) lists the seeds."""
    text = text.strip()
    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return list(range(n))
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give a count (3 means seeds 0,1,2) or a list such as 0,4,7 "
                          "(one seed: 0, with the comma)") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give distinct seeds, e.g. 0,4,7")
    return seeds


def resolve_seeds(spec: GridSpec, settings: list[tuple[str, ExperimentConfig]], seeds: list[int] | None = None
                  ) -> tuple[list[tuple[str, ExperimentConfig]], bool]:
    """Give every setting its seed list (``--seeds`` > grid ``seeds`` > config ``seeds`` > config ``seed``).

    Returns the settings with ``seeds`` filled in, and whether seeds were asked for (run directories are
    then named ``<setting>-s<seed>``).
    """
    chosen = seeds or spec.seeds
    out, explicit = [], chosen is not None
    for name, cfg in settings:
        cfg_seeds = chosen or cfg.seeds or [cfg.seed]
        explicit = explicit or cfg.seeds is not None
        out.append((name, cfg.model_copy(update={"seeds": list(cfg_seeds)})))
    return out, explicit


def _seed_cfg(cfg: ExperimentConfig, seed: int, output_dir: Path) -> ExperimentConfig:
    return cfg.model_copy(update={"seed": seed, "seeds": None, "output_dir": str(output_dir)})


def run_grid(spec: GridSpec, settings: list[tuple[str, ExperimentConfig]], progress: bool = True,
             seeds: list[int] | None = None, resume: Path | None = None) -> Path:
    """Run every setting for every seed (sharing training where possible); return the grid directory.

    With ``resume`` (an existing grid directory) the (setting, seed) pairs listed in its settings.csv
    are not rerun, and an interrupted training run with a checkpoint continues from it.
    """
    from fedsafe.pipeline import defend_trained, run_experiment
    from fedsafe.report import write_report

    settings, per_seed_dirs = resolve_seeds(spec, settings, seeds)
    from fedsafe.pipeline import check_heldout, check_inputs

    for _name, cfg in settings:  # every input of every setting, before the grid directory exists
        check_inputs(cfg)
        check_heldout(cfg)
    from fedsafe.fl.update_cache import resolve_limit

    cache_limit = resolve_limit(spec.update_cache_limit) if spec.reuse_updates else None
    if resume is not None:
        grid_dir = Path(resume)
        if not (grid_dir / "grid.yaml").exists():
            raise ConfigError(f"--resume {grid_dir}: not a grid directory (no grid.yaml)")
    else:
        grid_dir = RunDir.create(spec.output_dir, spec.name).path
        atomic_write_text(grid_dir / "grid.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    runs_root = grid_dir / "runs"
    cache_dir = grid_dir / "cache"
    reuse = _Reuse(grid_dir, spec.reuse_updates, cache_limit)
    groups = plan_training(settings, spec.share_training)
    done = _read_settings(grid_dir) if resume is not None else {}
    combined = _Combined()
    setting_rows: list[tuple[str, int, str, str]] = []  # setting, seed, run_dir, how
    all_seeds = list(dict.fromkeys(s for _, cfg in settings for s in cfg.seeds))  # in the order given
    n_runs = sum(len(dict(members)[t].seeds) for t, members in groups)
    console.print(f"[bold]grid:[/] {grid_dir} ({len(settings)} settings x seeds {all_seeds}, {n_runs} training runs)")
    for seed in all_seeds:
        for trainer_name, members in groups:
            trainer_cfg = dict(members)[trainer_name]
            if seed not in trainer_cfg.seeds:
                continue
            suffix = f"-s{seed}" if per_seed_dirs else ""
            trainer_cfg = _seed_cfg(trainer_cfg, seed, runs_root)
            if (trainer_name, seed) in done:
                trained = grid_dir / done[(trainer_name, seed)][0]
                _check_unchanged(trained, trainer_cfg, trainer_name, seed)
                console.print(f"[bold]{trainer_name}{suffix}:[/] finished earlier ({trained.name}), not rerun")
            else:
                console.rule(f"[bold]{trainer_name}{suffix}")
                partial = _interrupted_run(runs_root, trainer_cfg, {grid_dir / d for d, _ in done.values()})
                if partial is not None:
                    console.print(f"continuing the interrupted run {partial.name}")
                    with reuse.run(trainer_name + suffix) as update_cache:
                        trained = run_experiment(resume=partial, progress=progress, cache_dir=cache_dir,
                                                 update_cache=update_cache).run_dir
                else:
                    with reuse.run(trainer_name + suffix) as update_cache:
                        trained = run_experiment(trainer_cfg, progress=progress, dir_name=trainer_name + suffix,
                                                 cache_dir=cache_dir, update_cache=update_cache).run_dir
            # the undefended rows belong to a member without a defense when there is one
            owner = next((n for n, c in members if not _defended(c)), trainer_name)
            for name, cfg in members:
                if name == trainer_name:
                    where, how = trained, "trained"
                    keep = (lambda r: True) if owner == trainer_name else (lambda r: r["defense"] != "none")
                elif not _defended(cfg):
                    where, how, keep = trained, f"shares training with {trainer_name}", (lambda r: r["defense"] == "none")
                elif (name, seed) in done:
                    where, how, keep = grid_dir / done[(name, seed)][0], done[(name, seed)][1], (lambda r: True)
                else:
                    cfg = _seed_cfg(cfg, seed, runs_root)
                    where = defend_trained(cfg, trained, progress=progress, dir_name=name + suffix,
                                           cache_dir=cache_dir).run_dir
                    how, keep = f"defends the model trained by {trainer_name}", (lambda r: True)
                combined.claim(Path(where), name, keep)
                setting_rows.append((name, seed, str(Path(where).relative_to(grid_dir)), how))
            combined.write(grid_dir)
            _write_settings(grid_dir, setting_rows)
    write_report(grid_dir)
    reuse.report()
    return grid_dir


class _Reuse:
    """The grid's update cache (``<grid>/cache/updates``) and its counts per training run, kept in
    ``<grid>/reuse.json`` (a resumed grid adds its runs to the file)."""

    def __init__(self, grid_dir: Path, enabled: bool, limit_bytes: int | None = None):
        from fedsafe.fl.update_cache import UpdateCache

        self.path = grid_dir / "reuse.json"
        self.cache = UpdateCache(grid_dir / "cache" / "updates", limit_bytes) if enabled else None
        self.runs: dict[str, dict] = {}
        if self.path.exists():
            try:
                self.runs = dict(json.loads(self.path.read_text(encoding="utf-8")).get("runs") or {})
            except (json.JSONDecodeError, AttributeError):
                self.runs = {}

    @contextlib.contextmanager
    def run(self, name: str):
        """Yield the cache for one training run and record what it reused (also when the run fails)."""
        before = self.cache.counts() if self.cache is not None else None
        try:
            # the run's entries are never evicted while it runs (least recently used ones of earlier runs are)
            with self.cache.in_use() if self.cache is not None else contextlib.nullcontext():
                yield self.cache
        finally:
            if self.cache is not None:
                after = self.cache.counts()
                self.runs[name] = {k: after[k] - before[k] for k in after}
                self._write()

    def totals(self) -> dict:
        keys = ("reused", "computed", "not_cached", "seconds_saved", "seconds_computed", "evicted", "evicted_bytes")
        return {k: sum(r.get(k, 0) for r in self.runs.values()) for k in keys}

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps({"enabled": True, "cache": "cache/updates",
                                                 "cache_bytes": self.cache.size_bytes(),
                                                 "cache_limit_bytes": self.cache.limit_bytes, "totals": self.totals(),
                                                 "runs": self.runs}, indent=2) + "\n")

    def report(self) -> None:
        """Print what the grid reused (one line; reuse.json has it per run)."""
        if self.cache is None:
            console.print("client updates: not shared (reuse_updates off)")
            return
        from fedsafe.fl.update_cache import format_size

        t = self.totals()
        console.print(f"client updates: {t['reused']} reused, {t['computed']} computed, {t['not_cached']} not "
                      f"cacheable; {t['seconds_saved']:.0f} s of training saved; cache/updates holds "
                      f"{self.cache.size_bytes() / 2**20:.0f} MiB (limit {format_size(self.cache.limit_bytes)}, "
                      f"{t['evicted']} least recently used entries evicted, {t['evicted_bytes'] / 2**20:.0f} MiB; "
                      f"{self.path.name}; `fedsafe cache info`)")


class _Combined:
    """The grid's results.csv and outcomes.jsonl, gathered from its runs with each row's setting set.

    Each row of a run is claimed once (a shared training run's rows go to the settings that share it);
    identical base-model rows of several training runs (same seed) are kept once.
    """

    def __init__(self):
        self.rows: list[dict] = []
        self.outcomes: list[dict] = []
        self._claimed: set[tuple] = set()

    def claim(self, run_dir: Path, setting: str, keep) -> None:
        from fedsafe.report import read_outcomes, read_results

        outcomes = read_outcomes(run_dir)
        for i, row in enumerate(read_results(run_dir)):
            if (str(run_dir), i) in self._claimed or not keep(row):
                continue
            self._claimed.add((str(run_dir), i))
            ident = {k: row.get(k) for k in ("scenario", "method", "defense", "seed")}
            row = {**row, "setting": setting}
            if row["scenario"] == "base" and any(
                    {k: v for k, v in r.items() if k != "setting"} == {k: v for k, v in row.items() if k != "setting"}
                    for r in self.rows):
                continue
            self.rows.append(row)
            match = [o for o in outcomes if {k: o.get(k) for k in ident} == ident]
            if match:  # the last evaluation of this row (a resumed run may have repeated it)
                self.outcomes.append({**match[-1], "setting": setting})

    def write(self, grid_dir: Path) -> None:
        from fedsafe.report import write_outcomes, write_results

        write_results(grid_dir, self.rows)
        write_outcomes(grid_dir, self.outcomes)


def _read_settings(grid_dir: Path) -> dict[tuple[str, int], tuple[str, str]]:
    """(setting, seed) -> (run_dir, how) of the pairs a grid directory already finished."""
    path = grid_dir / "settings.csv"
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {(r["setting"], int(r.get("seed") or 0)): (r["run_dir"], r["how"]) for r in csv.DictReader(f)}


def _comparable(config: dict) -> dict:
    return {k: v for k, v in (config or {}).items() if k != "output_dir"}


def _check_unchanged(run_dir: Path, cfg: ExperimentConfig, name: str, seed: int) -> None:
    saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    if _comparable(saved) != _comparable(yaml.safe_load(dump_config(cfg))):
        raise ConfigError(f"--resume: setting {name!r} (seed {seed}) differs from the one run in {run_dir}; "
                          "the grid file changed since, so start a new grid")


def _interrupted_run(runs_root: Path, cfg: ExperimentConfig, finished: set[Path]) -> Path | None:
    """A run directory of ``cfg`` that stopped after a checkpoint and is not finished, if any."""
    from fedsafe.rundir import grid_run_dirs

    want = _comparable(yaml.safe_load(dump_config(cfg)))
    finished = {p.resolve() for p in finished}
    for run in grid_run_dirs(runs_root.parent):
        if run.resolve() in finished or not (run / "checkpoint" / "state.pt").exists():
            continue
        if _comparable(yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))) == want:
            return run
    return None


def _write_settings(grid_dir: Path, rows: list[tuple[str, int, str, str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["setting", "seed", "run_dir", "how"])
    w.writerows(rows)
    atomic_write_text(grid_dir / "settings.csv", buf.getvalue())


def print_results(run_dir: Path, title: str) -> None:
    """The combined results table on the console (stderr), in the paper's layout, with 95% intervals,
    then the paired differences."""
    from fedsafe.report import (INTERVALS_NOTE, comparison_rows, metrics_note, comparisons_table, read_outcomes,
                                read_results, results_table, summarize)

    groups = summarize(read_results(run_dir), read_outcomes(run_dir))
    header, body = results_table(read_results(run_dir), groups=groups)
    table = Table(title=title)
    n_keys = header.index("Defense") + 1
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < n_keys else "right")
    for row in body:
        table.add_row(*row)
    console.print(table)
    console.print(metrics_note() + " " + INTERVALS_NOTE)
    diffs = [d for d in comparison_rows(groups) if d["metric"] in ("rule", "over_refusal")]
    if diffs:
        header, body = comparisons_table(diffs)
        table = Table(title="Paired differences (compared - reference)")
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i < 3 else "right")
        for row in body:
            table.add_row(*row)
        console.print(table)


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
                 seeds: Optional[str] = typer.Option(None, "--seeds", help="run every setting per seed: 3 means "
                                                                         "seeds 0,1,2; or a list such as 0,4,7"),
                 resume: Optional[Path] = typer.Option(None, "--resume", help="continue this grid directory: "
                                                                             "finished (setting, seed) pairs "
                                                                             "are not rerun"),
                 no_reuse: bool = typer.Option(False, "--no-reuse", help="train every client update in every "
                                                                        "run (no <grid>/cache/updates; the grid "
                                                                        "file's reuse_updates: false)"),
                 update_cache_limit: Optional[str] = typer.Option(None, "--update-cache-limit", metavar="SIZE",
                                                                  help="the most <grid>/cache/updates may take "
                                                                       "(4GiB, 500MB, none), least recently used "
                                                                       "entries evicted first (default: "
                                                                       "$FEDSAFE_UPDATE_CACHE_LIMIT, else 4GiB)"),
                 dry_run: bool = typer.Option(False, "--dry-run", help="list the settings and exit"),
                 no_progress: bool = typer.Option(False, "--no-progress", help="hide progress bars")) -> None:
    """Run a matrix of settings (shared training where possible) and print one combined table."""
    spec, settings = load_grid(grid_file, set_)
    settings = select_settings(settings, only)
    seed_list = parse_seeds(seeds) if seeds is not None else None
    if no_reuse:
        spec = spec.model_copy(update={"reuse_updates": False})
    if update_cache_limit is not None:
        spec = spec.model_copy(update={"update_cache_limit": update_cache_limit})
    if dry_run:
        for name, cfg in resolve_seeds(spec, settings, seed_list)[0]:
            print(f"{name}\taggregator={cfg.aggregator.name}\tattack={cfg.has_attack}"
                  f"\tdefense={fedsafe.plugins.defense_label(cfg)}"
                  f"\tseeds={','.join(map(str, cfg.seeds))}")
        return
    grid_dir = run_grid(spec, settings, progress=not no_progress, seeds=seed_list, resume=resume)
    print_results(grid_dir, f"{spec.name}: {len(settings)} settings")
    console.print(f"report: {grid_dir / 'report.html'}")
    print(grid_dir)
