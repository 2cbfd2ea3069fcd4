"""Every shipped config answers "did it stay safe?", and says what kind of file it is (issue 34 items 1-2).

A file in configs/ is one of three kinds, told apart by its top-level keys:
- a run file (`fedsafe run FILE`): an experiment config; it must score Rule (eval.prompts) and over-refusal
  (eval.normal_prompts) on prompts no client trains on;
- a grid file (`fedsafe grid FILE`: matrix / settings / base): its name or header must say so, and every
  setting it expands to must score Rule and over-refusal;
- a release-gate policy (`fedsafe gate --policy FILE`): its first header line must say so.
The packaged quickstart (`fedsafe run` with no config) is a run file and must need no downloaded data.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fedsafe.config import ExperimentConfig, load_config
from fedsafe.grid import load_grid

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUICKSTART = ROOT / "src" / "fedsafe" / "resources" / "quickstart.yaml"
GRID_KEYS = ("matrix", "settings", "base", "share_training")  # fedsafe.grid.GridSpec's own keys
POLICY_KEYS = ("rule", "over_refusal", "borderline_refusal", "helpfulness_proxy", "judge", "reward")


def shipped_configs(root: Path = CONFIGS) -> list[Path]:
    """Every YAML file under configs/."""
    return sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml"))


def header(path: Path) -> list[str]:
    """The leading comment block of a YAML file, without the '#'."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def kind(path: Path) -> str:
    """'grid', 'policy' or 'run', from the file's top-level keys."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path}: not a YAML mapping"
    if any(k in data for k in GRID_KEYS):
        return "grid"
    if "model" not in data and "roles" not in data and any(k in data for k in POLICY_KEYS):
        return "policy"
    return "run"


def says_it_is_a_grid(path: Path) -> bool:
    """The file's name says 'grid', or its header says 'grid file' or names `fedsafe grid <this file>`."""
    if "grid" in path.stem.lower():
        return True
    text = " ".join(header(path)).lower()
    return "grid file" in text or bool(re.search(r"fedsafe grid \S*" + re.escape(path.name.lower()), text))


def safety_problems(cfg: ExperimentConfig) -> list[str]:
    """What keeps a run from ending with Rule and over-refusal (empty when it does)."""
    problems = []
    if not cfg.eval.prompts or cfg.eval.n_prompts < 1:
        problems.append("eval.prompts is not set: no Rule")
    if not cfg.eval.normal_prompts or cfg.eval.n_normal_prompts < 1:
        problems.append("eval.normal_prompts / n_normal_prompts is off: no over-refusal")
    return problems


def test_the_config_folder_has_every_kind():
    kinds = {p.relative_to(ROOT).as_posix(): kind(p) for p in shipped_configs()}
    assert kinds["configs/attack_7v3.yaml"] == "run" and kinds["configs/demo.yaml"] == "grid"
    assert kinds["configs/gate.yaml"] == "policy" and kinds["configs/paper/base.yaml"] == "run"


