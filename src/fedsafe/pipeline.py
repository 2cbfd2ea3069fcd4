"""One experiment from top to bottom: model -> plug-ins -> clients -> rounds -> after training -> eval -> report.

Read :func:`run_experiment` to see the order of events and where each step lives. Attacks and defenses are
plug-ins (:mod:`fedsafe.plugins`): they act only through the hooks this file calls, never through a branch here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

import fedsafe.plugins
from fedsafe import aggregators
from fedsafe.config import DataSource, ExperimentConfig, dump_config, load_config
from fedsafe.data import build_clients, build_heldout
from fedsafe.data.format import mean_loss
from fedsafe.engines.inprocess import InProcessEngine
from fedsafe.fl.client import LocalTrainer
from fedsafe.fl.loop import load_checkpoint, run_rounds
from fedsafe.fl.params import FlatLoRA
from fedsafe.fl.server import Server
from fedsafe.io import atomic_write_text
from fedsafe.models import attach_lora
from fedsafe.plugins import Output, RunContext, Setup
from fedsafe.progress import progress_bar
from fedsafe.run_model import load_model
from fedsafe.rundir import RunDir, environment_info

log = logging.getLogger("fedsafe")
console = Console(stderr=True)


@dataclass
class RunResult:
    """What a finished experiment leaves behind (paths and headline numbers)."""

    run_dir: Path
    heldout_loss_before: float | None = None
    heldout_loss_after: float | None = None
    round_losses: list[float] = field(default_factory=list)
    final_adapter: Path | None = None
    posthoc_adapter: Path | None = None
    evals: list[dict] = field(default_factory=list)


@dataclass
class Session:
    """The loaded pieces of an experiment, shared by the steps (one model in memory)."""

    cfg: ExperimentConfig
    run_dir: RunDir
    peft_model: torch.nn.Module
    tokenizer: object
    flat: FlatLoRA
    init_vec: torch.Tensor
    cache_dir: Path | None = None  # generation cache (a grid shares one across its runs); default run_dir/cache
    heldout: list = field(default_factory=list)  # held-out examples for the loss before/after

    @property
    def eval_cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.run_dir.path / "cache"

    def save_adapter(self, vec: torch.Tensor, tag) -> Path:
        return self.run_dir.save_adapter(self.peft_model, self.flat, vec, tag)


def run_experiment(cfg: ExperimentConfig | None = None, resume: str | Path | None = None,
                   progress: bool = True, engine_factory=None, he_server_context: bytes | None = None,
                   dir_name: str | None = None, cache_dir: str | Path | None = None,
                   update_cache=None) -> RunResult:
    """Run (or resume) one experiment and return where its outputs are.

    ``dir_name`` names a new run directory (default ``cfg.name``; a grid adds the seed); ``cache_dir``
    holds the evaluation generations (default ``<run>/cache``; a grid shares one so that identical
    evaluations, such as the base model's, run once). ``update_cache`` (a :class:`fedsafe.fl.update_cache.UpdateCache`,
    a grid passes one) shares client trainings with the same inputs across runs.

    ``engine_factory(trainer, clients)`` builds the engine that runs local training (default: in-process;
    :mod:`fedsafe.engines.flower` passes one that sends the same work to Flower ClientApps).
    ``he_server_context`` (secure_agg in a deployment): the public CKKS context of ``fedsafe flower keys``;
    the clients hold the secret key on their machines and the engine's ``decrypt`` asks one of them.

    Every attack and defense is a plug-in (:mod:`fedsafe.plugins`): this function only calls their hooks.
    """
    cfg, run_dir = _open_run_dir(cfg, resume, dir_name)                      # 1. run directory (new or resumed)
    session = _load_model(cfg, run_dir, cache_dir)                           # 2. the one model in memory
    ctx = _run_context(session, he_server_context, progress)
    plugins = fedsafe.plugins.build(cfg, ctx)                                # 3. the attacks and defenses
    clients = plugins.client_data(_build_clients(session, ctx))              # 4. client data (canaries, ...)
    ctx.clients = clients
    local = LocalTrainer(session.peft_model, session.tokenizer)
    local.update_cache = update_cache  # None: every training runs (a grid shares them across its runs)
    ctx.trainer = plugins.local_training(local)                              # 5. local step
    server = _build_server(cfg, session, len(clients))                      # 6. server and rule
    ctx.server = server
    server.aggregator = plugins.server_view(server.aggregator)               #    the server's view before the rule
    engine = (engine_factory or InProcessEngine)(plugins.client_side(ctx.trainer), clients)
    if hasattr(engine, "plan_batching"):  # fl.batched_clients: a round's clients as adapters of one pass
        engine.plan_batching(cfg.fl.batched_clients, plugins.sequential_training())
    ctx.engine = engine
    plugins.aggregate(server)                                                #    the sum (secure aggregation)
    result, done = _start(session, server, engine, resume)
    _train(session, server, engine, clients, plugins, result, progress)      # 7. federated rounds
    final_vec = server.global_vec
    result.final_adapter = session.save_adapter(final_vec, "final")
    _heldout_after(session, result, final_vec)
    outputs = plugins.after_training(final_vec)                              # 8. after training
    _finish(session, result, final_vec, outputs)                             # 9. evaluation and report
    return result


def build_trainer(cfg: ExperimentConfig, peft_model, tokenizer) -> LocalTrainer:
    """The client-side local trainer of ``cfg``: the plain trainer with every plug-in's ``local_training``
    hook applied (local DP-SGD, constrained-update terms), without the ``client_update`` hooks."""
    from fedsafe.plugins import RunContext, Setup

    ctx = RunContext(**vars(Setup.from_config(cfg)), model=peft_model, tokenizer=tokenizer)
    return fedsafe.plugins.build(cfg, ctx).local_training(LocalTrainer(peft_model, tokenizer))


# ------------------------------------------------------------------------------------------------
# The steps of run_experiment
# ------------------------------------------------------------------------------------------------

def _open_run_dir(cfg: ExperimentConfig | None, resume, dir_name: str | None) -> tuple[ExperimentConfig, RunDir]:
    """A new run directory with the resolved config, or the one being resumed (its saved config wins)."""
    heldout_check: dict[str, int] = {}
    if resume is not None:
        run_dir = RunDir.open(resume)
        cfg = load_config(run_dir.config_path)
        check_inputs(cfg)  # a data file that went missing fails now, not after the remaining rounds
    else:
        cfg = cfg or ExperimentConfig()
        check_inputs(cfg)  # before the run directory exists: a bad path leaves nothing behind
        heldout_check = check_heldout(cfg)  # over-refusal prompts no model trains on, or a ConfigError now
        run_dir = RunDir.create(cfg.output_dir, dir_name or cfg.name)
        atomic_write_text(run_dir.config_path, dump_config(cfg))
    console.print(f"[bold]run directory:[/] {run_dir.path}")
    run_dir.start_tracking(cfg.tracking, cfg.model_dump(mode="json"))  # every metrics record also goes there
    if heldout_check:
        run_dir.log({"type": "heldout_check", "prompts_checked": heldout_check, "overlap": 0})
    torch.manual_seed(cfg.seed)
    return cfg, run_dir


def check_heldout(cfg: ExperimentConfig) -> dict[str, int]:
    """Check that the benign evaluation prompts (over-refusal, borderline refusal) are disjoint from every
    instruction the run trains on (:func:`fedsafe.data.holdout.check_disjoint`); returns the prompts checked."""
    from fedsafe.data.holdout import check_disjoint
    from fedsafe.evaluation.runner import benign_sets

    sets = {field: prompts for field, _, prompts in benign_sets(cfg.eval, cfg.seed).values()}
    if not sets:
        return {}
    return check_disjoint(cfg.model_dump(mode="json"), sets, skip=fedsafe.plugins.inactive_sections(cfg))


# config keys whose string values name files (besides data sources), checked to exist when they look local
_FILE_KEYS = ("prompts", "template", "questions", "judge_prompts", "references", "instructions", "policy")
_LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".gz", ".yaml", ".yml", ".txt", ".md")


def looks_local(path: str) -> bool:
    """Whether a path-like config value means a local file (so it must exist), not ``starter:*`` or a hub id.

    The rule (the one :func:`fedsafe.data.records.raw_records` applies): a value that starts with ``.``, ``/``
    or ``~``, or ends in a file suffix (.json, .jsonl, .csv, .parquet, .gz, .yaml, ...), is a local file; a
    value with a ``:`` (``starter:train``, a URL) or a bare ``owner/name`` is not.
    """
    if ":" in path and not path.startswith((".", "/", "~")):
        return False
    return path.startswith((".", "/", "~")) or Path(path).suffix.lower() in _LOCAL_SUFFIXES or Path(
        path).expanduser().exists()


def check_inputs(cfg: ExperimentConfig) -> None:
    """Check every input file of ``cfg`` before anything is created or loaded (issue 30): each data source
    (client roles, data.heldout, plug-in sections such as posthoc and the probe's shadows), eval.prompts,
    eval.normal_prompts, eval.borderline_prompts and every other local file path (MT-Bench, judge template,
    probing prompts). A missing file, an unreadable format or a missing column is a :class:`DataError` naming
    the field and the path. Hub ids cannot be checked offline and are left to the run; generated data too."""
    from fedsafe.data.records import STARTER_SPLITS
    from fedsafe.data.sources import excluded_instructions, load_rows
    from fedsafe.errors import DataError
    from fedsafe.evaluation.runner import load_benign_prompts, load_prompts

    if looks_local(cfg.model.name) and not Path(cfg.model.name).expanduser().is_dir():
        raise DataError(f"model.name: {cfg.model.name} is not a model directory (nor 'embedded', 'tiny' or a hub id)")
    ev = cfg.eval
    if ev.prompts is not None and (ev.prompts in STARTER_SPLITS or looks_local(ev.prompts)):
        load_prompts(ev.prompts)
    for name, count in (("normal_prompts", ev.n_normal_prompts), ("borderline_prompts", ev.n_borderline_prompts)):
        sources = getattr(ev, name)
        if ev.prompts is None or sources is None or not count:
            continue  # used only with the safety evaluation (eval.prompts)
        many = isinstance(sources, list)
        for i, source in enumerate(sources if many else [sources]):
            path = source.path if isinstance(source, DataSource) else source
            if path is None or not (path in STARTER_SPLITS or looks_local(path)):
                continue  # a hub id or generated data: checked when the run reads it
            load_benign_prompts(source, field=f"eval.{name}[{i}]" if many else f"eval.{name}")
    data = cfg.model_dump(mode="json")
    data.pop("eval", None)  # checked above: prompt sets need no response column
    for where, value in _walk(data, ""):
        if isinstance(value, dict) and {"path", "instruction_field", "response_field", "generate"} <= set(value):
            path = value.get("path")
            if path is None or not (path in STARTER_SPLITS or looks_local(path)):
                continue  # generated data, or a hub dataset
            try:
                if ".exclude." in where:  # a list of instructions to drop: a prompt file needs no response field
                    excluded_instructions([DataSource.model_validate(value)])
                else:
                    load_rows(DataSource.model_validate(value), seed=cfg.seed)
            except DataError as exc:
                raise DataError(f"{where}.path: {exc}") from None
        elif where.rsplit(".", 1)[-1] in _FILE_KEYS and isinstance(value, str) and looks_local(value):
            if not Path(value).expanduser().is_file():
                raise DataError(f"{where}: file not found: {value}")
    evaluated = {"eval": ev.model_dump(mode="json")} if ev.prompts is not None else {}  # read only then
    for where, value in _walk(evaluated, ""):  # MT-Bench and judge files: exist
        if where.rsplit(".", 1)[-1] in ("questions", "judge_prompts", "references", "template") \
                and isinstance(value, str) and looks_local(value) and not Path(value).expanduser().is_file():
            raise DataError(f"{where}: file not found: {value}")


def _walk(node, where: str):
    """(dotted location, value) of every dict and leaf under ``node``, parents before children; a section
    switched off (``enabled: false``) is skipped, as the run never reads its files."""
    if isinstance(node, dict) and node.get("enabled") is False:
        return
    yield where, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{where}.{i}")


def _load_model(cfg: ExperimentConfig, run_dir: RunDir, cache_dir) -> Session:
    """Load the base model once and attach LoRA; every client swaps its LoRA vector into it."""
    loaded = load_model(cfg.model, seed=cfg.seed)
    run_dir.write_json("env.json", environment_info(cfg.seed, str(loaded.device)))
    peft_model = attach_lora(loaded.model, cfg.lora.r, int(cfg.lora.alpha), cfg.lora.dropout,
                             cfg.lora.target_modules, seed=cfg.seed)
    flat = FlatLoRA(peft_model)
    return Session(cfg, run_dir, peft_model, loaded.tokenizer, flat, flat.get(),
                   Path(cache_dir) if cache_dir is not None else None)


def _run_context(session: Session, he_server_context: bytes | None = None, progress: bool = True) -> RunContext:
    """The services the plug-ins of this run share (its own section is given to each separately)."""
    cfg = session.cfg
    ctx = RunContext(**vars(Setup.from_config(cfg)), model=session.peft_model, tokenizer=session.tokenizer,
                     flat=session.flat, init_vec=session.init_vec, run_dir=session.run_dir, console=console,
                     generator_cache={"model": session.peft_model, "tokenizer": session.tokenizer,
                                      "name": cfg.model.name},
                     he_server_context=he_server_context, save_adapter=session.save_adapter, progress=progress,
                     eval_cache=session.eval_cache,
                     evaluate=lambda vec, defense="none": _evaluate(session, vec, cfg.fl.rounds, defense=defense))
    if he_server_context is not None and fedsafe.plugins.ENCRYPTED_UPDATES not in fedsafe.plugins.declared_by(cfg):
        log.warning("a CKKS server context was given but no active plug-in encrypts the updates (secure "
                    "aggregation is off): updates travel in plaintext")
    return ctx


def _build_clients(session: Session, ctx: RunContext) -> list:
    """Roles -> disjoint client partitions (tokenised once); generated data may use the model."""
    clients = build_clients(session.cfg, session.tokenizer, ctx.generator_cache)
    session.flat.set(session.init_vec)  # generation for data may have used the model
    return clients


def _build_server(cfg: ExperimentConfig, session: Session, num_clients: int) -> Server:
    """The server with the configured rule (plug-ins may replace or wrap it) and the analysis-only rules."""
    rule = aggregators.get(cfg.aggregator.name, **cfg.aggregator.params)
    server = Server(cfg.fl, session.init_vec, rule, seed=cfg.seed, max_update_norm=cfg.aggregator.max_update_norm,
                    num_clients=num_clients)
    server.compare = aggregators.compare_rules(cfg.aggregator.compare)  # stealth analysis: weights only
    return server


def _start(session: Session, server: Server, engine, resume) -> tuple[RunResult, int]:
    """Restore a resumed run's state; measure the held-out loss and the base model before training."""
    cfg, run_dir = session.cfg, session.run_dir
    done = load_checkpoint(run_dir, server, engine) if resume is not None else 0
    if resume is not None:
        run_dir.truncate_metrics_after(done)
        console.print(f"resuming after round {done} of {cfg.fl.rounds}")
    result = RunResult(run_dir.path)
    session.heldout = build_heldout(cfg, session.tokenizer)
    if session.heldout:
        session.flat.set(session.init_vec)
        result.heldout_loss_before = mean_loss(session.peft_model, session.heldout, session.tokenizer.pad_token_id)
    if cfg.eval.base and cfg.eval.prompts and done == 0:
        result.evals.append(_evaluate(session, session.init_vec, round_idx=0, method="base", defense="none"))
    return result, done


def _train(session: Session, server: Server, engine, clients, plugins, result: RunResult, progress: bool) -> None:
    """The federated rounds, with the plug-ins' round hooks and evaluation every ``eval.every`` rounds."""
    cfg = session.cfg

    def on_round_end(round_no: int, record: dict) -> None:
        console.print(f"round {round_no:>3}: mean client loss {record['mean_loss']:.4f}  "
                      f"update norm {record['update_norm']:.4f}  lr {record['lr']:.2e}  "
                      f"({record['seconds']:.1f} s)")
        if cfg.eval.every and round_no % cfg.eval.every == 0 and round_no < cfg.fl.rounds and cfg.eval.prompts:
            result.evals.append(_evaluate(session, server.global_vec, round_idx=round_no))
        plugins.round_end(round_no, record, server.global_vec)

    with progress_bar(eta=True, console=console, transient=False) as prog:
        run_rounds(server, engine, clients, session.run_dir, rounds=cfg.fl.rounds,
                   clients_per_round=cfg.clients_per_round, save_adapter=session.save_adapter,
                   save_every_round=cfg.fl.save_every_round, progress=prog if progress else None,
                   on_round_start=plugins.round_start, on_round_end=on_round_end)


def _heldout_after(session: Session, result: RunResult, final_vec: torch.Tensor) -> None:
    """The held-out loss of the final model (logged before the after-training plug-ins, which report it)."""
    cfg, run_dir = session.cfg, session.run_dir
    result.round_losses = [r["mean_loss"] for r in run_dir.records("round")]
    if session.heldout:
        session.flat.set(final_vec)
        result.heldout_loss_after = mean_loss(session.peft_model, session.heldout, session.tokenizer.pad_token_id)
        run_dir.log({"type": "heldout", "round": cfg.fl.rounds, "before": result.heldout_loss_before,
                     "after": result.heldout_loss_after})


def _finish(session: Session, result: RunResult, final_vec: torch.Tensor, outputs: list[Output]) -> None:
    """Evaluation of the final model and of the plug-ins' outputs, report."""
    cfg, run_dir = session.cfg, session.run_dir
    if cfg.eval.prompts:
        result.evals.append(_evaluate(session, final_vec, round_idx=cfg.fl.rounds))
    _save_outputs(session, result, outputs)
    session.flat.set(final_vec)
    _write_report(run_dir)
    run_dir.close_tracking()
    _print_summary(result, cfg)


def _save_outputs(session: Session, result: RunResult, outputs: list[Output]) -> None:
    """Save the after-training plug-ins' adapters; evaluate each defended one (an Output with a ``defense``)."""
    cfg = session.cfg
    for out in outputs:  # post-hoc, personalized, ... adapters
        path = session.save_adapter(out.vec, out.tag)
        if out.defense is not None:  # a defended model of the run (the post-hoc defense's)
            result.posthoc_adapter = path
        if out.defense is not None and cfg.eval.prompts:
            result.evals.append(_evaluate(session, out.vec, round_idx=cfg.fl.rounds, defense=out.defense))


def defend_trained(cfg: ExperimentConfig, trained_run: str | Path, progress: bool = True,
                   dir_name: str | None = None, cache_dir: str | Path | None = None) -> RunResult:
    """Steps 8 and 9 of :func:`run_experiment` on the final adapter of a run that ``cfg`` shares its training with
    (it differs only in sections of plug-ins that act only after training, :attr:`Plugin.after_training_only`):
    those plug-ins' ``after_training`` hooks run on that adapter in a new run directory, and their defended
    models are saved, evaluated and reported as in a full run. A grid runs its defense levels this way."""
    from safetensors.torch import load_file

    if not fedsafe.plugins.after_training_defenses(cfg):
        raise ValueError(f"{cfg.name}: no active plug-in acts only after training: nothing to replay")
    run_dir = RunDir.create(cfg.output_dir, dir_name or cfg.name)
    atomic_write_text(run_dir.config_path, dump_config(cfg))
    run_dir.start_tracking(cfg.tracking, cfg.model_dump(mode="json"))
    session = _load_model(cfg, run_dir, cache_dir)
    ctx = _run_context(session, progress=progress)
    built = fedsafe.plugins.build(cfg, ctx)
    plugins = fedsafe.plugins.PluginSet([p for p in built if p.after_training_only])
    final_path = Path(trained_run) / "adapters" / "final" / "adapter_model.safetensors"
    final_vec = session.flat.from_state_dict(load_file(str(final_path)))
    run_dir.log({"type": "shared_training", "round": cfg.fl.rounds, "trained_run": str(trained_run)})
    console.print(f"[bold]{cfg.name}:[/] defending the final adapter of {trained_run}")
    result = RunResult(run_dir.path, final_adapter=final_path)
    outputs = plugins.after_training(final_vec)                              # 8. after training (replayed)
    _save_outputs(session, result, outputs)                                  # 9. evaluation and report
    session.flat.set(final_vec)
    _write_report(run_dir)
    run_dir.close_tracking()
    return result


def scenario_label(cfg: ExperimentConfig, defense: str) -> str:
    """results.csv scenario: no_attack / attack / attack_posthoc (or the configured label); a defended model's
    row also names the scenario it defends in its ``defends`` field, which is what the report reads."""
    base = trained_scenario(cfg)
    return base if defense == "none" else f"{base}_posthoc"


def trained_scenario(cfg: ExperimentConfig) -> str:
    """The scenario of the trained (undefended) model: the configured label, else attack / no_attack."""
    return cfg.scenario or ("attack" if cfg.has_attack else "no_attack")


def _evaluate(session: Session, vec: torch.Tensor, round_idx: int, method: str | None = None,
              defense: str = "none") -> dict:
    """Evaluate the model with adapter ``vec``; log an eval record and append a results.csv row."""
    from fedsafe.evaluation.runner import SCORE_KEYS, evaluate_model, noop_adapter_key
    from fedsafe.results import append_outcomes, append_results

    cfg = session.cfg
    session.flat.set(vec)
    t0 = time.perf_counter()
    scores = evaluate_model(session.peft_model, session.tokenizer, cfg.eval,
                            cache_dir=session.eval_cache, adapter_vec=vec,
                            heldout=cfg.data.heldout, max_length=cfg.data.max_length, progress=True,
                            seed=cfg.seed, adapter_key=noop_adapter_key(session.peft_model, session.flat, vec))
    method = method or cfg.aggregator.name
    row = {"setting": cfg.name, "scenario": scenario_label(cfg, defense) if method != "base" else "base",
           "method": method, "defense": defense, "seed": cfg.seed,
           "defends": trained_scenario(cfg) if defense != "none" and method != "base" else None,
           **{k: scores.get(k) for k in SCORE_KEYS}}
    per_prompt = scores.get("per_prompt")
    by_source = {k: scores[k] for k in ("over_refusal_by_source", "borderline_refusal_by_source") if scores.get(k)}
    session.run_dir.log({"type": "eval", "round": round_idx, **row, "seconds": time.perf_counter() - t0,
                         **by_source, **({"per_prompt": per_prompt} if per_prompt else {})})
    if round_idx == cfg.fl.rounds or method == "base":
        append_results(session.run_dir.path, [row])
        if per_prompt:  # what the report's intervals resample (fedsafe.stats)
            append_outcomes(session.run_dir.path, [{**{k: row[k] for k in ("setting", "scenario", "method",
                                                                            "defense", "seed")}, **per_prompt}])
    console.print(f"eval (round {round_idx}, {row['scenario']}, {defense}): "
                  + ", ".join(f"{k}={v:.3f}" for k, v in scores.items() if isinstance(v, float)))
    for key, shares in by_source.items():  # a joined prompt set: what each source shows
        console.print(f"  {key.removesuffix('_by_source')} by source: "
                      + ", ".join(f"{name} {v:.1f}%" for name, v in shares.items()))
    return row


def _write_report(run_dir: RunDir) -> None:
    try:
        from fedsafe.report import write_report

        write_report(run_dir.path)
    except Exception as exc:  # a report failure must never lose a finished run
        log.warning("report could not be written: %s", exc)


def _print_clients(clients) -> None:
    by_role: dict[str, list] = {}
    for c in clients:
        by_role.setdefault(c.role, []).append(c)
    console.print("clients: " + "; ".join(f"{role}: {len(cs)} x {cs[0].num_samples} examples"
                                          for role, cs in by_role.items()))


def _print_summary(result: RunResult, cfg: ExperimentConfig) -> None:
    from rich.table import Table

    table = Table(title=f"{cfg.name}: {cfg.fl.rounds} rounds, {cfg.aggregator.name}, {cfg.model.name}")
    table.add_column("round", justify="right")
    table.add_column("mean client loss", justify="right")
    for i, loss in enumerate(result.round_losses, 1):
        table.add_row(str(i), f"{loss:.4f}")
    console.print(table)
    if result.heldout_loss_before is not None:
        console.print(f"held-out loss: before {result.heldout_loss_before:.4f} -> after "
                      f"{result.heldout_loss_after:.4f}")
    if result.evals:
        console.print(safety_table(result.evals))
    elif not cfg.eval.prompts:
        console.print("no safety evaluation: set eval.prompts (and eval.normal_prompts) to measure Rule and "
                      "over-refusal, e.g. --set eval.prompts=starter:heldout")
    console.print(f"final adapter: {result.final_adapter}")
    if result.posthoc_adapter:
        console.print(f"defended adapter: {result.posthoc_adapter}")


# (result column, prompt-count column, row label) of the console's "did it stay safe?" table
_SAFETY_ROWS = (("rule", "n_prompts", "Rule % (harmful) ↑"), ("refusal", "n_prompts", "refused % (detector) ↑"),
                ("over_refusal", "n_normal_prompts", "over-refusal % (everyday) ↓"),
                ("borderline_refusal", "n_borderline_prompts", "borderline refusal % ↓"))


def safety_table(evals: list[dict]):
    """The end-of-run table, one column per evaluated model: Rule, refusal, over-refusal and borderline refusal
    with their 95% Wilson intervals over prompts (:func:`fedsafe.stats.wilson_interval`; one seed) and the
    helpfulness proxy; metrics no model measured are left out."""
    from rich.table import Table

    from fedsafe.stats import wilson_interval

    table = Table(title="did it stay safe?", caption="95% Wilson intervals over prompts, one seed")
    table.add_column("metric")
    for ev in evals:
        defense = ev.get("defense", "none")
        table.add_column(ev["scenario"] if defense == "none" else f"{ev['scenario']} ({defense})",
                         justify="right")
    for metric, n_key, label in _SAFETY_ROWS:
        if all(ev.get(metric) is None for ev in evals):
            continue
        cells = []
        for ev in evals:
            value, n = ev.get(metric), int(ev.get(n_key) or 0)
            if value is None or not n:
                cells.append("-")
                continue
            lo, hi = wilson_interval(round(value * n / 100.0), n)
            cells.append(f"{value:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
        counts = sorted({int(ev.get(n_key) or 0) for ev in evals if ev.get(metric) is not None})
        table.add_row(f"{label}, n={'/'.join(map(str, counts))}", *cells)
    table.add_row("helpfulness proxy (ppl) ↓", *(_fmt(ev.get("helpfulness_proxy")) for ev in evals))
    return table


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"
