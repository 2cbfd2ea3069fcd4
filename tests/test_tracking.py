"""Experiment trackers (fedsafe.tracking): every metrics.jsonl record reaches TensorBoard / MLflow / wandb as it
is written, under the documented tag names, offline, and metrics.jsonl stays complete when a tracker fails."""

import json
import math
import sys
import types

import pytest

from fedsafe.config import TrackingConfig, load_config
from fedsafe.errors import ConfigError
from fedsafe.rundir import RunDir
from fedsafe.tracking import record_points

RECORDS = [
    {"type": "eval", "round": 0, "method": "base", "defense": "none", "rule": 87.5, "judge": None,
     "n_prompts": 8, "seed": 3, "per_prompt": {"rule": [100.0, 0.0]}},
    {"type": "client", "round": 1, "client_id": "c0", "role": "benign", "malicious": False, "loss": 2.5,
     "aggregation_weight": 0.5},
    {"type": "client", "round": 1, "client_id": "c1", "role": "benign", "malicious": False, "loss": 1.5,
     "aggregation_weight": 0.5},
    {"type": "round", "round": 1, "mean_loss": 2.0, "update_norm": 0.25, "clients": ["c0", "c1"],
     "aggregator_info": {"probe": {"probability": {"c0": 0.1}}}, "cosine": [[1.0, 0.5], [0.5, 1.0]]},
    {"type": "dp", "round": 1, "epsilon": 1.25, "delta": 1e-5},
    {"type": "eval", "round": 1, "method": "fedavg", "defense": "posthoc_l1", "rule": 62.5, "n_prompts": 8},
    {"type": "heldout", "round": 1, "before": 2.25, "after": 1.75},  # written after training
]
# what record_points must make of RECORDS (the module docstring's naming rule): a client's fields as
# clients/<field>/<client> (one chart per field), the held-out loss before training at step 0
EXPECTED = {
    ("eval/base/none/rule", 0): 87.5, ("eval/base/none/n_prompts", 0): 8.0,
    ("clients/loss/c0", 1): 2.5, ("clients/aggregation_weight/c0", 1): 0.5,
    ("clients/loss/c1", 1): 1.5, ("clients/aggregation_weight/c1", 1): 0.5,
    ("round/mean_loss", 1): 2.0, ("round/update_norm", 1): 0.25,
    ("round/aggregator_info/probe/probability/c0", 1): 0.1,
    ("dp/epsilon", 1): 1.25, ("dp/delta", 1): 1e-5,
    ("eval/fedavg/posthoc_l1/rule", 1): 62.5, ("eval/fedavg/posthoc_l1/n_prompts", 1): 8.0,
    ("heldout/before", 0): 2.25, ("heldout/after", 1): 1.75,
}


def _expected_scalars():
    out = {}
    for rec in RECORDS:
        for step, scalars in record_points(rec):
            out.update({(tag, step): v for tag, v in scalars.items()})
    return out


def test_record_scalars_naming_and_what_is_skipped():
    assert _expected_scalars() == EXPECTED  # strings, bools, None, lists (cosine, per_prompt) and seed skipped
    assert record_points({"type": "round", "round": 2, "mean_loss": float("nan"), "x y": 1}) == [
        (2, {"round/x_y": 1.0})]  # non-finite values dropped; tags sanitised
    assert record_points({"type": "heldout", "round": 5, "before": 2.0, "after": None}) == [(0, {"heldout/before": 2.0})]


def test_config_shorthand_and_missing_package_names_field_and_extra(monkeypatch):
    assert load_config(None, ["tracking=tensorboard"]).tracking.backend == "tensorboard"
    assert load_config(None, []).tracking.backend == "none"
    import fedsafe.tracking as tracking

    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError) as err:
        load_config(None, ["tracking.backend=wandb"])
    assert "tracking.backend" in str(err.value) and "fedsafe[wandb]" in str(err.value)
    with pytest.raises(ConfigError, match="tracking.backend"):
        load_config(None, ["tracking=comet"])


def _event_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, ev.step): ev.value for tag in acc.Tags()["scalars"] for ev in acc.Scalars(tag)}


def test_tensorboard_gets_each_record_as_it_is_written(tmp_path):
    run = RunDir.create(tmp_path, "tb")
    run.start_tracking(TrackingConfig(backend="tensorboard"), {"seed": 0})
    seen = {}
    for rec in RECORDS:
        run.log(rec)
        for step, scalars in record_points(rec):
            seen.update({(tag, step): v for tag, v in scalars.items()})
        got = _event_scalars(run.path / "tensorboard")  # read back before close: streamed, not batched at the end
        assert set(got) == set(seen)
        assert all(math.isclose(got[k], v, rel_tol=1e-6) for k, v in seen.items())  # float32 in event files
    run.close_tracking()
    assert len(run.records()) == len(RECORDS)  # metrics.jsonl has every record


