"""``fedsafe attack privacy RUN_DIR``: extraction attacks on a finished run, from its saved global adapters.

The attacker's view is the run's ``adapters/round_XXXX`` (what a participating client received each round);
the ground truth (victims' data, canaries) is rebuilt from the run's config and ``privacy/canaries.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

attack_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Attacks on finished runs (privacy: training-data extraction).")
console = Console(stderr=True)

HEADLINE = ("zero_rougeL", "zero_near_exact", "partial30_exact", "partial80_exact", "partial80_rougeL",
            "mia_auc", "mia_auc_ref", "canary_exposure", "canary_extraction")


@attack_app.command("privacy")
def privacy_command(
        run_dir: Path = typer.Argument(..., help="a finished run directory"),
        round_: Optional[int] = typer.Option(None, "--round", help="attack the global model of this round "
                                                                   "(default: the last saved one)"),
        k: Optional[int] = typer.Option(None, "--k", help="multi-round tracking: compare with round t-k"),
        alpha: Optional[float] = typer.Option(None, "--alpha", help="multi-round tracking: contrast strength"),
        variant: list[str] = typer.Option([], "--variant", help="plain | logit_contrast | param_contrast "
                                                               "(repeatable; default: the config's)"),
        set_: list[str] = typer.Option([], "--set", help="override a privacy field: --set privacy.n_zero_input=256"),
        no_progress: bool = typer.Option(False, "--no-progress", help="hide progress bars")) -> None:
    """Run the extraction attacks on RUN_DIR's global adapters and write privacy/round_XXXX.json + the table."""
    overrides = ["privacy.enabled=true", *set_]
    if k is not None:
        overrides.append(f"privacy.k={k}")
    if alpha is not None:
        overrides.append(f"privacy.alpha={alpha}")
    if variant:
        overrides.append(f"privacy.variants={json.dumps(variant)}")
    results, t = attack_run(run_dir, round_, overrides, progress=not no_progress)
    _print(results, t)
    print(Path(run_dir) / "privacy" / f"round_{t:04d}.json")


@attack_app.command("privacy-table")
def privacy_table_command(
        run_dirs: list[Path] = typer.Argument(..., help="run or grid directories (different defenses / models)"),
        out: Path = typer.Option(Path("."), "--out", help="folder for privacy_table.{csv,md} and the plot")) -> None:
    """Leakage-versus-utility table and plot across runs that were attacked."""
    from fedsafe.evaluation.leakage import leakage_utility_markdown, write_leakage_utility

    written = write_leakage_utility(run_dirs, out)
    if not written["rows"]:
        console.print("[yellow]no run has privacy records; run `fedsafe attack privacy RUN_DIR` first[/]")
    print(leakage_utility_markdown(written["rows"]))
    print(written["md"])


def attack_run(run_dir: str | Path, round_no: int | None = None, overrides: list[str] | None = None,
               progress: bool = True) -> tuple[dict, int]:
    """Rebuild the run's model and victims, attack round ``round_no`` (default: last saved); returns (results, t)."""
    from fedsafe.attacks.privacy_extraction.extraction import Canary, build_attacker
    from fedsafe.config import load_config
    from fedsafe.data import build_clients
    from fedsafe.errors import ConfigError
    from fedsafe.evaluation.leakage import write_leakage_utility
    from fedsafe.fl.params import FlatLoRA
    from fedsafe.models import attach_lora
    from fedsafe.rundir import RunDir
    from fedsafe.run_model import load_model

    rd = RunDir.open(run_dir)
    cfg = load_config(rd.config_path, overrides or ["privacy.enabled=true"])
    saved = sorted(int(p.name.split("_")[1]) for p in (rd.path / "adapters").glob("round_*") if p.is_dir())
    t = round_no if round_no is not None else (saved[-1] if saved else None)
    if t is None or (t not in saved and not (t == cfg.fl.rounds and rd.adapter_dir("final").exists())):
        raise ConfigError(f"{rd.path}: no saved global adapter for round {t} (saved rounds: {saved or 'none'})")
    loaded = load_model(cfg.model, seed=cfg.seed)
    model = attach_lora(loaded.model, cfg.lora.r, int(cfg.lora.alpha), cfg.lora.dropout, cfg.lora.target_modules,
                        seed=cfg.seed)
    flat = FlatLoRA(model)
    init_vec = flat.get()  # round 0: the same seeded LoRA init the run started from
    clients = build_clients(cfg, loaded.tokenizer, {"model": model, "tokenizer": loaded.tokenizer,
                                                    "name": cfg.model.name})
    flat.set(init_vec)
    canaries_path = rd.path / "privacy" / "canaries.json"
    canaries = [Canary(**c) for c in json.loads(canaries_path.read_text())] if canaries_path.exists() else []
    if cfg.privacy.canaries is not None and not canaries:
        console.print("[yellow]privacy.canaries is set but this run inserted none; canary metrics are skipped[/]")
    attacker = build_attacker(cfg.privacy, model, loaded.tokenizer, flat, init_vec, clients, canaries, seed=cfg.seed,
                              data=cfg.data, run_dir=rd, progress=progress)
    if t not in saved:  # the final adapter of a run that did not save every round
        from safetensors.torch import load_file

        attacker.observe(t, flat.from_state_dict(load_file(str(rd.adapter_dir("final") / "adapter_model.safetensors"))))
    results = attacker.run(t)
    write_leakage_utility([rd.path], rd.path)
    return results, t


def _print(results: dict, t: int) -> None:
    from fedsafe.attacks.privacy_extraction.extraction import flatten_result

    flats = {name: flatten_result(res) for name, res in results.items()}
    lower = any(f.get("zero_rougeL_lower_bound") for f in flats.values())
    table = Table(title=f"privacy attacks on the round-{t} global model",
                  caption=">= lower bound: the n-gram prefilter scored only candidate training texts; "
                          "--set privacy.exhaustive=true scores all" if lower else None)
    table.add_column("variant")
    for h in HEADLINE:
        table.add_column(h, justify="right")
    for name, flat in flats.items():
        cells = []
        for h in HEADLINE:
            v = flat.get(h)
            bound = ">=" if h in ("zero_rougeL", "zero_near_exact") and flat.get("zero_rougeL_lower_bound") else ""
            cells.append("-" if v is None else f"{bound}{v:.3f}")
        table.add_row(name, *cells)
    console.print(table)
