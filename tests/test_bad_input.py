"""What a hostile or unlucky user can give fedsafe (issue 30): a checkpoint that is a malicious pickle, input files
that are missing or malformed, values no run can use, a full disk or a read-only file system mid-run, one client's
enormous update, and the modes of the files a run writes. Each is refused before any work with a one-line error
(exit 2) that names the field or path, or handled so that the run can be resumed."""

import errno
import json
import os
import stat
import sys

import pytest
import torch
from safetensors.torch import load_file

from fedsafe.cli import main
from fedsafe.config import FLConfig, load_config
from fedsafe.errors import ConfigError, DataError
from fedsafe.rundir import RunDir, load_checkpoint_state, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.name=tiny", "name=t", "fl.rounds=2", "fl.local_steps=1", "fl.batch_size=2", "data.samples_per_client=4",
        "data.max_length=64", "roles.0.clients=2", "fl.clients_per_round=2", "fl.lr=0.01",
        "eval.helpfulness_proxy=false"]


def _sets(tmp_path, *extra, seed=0):
    args = []
    for item in [*TINY, f"seed={seed}", f"output_dir={tmp_path}", *extra]:
        args += ["--set", item]
    return args


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """Run ``fedsafe ARGS`` in this process (main(): the error handling of the console script)."""
    monkeypatch.setattr(sys, "argv", ["fedsafe", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.err + out.out


def _error_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("error:"))


# --- item 2: the checkpoint is never unpickled -------------------------------------------------------------------

class _WritesAMarker:
    """A pickle payload: unpickling it runs ``open(marker, 'w')`` (any code could run the same way)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_is_refused_and_its_code_never_runs(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"name: t\nmodel: {{name: tiny}}\noutput_dir: {tmp_path}\n")
    marker = tmp_path / "pwned"
    torch.save({"server": {"round": 1, "payload": _WritesAMarker(marker)}, "engine": {}},
               run_dir / "checkpoint" / "state.pt")
    with pytest.raises(ConfigError, match="refusing to resume from .*state.pt"):
        load_checkpoint_state(run_dir / "checkpoint" / "state.pt")
    code, text = _cli(monkeypatch, capsys, "run", "--resume", str(run_dir), "--no-progress")
    assert code == 2 and "Traceback" not in text
    assert f"refusing to resume from {run_dir / 'checkpoint' / 'state.pt'}" in _error_line(text)
    assert not marker.exists()  # neither load ran the payload
    # the same file under a full unpickle does run it: the payload is live, so the refusal above is what saved us
    torch.load(run_dir / "checkpoint" / "state.pt", weights_only=False)
    assert marker.exists()


def test_checkpoint_holds_the_probe_state_exactly_without_pickle(tiny, tmp_path, test_seed):
    """The probe's state (a fitted scikit-learn classifier, numpy batches, numpy scalars) survives the weights-only
    checkpoint bit for bit: the restored probe gives the same aggregate and weights."""
    from fedsafe import aggregators
    from fedsafe.fl.params import FlatLoRA
    from fedsafe.models import attach_lora

    model, _ = tiny
    flat = FlatLoRA(attach_lora(model, r=2, alpha=4, seed=test_seed))
    gen = torch.Generator().manual_seed(test_seed)
    mask = flat.mask("B", [0])
    direction = torch.randn(int(mask.sum()), generator=gen)

    def make(labels):
        u = 0.1 * torch.randn(len(labels), flat.numel, generator=gen)
        for i, lab in enumerate(labels):
            u[i, mask] += (1 if lab else -1) * direction
        return u

    probe = aggregators.get("probe", mode="trust")
    probe.fit_updates(make([0] * 6 + [1] * 6), [0] * 6 + [1] * 6, flat=flat)
    u, n, ids = make([0, 1, 0]), torch.ones(3), ["a", "b", "c"]
    probe(u, n, ids)
    path = tmp_path / "state.pt"
    save_checkpoint({"server": {"round": 1, "aggregator": probe.state_dict()}, "engine": {}}, path)
    torch.load(path, weights_only=True)  # loads with no allow-listed globals at all
    fresh = aggregators.get("probe", mode="trust")
    fresh.features = probe.features
    fresh.load_state_dict(load_checkpoint_state(path)["server"]["aggregator"])
    a, b = probe(u, n, ids), fresh(u, n, ids)
    assert torch.equal(a.update, b.update) and a.info["probe"]["weight"] == b.info["probe"]["weight"]


def test_a_checkpoint_of_plain_tensors_from_before_still_resumes(tmp_path):
    old = {"server": {"round": 2, "global_vec": torch.arange(4.0), "optimizer": {}, "aggregator": {}},
           "engine": {"c0": {"c": torch.ones(2)}}}
    torch.save(old, tmp_path / "state.pt")  # what fedsafe wrote before the format marker
    back = load_checkpoint_state(tmp_path / "state.pt")
    assert torch.equal(back["server"]["global_vec"], old["server"]["global_vec"]) and back["server"]["round"] == 2


def test_unstorable_state_fails_when_saved_not_when_resumed(tmp_path):
    with pytest.raises(TypeError, match=r"state.server.aggregator.thing is a .*object"):
        save_checkpoint({"server": {"aggregator": {"thing": object()}}}, tmp_path / "state.pt")
    assert not (tmp_path / "state.pt").exists()


# --- item 3: every input is checked before anything is created --------------------------------------------------

def test_missing_eval_prompts_fails_before_any_work(tmp_path, monkeypatch, capsys):
    import fedsafe.pipeline
    from fedsafe.pipeline import run_experiment

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(fedsafe.pipeline, "_load_model", no_model)
    out = tmp_path / "runs"
    cfg = load_config(None, [*TINY, f"output_dir={out}", "eval.prompts=/nonexistent/advbench.csv"])
    with pytest.raises(DataError, match=r"eval.prompts='/nonexistent/advbench.csv': data file not found"):
        run_experiment(cfg, progress=False)
    code, text = _cli(monkeypatch, capsys, "run", *_sets(out, "eval.prompts=/nonexistent/advbench.csv"))
    assert code == 2 and "/nonexistent/advbench.csv" in _error_line(text)
    assert not out.exists()  # no run directory, so no client record either


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "numbers.json").write_text("[1, 2, 3]")
    (tmp_path / "no_columns.csv").write_text("a,b\nx,y\n")
    (tmp_path / "broken.jsonl").write_text('{"instruction": "x", "response": \n')
    (tmp_path / "latin1.csv").write_bytes("goal\ncaf\xe9\n".encode("latin-1"))
    (tmp_path / "model_dir_missing").mkdir()
    return tmp_path


@pytest.mark.parametrize("override, needle", [
    ("roles.0.data.0.path=numbers.json", "roles.0.data.0.path: numbers.json: record 1 is 1 (int), not an object"),
    ("roles.0.data.0.path=no_columns.csv", "roles.0.data.0.path: data source 'no_columns.csv': "
                                           "instruction_field='instruction' is not a field"),
    ("roles.0.data.0.path=broken.jsonl", "roles.0.data.0.path: broken.jsonl: could not parse"),
    ("roles.0.data.0.path=missing.jsonl", "roles.0.data.0.path: data file not found: missing.jsonl"),
    ("data.heldout=[{path: ./gone.csv}]", "data.heldout.0.path: data file not found: gone.csv"),
    ("eval.prompts=numbers.json", "eval.prompts='numbers.json': numbers.json: record 1 is 1 (int)"),
    ("eval.prompts=no_columns.csv", "eval.prompts='no_columns.csv': records need one of the fields"),
    ("eval.prompts=latin1.csv", "eval.prompts='latin1.csv': latin1.csv: could not parse"),
    ("eval.normal_prompts=/no/normal.jsonl", "eval.normal_prompts='/no/normal.jsonl': data file not found"),
    ("eval.borderline_prompts={path: /no/xstest.csv, instruction_field: prompt}",
     "eval.borderline_prompts='/no/xstest.csv': data file not found"),
    ("eval.mt_bench={questions: /no/question.jsonl}", "eval.mt_bench.questions: file not found: /no/question.jsonl"),
    ("posthoc.aligned=[{path: /no/aligned.jsonl}]", "posthoc.aligned.0.path: data file not found"),
    ("probe.malicious=[{path: /no/shadow.jsonl}]", "probe.malicious.0.path: data file not found"),
    ("model.name=./no_such_model", "model.name: ./no_such_model is not a model directory"),
])
def test_bad_input_files_fail_at_the_start_naming_field_and_path(bad_files, monkeypatch, capsys, override, needle):
    monkeypatch.chdir(bad_files)
    used = {"eval.normal": ["eval.prompts=starter:heldout"], "eval.borderline": ["eval.prompts=starter:heldout"],
            "eval.mt_bench": ["eval.prompts=starter:heldout"], "posthoc.": ["posthoc.enabled=true"]}  # read when used
    used = next((extra for key, extra in used.items() if override.startswith(key)), [])
    code, text = _cli(monkeypatch, capsys, "run", *_sets(bad_files / "runs", *used, override))
    assert code == 2 and "Traceback" not in text, text[-3000:]
    assert needle in _error_line(text)
    assert not (bad_files / "runs").exists()


def test_benign_prompt_sets_are_checked_only_when_the_safety_evaluation_uses_them():
    from fedsafe.pipeline import check_inputs

    check_inputs(load_config(None, [*TINY, "eval.normal_prompts=/no/normal.jsonl"]))  # no eval.prompts: unused
    check_inputs(load_config(None, [*TINY, "posthoc.aligned=[{path: /no/aligned.jsonl}]"]))  # posthoc is off
    check_inputs(load_config(None, [*TINY, "eval.mt_bench={questions: /no/question.jsonl}"]))
    with pytest.raises(DataError, match="eval.normal_prompts='/no/normal.jsonl'"):
        check_inputs(load_config(None, [*TINY, "eval.prompts=starter:heldout", "eval.normal_prompts=/no/normal.jsonl"]))


def test_starter_splits_and_hub_ids_are_not_taken_for_local_files():
    from fedsafe.pipeline import check_inputs, looks_local

    assert not looks_local("starter:heldout") and not looks_local("walledai/AdvBench")
    assert looks_local("./x") and looks_local("data/x.csv") and looks_local("/abs/y")
    check_inputs(load_config(None, [*TINY, "eval.prompts=starter:heldout", "data.heldout=[{path: 'starter:heldout'}]"]))


# --- items 4 and 5: values and files no run can use -------------------------------------------------------------

@pytest.fixture
def bad_configs(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "a_directory.yaml").mkdir()
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "tabs.yaml").write_text("fl:\n\trounds: 2\n")
    return tmp_path


@pytest.mark.parametrize("args, needle", [
    (["latin1.yaml"], "latin1.yaml is not UTF-8 text"),
    (["a_directory.yaml"], "a_directory.yaml is a directory"),
    (["list.yaml"], "must hold a mapping at the top level"),
    (["tabs.yaml"], "tabs.yaml is not valid YAML"),
    (["--set", "fl.lr=.inf"], "fl.lr: Input should be a finite number"),
    (["--set", "fl.lr=.nan"], "fl.lr: Input should be a finite number"),
    (["--set", "dp.noise_multiplier=.inf"], "Input should be a finite number"),
    (["--set", "seed=-1"], "seed: Input should be greater than or equal to 0"),
    (["--set", "seed=4294967296"], "seed: Input should be less than 4294967296"),
    (["--seeds", "2", "--set", "seeds=[0, -3]"], "seeds.1: Input should be greater than or equal to 0"),
    (["--set", "fl.max_grad_norm=0"], "fl.max_grad_norm: Input should be greater than 0"),
    (["--set", "probe.seed=-5"], "probe.seed: Input should be greater than or equal to 0"),
    (["--set", "fl.max_norm_ratio=1"], "fl.max_norm_ratio: Input should be greater than 1"),
])
def test_unusable_configs_are_one_clear_error(bad_configs, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(bad_configs)
    if "--set" in args:  # the tiny model, so that a value that slipped through fails fast, not after a run
        args = [*_sets(bad_configs / "runs"), *args]
    code, text = _cli(monkeypatch, capsys, "run", *args)
    assert code == 2 and "Traceback" not in text, text[-3000:]
    assert needle in " ".join(text.split())
    assert not (bad_configs / "runs").exists()


def test_a_run_whose_every_round_was_skipped_exits_non_zero(tmp_path, monkeypatch, capsys):
    # every update exceeds the bound, so every round keeps the adapter unchanged
    code, text = _cli(monkeypatch, capsys, "run", "--no-progress", *_sets(tmp_path, "aggregator.max_update_norm=1e-12"))
    assert code == 2
    line = _error_line(text)
    assert "was skipped, so it trained nothing" in line and "no valid update" in line


# --- item 5: a full disk or a read-only file system during a run or a resume ---------------------------------------

def _fail_fsync(monkeypatch, err: int, name_part: str, after: int = 0):
    """fsync of a file whose name holds ``name_part`` fails with ``err`` after ``after`` successful ones."""
    real = os.fsync
    seen = {"n": 0}

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if name_part in os.path.basename(target):
            seen["n"] += 1
            if seen["n"] > after:
                raise OSError(err, os.strerror(err))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return real


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="finds the file of an fd through /proc")
def test_full_disk_mid_run_then_read_only_resume_then_resume_finishes_identical(tmp_path, monkeypatch, capsys):
    code, _ = _cli(monkeypatch, capsys, "run", "--no-progress", *_sets(tmp_path / "full", "fl.rounds=3"))
    assert code == 0
    expected = load_file(str(next((tmp_path / "full").iterdir()) / "adapters" / "final" / "adapter_model.safetensors"))

    # the disk fills while round 2's checkpoint is written
    real = _fail_fsync(monkeypatch, errno.ENOSPC, ".state.pt.", after=1)
    code, text = _cli(monkeypatch, capsys, "run", "--no-progress", *_sets(tmp_path / "b", "fl.rounds=3"))
    monkeypatch.setattr(os, "fsync", real)
    run_dir = next((tmp_path / "b").iterdir())
    line = _error_line(text)
    assert code == 2 and "Traceback" not in text
    assert f"could not write {run_dir / 'checkpoint' / 'state.pt'}: No space left on device" in line
    assert "checkpoints" in line and "intact" in line and f"fedsafe run --resume {run_dir}" in line
    assert load_checkpoint_state(run_dir / "checkpoint" / "state.pt")["server"]["round"] == 1  # round 1's, whole
    assert not [p for p in (run_dir / "checkpoint").iterdir() if p.name != "state.pt"]  # no temp file left

    # the resume meets a read-only file system when it rewrites metrics.jsonl
    _fail_fsync(monkeypatch, errno.EROFS, ".metrics.jsonl.")
    code, text = _cli(monkeypatch, capsys, "run", "--resume", str(run_dir), "--no-progress")
    monkeypatch.setattr(os, "fsync", real)
    line = _error_line(text)
    assert code == 2 and "Read-only file system" in line and "make it writable" in line
    assert f"fedsafe run --resume {run_dir}" in line

    code, text = _cli(monkeypatch, capsys, "run", "--resume", str(run_dir), "--no-progress")
    assert code == 0, text[-3000:]
    got = load_file(str(run_dir / "adapters" / "final" / "adapter_model.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    rounds = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["type"] == "round"]
    assert rounds == [1, 2, 3]


# --- item 6: the default norm bound -----------------------------------------------------------------------------

def _server(ratio="default"):
    from fedsafe import aggregators
    from fedsafe.fl.server import Server

    cfg = FLConfig() if ratio == "default" else FLConfig(max_norm_ratio=ratio)
    return Server(cfg, torch.zeros(3), aggregators.get("fedavg"), num_clients=3)


def _results(scale_last: float):
    from fedsafe.fl.client import ClientResult

    updates = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0]), torch.tensor([0.0, 0.0, 3.0])]
    updates[-1] = updates[-1] * scale_last
    return [ClientResult(f"c{i}", u, 1) for i, u in enumerate(updates)]


def test_default_norm_bound_clips_one_enormous_update_to_k_times_the_median(caplog):
    server = _server()
    assert server.cfg.max_norm_ratio == 100.0
    stats = server.aggregate(_results(1000.0))  # norms 1, 2, 3000: median 2, bound 100 * 2 = 200
    assert stats["clipped"] == [{"client_id": "c2", "norm": 3000.0, "bound": 200.0, "median_norm": 2.0}]
    torch.testing.assert_close(server.global_vec, torch.tensor([1.0, 2.0, 200.0]) / 3, rtol=1e-6, atol=0)
    assert any("fl.max_norm_ratio" in r.getMessage() and "c2" in r.getMessage() for r in caplog.records)


def test_norm_bound_off_switch_and_normal_updates_untouched():
    off = _server(None)
    stats = off.aggregate(_results(1000.0))
    assert stats["clipped"] == []
    torch.testing.assert_close(off.global_vec, torch.tensor([1.0, 2.0, 3000.0]) / 3, rtol=0, atol=1e-4)
    normal = _server()  # norms 1, 2, 3: nothing near 100 x the median, the plain FedAvg mean bit for bit
    stats = normal.aggregate(_results(1.0))
    assert stats["clipped"] == [] and torch.equal(normal.global_vec, torch.tensor([1.0, 2.0, 3.0]) / 3)
    assert load_config(None, ["fl.max_norm_ratio=null"]).fl.max_norm_ratio is None


def test_norm_bound_with_two_clients_uses_the_smaller_norm():
    from fedsafe.fl.server import bound_update_norms

    stacked = torch.tensor([[1.0, 0.0], [0.0, 1000.0]])
    out, clipped = bound_update_norms(stacked, ["a", "b"], 10.0, 1)  # the lower median: one client cannot raise it
    assert [c["client_id"] for c in clipped] == ["b"] and float(out[1].norm()) == pytest.approx(10.0)
    assert torch.equal(out[0], stacked[0])
    same, none = bound_update_norms(torch.zeros(2, 2), ["a", "b"], 10.0, 1)  # zero median: no reference
    assert none == [] and torch.equal(same, torch.zeros(2, 2))


# --- item 7: one file mode in the run directory, also after a resume ---------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_directory_files_follow_the_umask_also_after_resume(tmp_path, monkeypatch, capsys, umask):
    from fedsafe.engines.inprocess import InProcessEngine

    old = os.umask(umask)
    try:
        calls = {"n": 0}
        original = InProcessEngine.fit

        def crash_in_round_two(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return original(self, *args, **kwargs)

        monkeypatch.setattr(InProcessEngine, "fit", crash_in_round_two)
        code, _ = _cli(monkeypatch, capsys, "run", "--no-progress", *_sets(tmp_path))
        assert code == 130
        monkeypatch.setattr(InProcessEngine, "fit", original)
        run_dir = next(tmp_path.iterdir())
        code, text = _cli(monkeypatch, capsys, "run", "--resume", str(run_dir), "--no-progress")
        assert code == 0, text[-3000:]
    finally:
        os.umask(old)
    files = {p.relative_to(run_dir).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in run_dir.rglob("*")
             if p.is_file()}
    dirs = {p.relative_to(run_dir).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in run_dir.rglob("*")
            if p.is_dir()}
    for name in ("metrics.jsonl", "config.yaml", "env.json", "checkpoint/state.pt", "adapters/final/adapter_config.json",
                 "adapters/final/adapter_model.safetensors", "adapters/round_0001/adapter_config.json", "report.md"):
        assert name in files, sorted(files)
    assert set(files.values()) == {0o666 & ~umask}, {k: oct(v) for k, v in files.items() if v != 0o666 & ~umask}
    assert set(dirs.values()) == {0o777 & ~umask}, dirs
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o777 & ~umask
    assert not any(p.name.startswith(".") for p in run_dir.rglob("*"))  # no temp file or folder left


def test_an_excluded_prompt_file_passes_the_input_check_and_a_missing_one_is_named(tmp_path):
    """configs/probe_grid.yaml's probe data excludes XSTest's prompts (a file without responses): the run-start
    check read it as training data and refused it for want of a response field."""
    from fedsafe.pipeline import check_inputs

    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,prompt\n1,placeholder request 1\n")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"placeholder request {i}", "response": "x"} for i in range(6)]))
    role = f"roles=[{{name: benign, clients: 2, data: [{{path: {data}, exclude: [{{path: {prompts}, " \
           f"instruction_field: prompt}}]}}]}}]"
    check_inputs(load_config(None, [*TINY, role]))
    with pytest.raises(DataError, match=r"roles\.0\.data\.0\.path: data file not found: .*none\.csv"):
        check_inputs(load_config(None, [*TINY, role.replace(str(prompts), str(tmp_path / "none.csv"))]))
