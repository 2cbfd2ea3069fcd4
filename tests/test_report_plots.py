"""The report's plots (issue 34 item 8): whole-number round ticks, a weight colour bar that starts at 0 (equal
weights are one colour), no stealth section for a run without attackers."""

import pytest

from fedsafe import report


@pytest.fixture
def figures(monkeypatch):
    kept = []
    monkeypatch.setattr(report, "_save", lambda fig, path: kept.append(fig) or path)
    return kept


def _records(weight=0.5, malicious=False):
    out = []
    for rnd in (1, 2, 3):
        for cid in ("client_00", "client_01"):
            out.append({"type": "client", "round": rnd, "client_id": cid, "role": "benign", "malicious": malicious,
                        "loss": 1.0 / rnd, "aggregation_weight": weight})
        out.append({"type": "round", "round": rnd, "mean_loss": 1.0 / rnd})
    return out


def test_equal_weights_are_one_colour_on_a_bar_from_zero(figures, tmp_path):
    report.plot_weights(_records(0.5), tmp_path / "w.png")
    image = figures[-1].axes[0].images[0]
    assert image.get_clim() == (0.0, 0.5)


def test_loss_plot_has_whole_round_ticks(figures, tmp_path):
    report.plot_loss(_records(), tmp_path / "l.png")
    ax = figures[-1].axes[0]
    ax.figure.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_no_stealth_section_without_attackers(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(report, "_stealth_plots", lambda run_dir: asked.append(run_dir) or [])
    from fedsafe.rundir import RunDir

    run = RunDir.create(tmp_path, "r")
    (run.path / "config.yaml").write_text("name: r\n")
    for rec in _records():
        run.log(rec)
    report.write_report(run.path)
    assert asked == []
    for rec in _records(malicious=True):
        run.log(rec)
    report.write_report(run.path)
    assert asked == [run.path]