def test_mlflow_local_store_run_metrics_artifacts_and_resume(tmp_path):
    from mlflow.tracking import MlflowClient

    run = RunDir.create(tmp_path, "ml")
    (run.path / "config.yaml").write_text("seed: 0\n")
    cfg = TrackingConfig(backend="mlflow", project="proj")
    run.start_tracking(cfg, {"seed": 0, "fl": {"rounds": 2}})
    for rec in RECORDS[:3]:
        run.log(rec)
    run_id = run.tracker.run_id
    run.close_tracking()
    # --resume: a new process opens the same run directory and continues the same MLflow run
    resumed = RunDir.open(run.path)
    resumed.start_tracking(cfg, {"seed": 0, "fl": {"rounds": 2}})
    assert resumed.tracker.run_id == run_id
    for rec in RECORDS[3:]:
        resumed.log(rec)
    resumed.close_tracking()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")  # the default store: beside runs
    got = {}
    for tag in {tag for tag, _ in EXPECTED}:
        got.update({(tag, m.step): m.value for m in client.get_metric_history(run_id, tag)})
    assert got == pytest.approx(EXPECTED)
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.info.experiment_id == client.get_experiment_by_name("proj").experiment_id
    assert info.data.params["fl.rounds"] == "2" and info.info.run_name == run.path.name
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.jsonl"} <= artifacts


class _FakeWandbRun:
    def __init__(self, calls, **kwargs):
        self.calls, self.id = calls, kwargs.get("id") or "run123"

    def define_metric(self, name, step_metric=None):
        self.calls.append(("define_metric", name, step_metric))

    def log(self, data):
        self.calls.append(("log", data))

    def finish(self):
        self.calls.append(("finish",))


def _fake_wandb(monkeypatch, fail_online=False):
    calls = []

    def init(mode, **kwargs):
        calls.append(("init", mode, kwargs))
        if fail_online and mode == "online":
            raise RuntimeError("network unreachable")
        return _FakeWandbRun(calls, **kwargs)

    module = types.ModuleType("wandb")
    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return calls


def test_wandb_offline_without_credentials_and_round_as_step(tmp_path, monkeypatch):
    """The adapter's contract with wandb (a stand-in module; the real package runs in the next test)."""
    calls = _fake_wandb(monkeypatch)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    run = RunDir.create(tmp_path, "wb")
    run.start_tracking(TrackingConfig(backend="wandb", project="p"), {"seed": 0})
    for rec in RECORDS:
        run.log(rec)
    run.close_tracking()
    init = calls[0]
    assert init[0] == "init" and init[1] == "offline"
    assert init[2]["dir"] == str(run.path.resolve()) and init[2]["project"] == "p" and init[2]["config"] == {"seed": 0}
    assert ("define_metric", "*", "round") in calls  # any order of records is fine for wandb
    logged = [c[1] for c in calls if c[0] == "log"]
    got = {(tag, d["round"]): v for d in logged for tag, v in d.items() if tag != "round"}
    assert got == EXPECTED and calls[-1] == ("finish",)
    assert json.loads((run.path / "tracking.json").read_text())["wandb"]["id"] == "run123"


def test_wandb_falls_back_to_offline_when_online_fails(tmp_path, monkeypatch):
    calls = _fake_wandb(monkeypatch, fail_online=True)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    run = RunDir.create(tmp_path, "wb")
    run.start_tracking(TrackingConfig(backend="wandb"), {})
    assert [c[1] for c in calls if c[0] == "init"] == ["online", "offline"]
    run.close_tracking()


def test_wandb_real_package_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")  # optional extra fedsafe[wandb]; the stand-in tests above always run
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = RunDir.create(tmp_path, "wb")
    run.start_tracking(TrackingConfig(backend="wandb"), {"seed": 0})
    for rec in RECORDS:
        run.log(rec)
    summary = dict(run.tracker.run.summary)
    run.close_tracking()
    assert summary["clients/loss/c1"] == 1.5 and summary["eval/fedavg/posthoc_l1/rule"] == 62.5
    assert list((run.path / "wandb").glob("offline-run-*/run-*.wandb")), "no offline run file written"
    del wandb


