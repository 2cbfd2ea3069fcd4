"""The README stays a short front door whose run-directory table matches what the quickstart writes (issue 34)."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
QUICKSTART = ROOT / "src" / "fedsafe" / "resources" / "quickstart.yaml"


def readme_run_files(text: str) -> list[str]:
    """The paths in the first column of the README's "What a run writes" table, as glob patterns."""
    section = text.split("## What a run writes", 1)[1].split("\n## ", 1)[0]
    patterns = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        for name in re.findall(r"`([^`]+)`", first_cell):
            patterns.append(re.sub(r"000N|XXXX", "*", name).rstrip("/"))
    return patterns


def test_the_readme_is_a_short_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250
    first_block = text.split("```", 2)[1]
    assert "make demo" in first_block and "make test" in first_block  # the two commands come first
    for page in re.findall(r"\]\((docs/[^)#]+)", text):  # every docs link points at a page that exists
        assert (ROOT / page).exists(), page


def test_the_run_directory_table_matches_what_the_quickstart_writes(tmp_path):
    from fedsafe.config import load_config
    from fedsafe.pipeline import run_experiment

    cfg = load_config(QUICKSTART, ["model.name=tiny", f"output_dir={tmp_path}", "fl.rounds=2", "fl.local_steps=1",
                                   "data.samples_per_client=4", "eval.n_prompts=3", "eval.n_normal_prompts=3",
                                   "eval.max_new_tokens=3", "eval.refusal_max_new_tokens=3",
                                   "eval.refusal_detector=rule"])  # the files, not the detector, are tested
    run_experiment(cfg, progress=False)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    written = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*"))
    patterns = readme_run_files(README.read_text(encoding="utf-8"))
    assert "config.yaml" in patterns and "adapters/final" in patterns
    missing = [pat for pat in patterns if not fnmatch.filter(written, pat)]
    assert not missing, f"the README lists {missing}, which the quickstart did not write"
    top_level = sorted({w.split("/")[0] for w in written})
    undocumented = [t for t in top_level if not any(pat.split("/")[0] == t for pat in patterns)]
    assert not undocumented, f"the quickstart wrote {undocumented}, which the README's table does not list"


@pytest.mark.parametrize("table, missing", [
    ("| `config.yaml` | c |\n| `ghost.csv` | g |\n", ["ghost.csv"]),
])
def test_the_table_parser_finds_a_file_no_run_writes(table, missing):
    patterns = readme_run_files("## What a run writes\n\n| file | content |\n|---|---|\n" + table + "\n## Next\n")
    assert [p for p in patterns if not fnmatch.filter(["config.yaml", "adapters/final"], p)] == missing