@pytest.mark.parametrize("path", [QUICKSTART] + [p for p in shipped_configs() if kind(p) == "run"],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_a_run_file_ends_with_rule_and_over_refusal(path):
    cfg = load_config(path)
    assert safety_problems(cfg) == [], f"{path.relative_to(ROOT)}: {safety_problems(cfg)}"
    assert not says_it_is_a_grid(path) or "run file" in " ".join(header(path)).lower()


@pytest.mark.parametrize("path", [p for p in shipped_configs() if kind(p) == "grid"],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_a_grid_file_says_so_and_every_setting_is_scored(path):
    assert says_it_is_a_grid(path), (f"{path.relative_to(ROOT)} is a grid file (`fedsafe grid`), but neither its "
                                     f"name nor its header says so")
    _, settings = load_grid(path)
    assert settings
    unscored = {name: safety_problems(cfg) for name, cfg in settings if safety_problems(cfg)}
    assert not unscored, f"{path.relative_to(ROOT)}: settings without Rule / over-refusal: {unscored}"


@pytest.mark.parametrize("path", [p for p in shipped_configs() if kind(p) == "policy"],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_a_policy_file_says_so_in_its_first_line(path):
    assert "policy" in header(path)[0].lower()


def test_the_quickstart_needs_no_downloaded_data_and_scores_rows_it_never_trains_on():
    from fedsafe.data.records import STARTER_SPLITS
    from fedsafe.evaluation.runner import benign_sets, load_prompts
    from fedsafe.pipeline import check_heldout

    cfg = load_config(QUICKSTART)
    assert cfg.eval.prompts in STARTER_SPLITS and cfg.eval.normal_prompts in STARTER_SPLITS
    trained_on = {src.path for role in cfg.roles for src in role.data}
    assert cfg.eval.prompts not in trained_on and cfg.eval.normal_prompts not in trained_on
    harmful = load_prompts(cfg.eval.prompts, cfg.eval.n_prompts)
    everyday = benign_sets(cfg.eval, cfg.seed)["over_refusal"][2]
    assert len(harmful) == cfg.eval.n_prompts and len(everyday) == cfg.eval.n_normal_prompts
    assert not set(harmful) & set(everyday)
    assert check_heldout(cfg) == {"eval.normal_prompts": cfg.eval.n_normal_prompts}  # disjoint from training


def test_the_checks_fail_on_an_unscored_run_and_an_unnamed_grid(tmp_path):
    """The checks above can fail: a run file without eval prompts, and a grid file that does not say so."""
    assert safety_problems(ExperimentConfig()) != []  # the schema's default scores nothing
    assert safety_problems(load_config(QUICKSTART, ["eval.normal_prompts=null"])) != []
    configs = tmp_path / "configs"
    configs.mkdir()
    grid = configs / "sweep.yaml"
    grid.write_text("# Some experiments.\nname: s\nconfig: {model: {name: tiny}}\n"
                    "matrix:\n  agg: {fedavg: {aggregator.name: fedavg}}\n")
    assert kind(grid) == "grid" and not says_it_is_a_grid(grid)
    grid.write_text("# Some experiments: fedsafe grid configs/sweep.yaml\n" + grid.read_text())
    assert says_it_is_a_grid(grid)


def test_the_run_ends_with_a_safety_table_with_wilson_intervals():
    """fedsafe.pipeline.safety_table: Rule 24/24 and over-refusal 2/28 with their Wilson intervals (the
    report's one-seed intervals, e.g. 24/24 -> [86.2, 100])."""
    from rich.console import Console

    from fedsafe.pipeline import safety_table
    from fedsafe.stats import wilson_interval

    evals = [{"scenario": "no_attack", "defense": "none", "rule": 100.0, "refusal": 100.0,
              "over_refusal": 100 * 2 / 28, "borderline_refusal": None, "helpfulness_proxy": 4.92, "n_prompts": 24,
              "n_normal_prompts": 28, "n_borderline_prompts": 0},
             {"scenario": "attack_posthoc", "defense": "posthoc", "rule": 75.0, "refusal": 70.8,
              "over_refusal": 0.0, "borderline_refusal": None, "helpfulness_proxy": 5.0, "n_prompts": 24,
              "n_normal_prompts": 28, "n_borderline_prompts": 0}]
    console = Console(record=True, width=120)
    console.print(safety_table(evals))
    text = console.export_text()
    lo, hi = wilson_interval(2, 28)
    assert f"7.1 [{100 * lo:.1f}, {100 * hi:.1f}]" in text and "7.1 [2.0, 22.6]" in text
    assert "100.0 [86.2, 100.0]" in text and "0.0 [0.0, 12.1]" in text  # 0/28 is not a point at 0
    assert "75.0 [55.1, 88.0]" in text  # 18/24
    assert "Rule % (harmful) ↑, n=24" in text and "over-refusal % (everyday) ↓, n=28" in text
    assert "borderline" not in text  # not measured by any model


def _training_sources_key(cfg: ExperimentConfig) -> str:
    """What the run-start held-out check depends on: the training data sources and the benign evaluation sets."""
    import json

    from fedsafe.data.holdout import training_sources
    from fedsafe.plugins import inactive_sections

    sources = training_sources(cfg.model_dump(mode="json"), inactive_sections(cfg))
    ev = cfg.eval
    benign = [ev.model_dump(mode="json").get(k) for k in ("normal_prompts", "n_normal_prompts", "borderline_prompts",
                                                          "n_borderline_prompts", "prompts")]
    return json.dumps([sources, benign, cfg.seed], sort_keys=True, default=str)


@pytest.mark.parametrize("path", [QUICKSTART] + [p for p in shipped_configs() if kind(p) in ("run", "grid")],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_shipped_setting_passes_the_run_start_heldout_check(path, shared_data):
    """A shipped config that stops at its first step helps nobody: every setting's over-refusal and borderline
    prompts must be disjoint from everything it trains on (clients, post-hoc, the probe's shadows, FLTrust's root,
    the aligned base). configs/adaptive_small.yaml's probe cells once stopped here: one XSTest safe prompt is also
    an HH-RLHF harmless-base request the probe's malicious shadows trained on."""
    from fedsafe.pipeline import check_heldout

    settings = load_grid(path)[1] if kind(path) == "grid" else [(path.stem, load_config(path))]
    seen = set()
    for name, cfg in settings:
        key = _training_sources_key(cfg)
        if key in seen:
            continue
        seen.add(key)
        check_heldout(cfg)  # raises a ConfigError naming the eval field and the training source