def test_a_failing_tracker_is_switched_off_and_the_file_keeps_every_record(tmp_path, caplog):
    class Broken:
        name = "broken"

        def log(self, record):
            raise OSError("disk of the tracking server is full")

        def close(self):
            raise AssertionError("a switched-off tracker is not closed")

    run = RunDir.create(tmp_path, "x")
    run.tracker = Broken()
    for rec in RECORDS:
        run.log(rec)
    run.close_tracking()
    assert run.tracker is None and len(run.records()) == len(RECORDS)
    assert "broken failed" in caplog.text


def test_pipeline_streams_round_client_eval_and_dp_records(tmp_path, test_seed):
    """A tiny end-to-end run with tracking=tensorboard: every numeric field of every record is in TensorBoard."""
    from fedsafe.pipeline import run_experiment

    cfg = load_config(None, [
        "model.name=tiny", f"output_dir={tmp_path}", "name=t", f"seed={test_seed}", "fl.rounds=2",
        "fl.local_steps=1", "fl.batch_size=2", "data.samples_per_client=4", "data.max_length=64",
        "roles.0.clients=2", "fl.clients_per_round=2", "eval.prompts=starter:heldout", "eval.n_prompts=2",
        "eval.max_new_tokens=4", "eval.helpfulness_proxy=false", "dp.client_level=true", "dp.noise_multiplier=0.5",
        "tracking=tensorboard"])
    run_dir = run_experiment(cfg, progress=False).run_dir
    records = RunDir(run_dir).records()
    assert {"round", "client", "eval", "dp"} <= {r["type"] for r in records}
    want = {}
    for rec in records:
        for step, scalars in record_points(rec):
            want.update({(tag, step): v for tag, v in scalars.items()})
    got = _event_scalars(run_dir / "tensorboard")
    assert set(got) == set(want)
    assert all(math.isclose(got[k], v, rel_tol=1e-5, abs_tol=1e-30) for k, v in want.items())


def test_tensorboard_hparams_panel_and_mlflow_artifacts_and_quiet_logs(tmp_path, caplog):
    """Issue 34 item 7: TensorBoard gets an HPARAMS entry (config settings against the last run-level values);
    MLflow gets the report, plots and adapters as artifacts, and its store's INFO lines stay out of the console."""
    import logging

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir.create(tmp_path, "tb")
    run.start_tracking(TrackingConfig(backend="tensorboard"), {"seed": 0, "fl": {"rounds": 2}})
    for rec in RECORDS:
        run.log(rec)
    run.close_tracking()
    hparam_tags = set()
    for folder in {f.parent for f in (run.path / "tensorboard").rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        try:
            hparam_tags |= set(acc.PluginTagToContent("hparams"))
        except KeyError:  # this event file has no hparams plug-in data
            pass
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= hparam_tags

    ml = RunDir.create(tmp_path, "ml")
    for name in ("config.yaml", "report.md", "report.html", "results.csv"):
        (ml.path / name).write_text("x\n")
    (ml.path / "plots").mkdir()
    (ml.path / "plots" / "loss.png").write_bytes(b"png")
    (ml.path / "adapters" / "final").mkdir(parents=True)
    (ml.path / "adapters" / "final" / "adapter_config.json").write_text("{}")
    with caplog.at_level(logging.INFO):
        ml.start_tracking(TrackingConfig(backend="mlflow", project="proj"), {"seed": 0})
        ml.log(RECORDS[0])
        run_id = ml.tracker.run_id
        ml.close_tracking()
    assert not [r for r in caplog.records if r.name.startswith(("alembic", "mlflow")) and r.levelno < logging.WARNING]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.md", "report.html", "results.csv", "plots", "adapters"} <= top
    final = {a.path for a in client.list_artifacts(run_id, "adapters/final")}
    assert final == {"adapters/final/adapter_config.json"}
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/loss.png"}


def test_tensorboard_draws_one_chart_per_client_field_with_a_line_per_client(tmp_path):
    """Issue 34 item 7: 10 clients x 9 fields were 90 charts; the Custom Scalars tab has one chart per field whose
    regex takes exactly that field's clients."""
    import re

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    run = RunDir.create(tmp_path, "tb")
    run.start_tracking(TrackingConfig(backend="tensorboard"), {"seed": 0})
    for rec in RECORDS:
        run.log(rec)
    run.close_tracking()
    acc = EventAccumulator(str(run.path / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(metadata.CONFIG_SUMMARY_TAG)[-1].tensor_proto.string_val[0])
    (category,) = layout.category
    charts = {c.title: list(c.multiline.tag) for c in category.chart}
    assert category.title == "clients" and sorted(charts) == ["aggregation_weight", "loss"]
    tags = {tag for tag, _ in EXPECTED}
    for field, (pattern,) in charts.items():
        assert {t for t in tags if re.search(pattern, t)} == {f"clients/{field}/c0", f"clients/{field}/c1"}
