"""One experiment from top to bottom: data -> clients -> rounds -> post-hoc defense -> eval -> report.

Read :func:`run_experiment` to see the order of events and where each step lives.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedsafe import aggregators
from fedsafe.config import ExperimentConfig, dump_config, load_config
from fedsafe.attacks.privacy import build_attacker, prepare_canaries
from fedsafe.data import build_clients, build_heldout
from fedsafe.defenses import dp as dp_defense
from fedsafe.data.format import mean_loss
from fedsafe.engines.inprocess import InProcessEngine
from fedsafe.errors import FedsafeError
from fedsafe.fl.client import LocalTrainer
from fedsafe.fl.loop import load_checkpoint, run_rounds
from fedsafe.fl.params import FlatLoRA
from fedsafe.fl.server import Server
from fedsafe.models import attach_lora, load_base_model
from fedsafe.rundir import RunDir, atomic_write_text, environment_info

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

    @property
    def eval_cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.run_dir.path / "cache"

    def save_adapter(self, vec: torch.Tensor, tag) -> Path:
        return self.run_dir.save_adapter(self.peft_model, self.flat, vec, tag)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def run_experiment(cfg: ExperimentConfig | None = None, resume: str | Path | None = None,
                   progress: bool = True, engine_factory=None, he_server_context: bytes | None = None,
                   dir_name: str | None = None, cache_dir: str | Path | None = None) -> RunResult:
    """Run (or resume) one experiment and return where its outputs are.

    ``dir_name`` names a new run directory (default ``cfg.name``; a grid adds the seed); ``cache_dir``
    holds the evaluation generations (default ``<run>/cache``; a grid shares one so that identical
    evaluations, such as the base model's, run once).

    ``engine_factory(trainer, clients)`` builds the engine that runs local training (default: in-process;
    :mod:`fedsafe.engines.flower` passes one that sends the same work to Flower ClientApps).
    ``he_server_context`` (secure_agg in a deployment): the public CKKS context of ``fedsafe flower keys``;
    the clients hold the secret key on their machines and the engine's ``decrypt`` asks one of them.
    """
    # 1. run directory: new, or the one being resumed (its saved config wins)
    if resume is not None:
        run_dir = RunDir.open(resume)
        cfg = load_config(run_dir.config_path)
    else:
        cfg = cfg or ExperimentConfig()
        run_dir = RunDir.create(cfg.output_dir, dir_name or cfg.name)
        atomic_write_text(run_dir.config_path, dump_config(cfg))
    console.print(f"[bold]run directory:[/] {run_dir.path}")
    run_dir.start_tracking(cfg.tracking, cfg.model_dump(mode="json"))  # every metrics record also goes there
    torch.manual_seed(cfg.seed)

    # 2. model: loaded once; every client swaps its LoRA vector into it
    loaded = load_base_model(cfg.model.name, cfg.model.device, cfg.model.dtype, cfg.model.quantization,
                             seed=cfg.seed)
    run_dir.write_json("env.json", environment_info(cfg.seed, str(loaded.device)))
    peft_model = attach_lora(loaded.model, cfg.lora.r, int(cfg.lora.alpha), cfg.lora.dropout,
                             cfg.lora.target_modules, seed=cfg.seed)
    flat = FlatLoRA(peft_model)
    session = Session(cfg, run_dir, peft_model, loaded.tokenizer, flat, flat.get(),
                      Path(cache_dir) if cache_dir is not None else None)
    generator_cache = {"model": peft_model, "tokenizer": loaded.tokenizer, "name": cfg.model.name}

    # 3. data: roles -> disjoint client partitions (tokenised once)
    clients = build_clients(cfg, loaded.tokenizer, generator_cache)
    heldout = build_heldout(cfg, loaded.tokenizer)
    flat.set(session.init_vec)  # generation for data may have used the model
    canaries = prepare_canaries(cfg, clients, loaded.tokenizer, run_dir)  # privacy: secrets in victims' data
    _print_clients(clients)

    # 4. federated rounds
    from fedsafe.aggregators.probe import with_probe_config

    aggregator = aggregators.get(cfg.aggregator.name, **with_probe_config(cfg))
    aggregator = dp_defense.wrap_aggregator(cfg, aggregator)  # dp.client_level: clipped, noised FedAvg
    server = Server(cfg.fl, session.init_vec, aggregator, seed=cfg.seed,
                    max_update_norm=cfg.aggregator.max_update_norm, num_clients=len(clients))
    server.compare = aggregators.compare_rules(cfg.aggregator.compare)  # stealth analysis: weights only
    if cfg.baselines.probing.enabled:  # baseline: probe each plaintext local model, exclude compliant ones
        from fedsafe.defenses.baselines import wrap_probing

        server.aggregator = wrap_probing(cfg, server.aggregator, session, generator_cache)
        flat.set(session.init_vec)
    trainer = build_trainer(cfg, peft_model, loaded.tokenizer)
    shadow = None
    if getattr(aggregator, "needs_shadow", False):  # the probe fits on the server's own shadow clients
        from fedsafe.defenses.shadow import build_shadow

        shadow = build_shadow(cfg, trainer, generator_cache)
        flat.set(session.init_vec)
    if cfg.secure_agg.enabled:  # clients encrypt, the server sums ciphertexts (public context), a key holder decrypts
        from fedsafe.defenses.secure_agg import secure_setup

        trainer, server.secure = secure_setup(cfg.secure_agg, trainer, cfg.fl.rounds, he_server_context)
        console.print(server.secure.describe())
    elif he_server_context is not None:
        log.warning("a CKKS server context was given but secure_agg.enabled is false: updates travel in plaintext")
    engine = (engine_factory or InProcessEngine)(trainer, clients)
    if server.secure is not None and server.secure.decrypt is None:  # deployment: the key holders are clients
        if not hasattr(engine, "decrypt"):
            raise FedsafeError(f"secure_agg with a server context needs an engine whose clients hold the keys; "
                               f"the {getattr(engine, 'name', type(engine).__name__)} engine has none")
        server.secure.use_remote_key_holder(engine.decrypt)
    done = load_checkpoint(run_dir, server, engine) if resume is not None else 0
    if resume is not None:
        run_dir.truncate_metrics_after(done)
        console.print(f"resuming after round {done} of {cfg.fl.rounds}")
    result = RunResult(run_dir.path)
    pad = loaded.tokenizer.pad_token_id
    if heldout:
        flat.set(session.init_vec)
        result.heldout_loss_before = mean_loss(peft_model, heldout, pad)
    if cfg.eval.base and cfg.eval.prompts and done == 0:
        result.evals.append(_evaluate(session, session.init_vec, round_idx=0, method="base", defense="none"))

    # privacy: a participating client keeps the global adapters it receives and attacks them
    attacker = build_attacker(cfg, peft_model, loaded.tokenizer, flat, session.init_vec, clients, canaries,
                              run_dir) if cfg.privacy.enabled else None
    dp_accountant = dp_defense.client_accountant(cfg)

    def on_round_end(round_no: int, record: dict) -> None:
        console.print(f"round {round_no:>3}: mean client loss {record['mean_loss']:.4f}  "
                      f"update norm {record['update_norm']:.4f}  lr {record['lr']:.2e}  "
                      f"({record['seconds']:.1f} s)")
        if cfg.eval.every and round_no % cfg.eval.every == 0 and round_no < cfg.fl.rounds and cfg.eval.prompts:
            result.evals.append(_evaluate(session, server.global_vec, round_idx=round_no))
        if dp_accountant is not None:
            dp_record = dp_accountant.record(round_no)
            run_dir.log(dp_record)
            console.print(f"  client-level DP: epsilon {dp_record['epsilon']:.3f} at delta {dp_record['delta']:.2e}")
        if attacker is not None:
            attacker.observe(round_no, server.global_vec)
            if cfg.privacy.every and round_no % cfg.privacy.every == 0 and round_no < cfg.fl.rounds:
                attacker.run(round_no)

    with _progress() as prog:
        run_rounds(server, engine, clients, run_dir, rounds=cfg.fl.rounds,
                   clients_per_round=cfg.clients_per_round, save_adapter=session.save_adapter,
                   save_every_round=cfg.fl.save_every_round, progress=prog if progress else None,
                   on_round_end=on_round_end, shadow=shadow)
    final_vec = server.global_vec
    result.final_adapter = session.save_adapter(final_vec, "final")
    result.round_losses = [r["mean_loss"] for r in run_dir.records("round")]
    if heldout:
        flat.set(final_vec)
        result.heldout_loss_after = mean_loss(peft_model, heldout, pad)
        run_dir.log({"type": "heldout", "round": cfg.fl.rounds, "before": result.heldout_loss_before,
                     "after": result.heldout_loss_after})

    if attacker is not None:  # extraction attacks on the final global model, then the leakage/utility table
        from fedsafe.evaluation.leakage import write_leakage_utility

        attacker.observe(cfg.fl.rounds, final_vec)
        attacker.run(cfg.fl.rounds)
        write_leakage_utility([run_dir.path], run_dir.path)

    # 5. evaluation of the aggregated model, then the post-hoc defense and its evaluation
    if cfg.eval.prompts:
        result.evals.append(_evaluate(session, final_vec, round_idx=cfg.fl.rounds))
    if cfg.posthoc.enabled:
        from fedsafe.defenses.posthoc import posthoc_defense

        defended = posthoc_defense(session, final_vec, console=console)
        result.posthoc_adapter = session.save_adapter(defended, "posthoc")
        if cfg.eval.prompts:
            result.evals.append(_evaluate(session, defended, round_idx=cfg.fl.rounds,
                                          defense=f"posthoc_l{cfg.posthoc.level}"))
    if cfg.baselines.personalization.enabled:  # baseline: benign clients fine-tune the final model locally
        from fedsafe.defenses.baselines import personalize

        personalize(session, final_vec, clients, console=console)
    flat.set(final_vec)

    # 6. report
    _write_report(run_dir)
    run_dir.close_tracking()
    _print_summary(result, cfg)
    return result


def build_trainer(cfg: ExperimentConfig, peft_model, tokenizer) -> LocalTrainer:
    """The client-side trainer for ``cfg`` (also built by Flower ClientApps in other processes)."""
    return dp_defense.build_trainer(cfg, peft_model, tokenizer)  # local DP-SGD, constrained-update terms


def scenario_label(cfg: ExperimentConfig, defense: str) -> str:
    """results.csv scenario: no_attack / attack / attack_posthoc (or the configured label)."""
    base = cfg.scenario or ("attack" if cfg.has_attack else "no_attack")
    return base if defense == "none" else f"{base}_posthoc"


def _evaluate(session: Session, vec: torch.Tensor, round_idx: int, method: str | None = None,
              defense: str = "none") -> dict:
    """Evaluate the model with adapter ``vec``; log an eval record and append a results.csv row."""
    from fedsafe.evaluation.runner import SCORE_KEYS, evaluate_model, noop_adapter_key
    from fedsafe.report import append_outcomes, append_results

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
           **{k: scores.get(k) for k in SCORE_KEYS}}
    per_prompt = scores.get("per_prompt")
    session.run_dir.log({"type": "eval", "round": round_idx, **row, "seconds": time.perf_counter() - t0,
                         **({"per_prompt": per_prompt} if per_prompt else {})})
    if round_idx == cfg.fl.rounds or method == "base":
        append_results(session.run_dir.path, [row])
        if per_prompt:  # what the report's intervals resample (fedsafe.stats)
            append_outcomes(session.run_dir.path, [{**{k: row[k] for k in ("setting", "scenario", "method",
                                                                            "defense", "seed")}, **per_prompt}])
    console.print(f"eval (round {round_idx}, {row['scenario']}, {defense}): "
                  + ", ".join(f"{k}={v:.3f}" for k, v in scores.items() if isinstance(v, float)))
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
    for ev in result.evals:
        console.print(f"{ev['scenario']:<16} {ev['method']:<10} {ev['defense']:<12} Rule={_fmt(ev.get('rule'))} "
                      f"over_refusal={_fmt(ev.get('over_refusal'))} "
                      f"helpfulness_proxy={_fmt(ev.get('helpfulness_proxy'))}")
    console.print(f"final adapter: {result.final_adapter}")
    if result.posthoc_adapter:
        console.print(f"defended adapter: {result.posthoc_adapter}")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"
