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


def test_heldout_loss_is_plotted_before_and_after_training(figures, tmp_path):
    records = [*_records(), {"type": "heldout", "round": 3, "before": 2.25, "after": 1.75}]
    assert report.heldout_points(records) == [(0, 2.25), (3, 1.75)]
    assert report.plot_heldout({"held-out": report.heldout_points(_records())}, tmp_path / "h.png") is None
    report.plot_heldout({"held-out": report.heldout_points(records)}, tmp_path / "h.png")
    ax = figures[-1].axes[0]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0, 3] and list(line.get_ydata()) == [2.25, 1.75]
    assert "before" in ax.get_xlabel() and ax.get_title() == "Held-out loss before and after training"


def test_report_plot_sections_have_human_titles(tmp_path):
    """Every plot heading is a title written for a reader (the held-out loss among them), never a file stem."""
    import re

    from fedsafe.rundir import RunDir

    run = RunDir.create(tmp_path, "r")
    (run.path / "config.yaml").write_text("name: r\n")
    for rnd in (1, 2):  # one attacker among three clients: the stealth plots are drawn
        flags = [False, False, True]
        for i, mal in enumerate(flags):
            run.log({"type": "client", "round": rnd, "client_id": f"client_0{i}", "role": "m" if mal else "b",
                     "malicious": mal, "loss": 1.0 / rnd, "aggregation_weight": 1 / 3})
        run.log({"type": "round", "round": rnd, "mean_loss": 1.0 / rnd, "client_weights": [1 / 3] * 3,
                 "clients": ["client_00", "client_01", "client_02"], "malicious": flags,
                 "cosine": [[1.0, 0.5, -0.2], [0.5, 1.0, -0.1], [-0.2, -0.1, 1.0]], "aggregator": "fedavg"})
    run.log({"type": "heldout", "round": 2, "before": 2.25, "after": 1.75})
    md = report.write_report(run.path)[0].read_text()
    plots = md.split("## Plots")[1]
    captions = re.findall(r"^### (.+)$", plots, flags=re.M)
    files = re.findall(r"\]\(plots/([^)]+)\.png\)", plots)
    assert "Held-out loss" in captions and "heldout_loss" in files
    assert len(captions) == len(files) and any(c.startswith("Stealth") for c in captions)
    for caption, stem in zip(captions, files):
        from_stem = stem.replace("_", " ")
        assert "_" not in caption and caption.lower() not in (from_stem, f"stealth: {from_stem}"), (caption, stem)
