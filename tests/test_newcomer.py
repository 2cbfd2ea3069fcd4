"""A newcomer's first hour (issue 34): errors that point somewhere, --version, a short ``fedsafe info``."""

import json
import sys

import pytest

from fedsafe.cli import main
from fedsafe.config import load_config
from fedsafe.errors import ConfigError, did_you_mean


def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run ``fedsafe ARGS`` in this process through main() (the console script's error handling)."""
    monkeypatch.setattr(sys, "argv", ["fedsafe", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_did_you_mean_picks_the_closest_field():
    known = ["fl.rounds", "fl.lr", "lora.r", "roles.N.clients", "roles.N.data.N.path", "eval.prompts"]
    assert did_you_mean("fl.rouns", known) == "; did you mean fl.rounds?"
    assert did_you_mean("rounds", known) == "; did you mean fl.rounds?"  # the right field in the wrong place
    assert did_you_mean("roles.2.clinets", known) == "; did you mean roles.2.clients?"  # the user's own index
    assert did_you_mean("roles.1.data.0.pth", known) == "; did you mean roles.1.data.0.path?"
    assert did_you_mean("completely.unrelated", known) == ""


def test_unknown_set_key_suggests_the_field_and_names_no_missing_option(monkeypatch, capsys):
    with pytest.raises(ConfigError, match=r"fl\.rouns: unknown field; did you mean fl\.rounds\?"):
        load_config(None, ["fl.rouns=1"])
    code, out, err = _cli(monkeypatch, capsys, "run", "--set", "fl.rouns=1")
    assert code == 2 and "did you mean fl.rounds?" in err
    # nothing close: the message points to an option that exists and lists the fields
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["fl.qqqqqqqqqq=1"])
    assert "`fedsafe run --help-config` lists the fields" in str(exc.value)
    code, out, err = _cli(monkeypatch, capsys, "run", "--help-config", "fl")
    assert code == 0 and err == ""
    listed = [line.split()[0] for line in out.splitlines()]
    assert "fl.rounds" in listed and all(p == "fl" or p.startswith("fl.") for p in listed)
    assert "fl.rounds" in out and "local_steps" in out
    code, out, err = _cli(monkeypatch, capsys, "run", "--help-config")
    assert code == 0 and {"fl.rounds", "lora.r", "roles.N.data.N.path", "eval.prompts"} <= {
        line.split()[0] for line in out.splitlines()}


def test_unknown_yaml_key_suggests_the_field(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("lora:\n  rank: 8\nfl:\n  rounds: 1\n")
    with pytest.raises(ConfigError, match=r"lora\.rank: unknown field; did you mean lora\.r\?"):
        load_config(path)
    path.write_text("roles:\n  - {name: benign, clients: 2, data: [{path: starter:train, max_row: 3}]}\n")
    with pytest.raises(ConfigError, match=r"roles\.0\.data\.0\.max_row: unknown field; did you mean "
                                          r"roles\.0\.data\.0\.max_rows\?"):
        load_config(path)


def test_the_cli_names_no_option_that_does_not_exist(monkeypatch, capsys):
    """Every ``fedsafe run --xyz`` an error message mentions is an option of ``fedsafe run``."""
    import re
    from pathlib import Path

    import fedsafe

    src = Path(fedsafe.__file__).parent
    mentioned = {m for f in src.rglob("*.py") for m in re.findall(r"fedsafe run (--[a-z-]+)", f.read_text())}
    code, out, err = _cli(monkeypatch, capsys, "run", "--help")
    assert code == 0
    assert mentioned and all(opt in out for opt in mentioned), (mentioned, out)


def test_a_grid_file_given_to_run_says_so(monkeypatch, capsys, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\nconfig: {model: {name: tiny}}\nmatrix:\n  agg: {fedavg: {aggregator.name: fedavg}}\n")
    code, out, err = _cli(monkeypatch, capsys, "run", str(grid))
    assert code == 2
    assert "is a grid file" in err and f"fedsafe grid {grid}" in err.replace("\n", "")
    assert not (tmp_path / "runs").exists()
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("model: {name: tiny}\nfl: {rounds: 1}\n")
    code, out, err = _cli(monkeypatch, capsys, "grid", str(experiment), "--dry-run")
    assert code == 2 and "is an experiment file" in err and f"fedsafe run {experiment}" in err.replace("\n", "")


def test_version(monkeypatch, capsys):
    from importlib.metadata import version

    code, out, err = _cli(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"fedsafe {version('fedsafe')}"


def test_info_is_short_and_json_is_the_full_dump(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("FEDSAFE_CACHE", str(tmp_path / "cache"))
    code, out, err = _cli(monkeypatch, capsys, "info")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) <= 12
    fields = {line.split(":", 1)[0] for line in lines}
    assert {"fedsafe", "base model", "local path", "device", "cache dir", "data dir"} <= fields
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in out and str(tmp_path / "cache") in out
    model_dir = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    code, out, err = _cli(monkeypatch, capsys, "info", "--json")
    data = json.loads(out)
    assert data["base_model"] == {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "local_path": str(model_dir)}
    assert data["embedded_cached"] is True and "installed" in data and "found" in data["data_dir"]


def test_unknown_gate_policy_field_suggests_the_field():
    from fedsafe.evaluation.gate.config import parse_policy

    with pytest.raises(ConfigError, match=r"rule\.minimum: unknown field; did you mean rule\.min\?"):
        parse_policy({"rule": {"minimum": 0}}, "policy.yaml")
    with pytest.raises(ConfigError, match=r"over_refusal\.min_count: unknown field; "
                                          r"did you mean over_refusal\.min_n\?"):
        parse_policy({"over_refusal": {"max": 10, "min_count": 5}}, "policy.yaml")
