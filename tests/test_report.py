"""Reports from a synthetic run directory: results.csv columns, the paper-layout table, inline plots."""

import csv
import json
import re

import pytest

from fedsafe.config import ExperimentConfig, dump_config
from fedsafe.report import RESULT_COLUMNS, append_results, read_results, results_table, write_report


def _synthetic_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(ExperimentConfig(name="synthetic")))
    recs = []
    for rnd in (1, 2, 3):
        recs.append({"type": "round", "round": rnd, "mean_loss": 2.0 / rnd, "client_weights": [0.5, 0.5],
                     "clients": ["client_00", "client_01"], "roles": ["benign", "malicious"],
                     "malicious": [False, True], "cosine": [[1.0, 0.2], [0.2, 1.0]], "aggregator": "fedavg"})
        for cid, role, mal, loss in (("client_00", "benign", False, 1.0 / rnd), ("client_01", "malicious", True, 3.0 / rnd)):
            recs.append({"type": "client", "round": rnd, "client_id": cid, "role": role, "malicious": mal,
                         "aggregation_weight": 0.5, "loss": loss})
        recs.append({"type": "eval", "round": rnd, "scenario": "attack", "method": "fedavg", "defense": "none",
                     "rule": 90.0 - 30 * rnd})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return run


def test_results_csv_columns_and_empty_cells(tmp_path):
    run = _synthetic_run(tmp_path)
    append_results(run, [{"scenario": "attack", "method": "fedavg", "defense": "none", "rule": 25.0,
                          "helpfulness_proxy": 7.5, "n_prompts": 48}])
    append_results(run, [{"scenario": "attack_posthoc", "method": "fedavg", "defense": "posthoc_l1",
                          "rule": 93.75, "judge": None, "helpfulness_proxy": 7.9, "n_prompts": 48}])
    with open(run / "results.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert header == RESULT_COLUMNS == ["setting", "scenario", "method", "defense", "seed", "rule", "refusal",
                                        "over_refusal", "borderline_refusal", "judge", "rm", "mt1", "helpfulness_proxy",
                                        "n_prompts", "n_normal_prompts", "n_borderline_prompts", "defends"]
    assert body[0] == ["", "attack", "fedavg", "none", "", "25", "", "", "", "", "", "", "7.5", "48", "", "", ""]
    rows = read_results(run)
    assert [r["scenario"] for r in rows] == ["attack", "attack_posthoc"]
    assert rows[1]["rule"] == pytest.approx(93.75) and rows[1]["judge"] is None


def test_table_has_only_measured_columns():
    rows = [{"scenario": "s", "method": "fedavg", "defense": "none", "rule": 50.0, "judge": None, "rm": None,
             "mt1": 6.25, "helpfulness_proxy": None, "n_prompts": 4}]
    header, body = results_table(rows)
    assert header == ["Scenario", "Method", "Defense", "Rule (%) ↑", "MT-1 ↑", "Seeds", "Prompts"]
    assert body == [["s", "fedavg", "none", "50.0", "6.25", "1", "4"]]  # one seed, no per-prompt data: no interval


def test_report_from_synthetic_run(tmp_path):
    run = _synthetic_run(tmp_path)
    append_results(run, [{"scenario": "attack", "method": "fedavg", "defense": "none", "rule": 0.0,
                          "helpfulness_proxy": 7.5, "n_prompts": 48},
                         {"scenario": "attack_posthoc", "method": "fedavg", "defense": "posthoc_l1",
                          "rule": 93.75, "helpfulness_proxy": 7.9, "n_prompts": 48}])
    md_path, html_path = write_report(run)
    md = md_path.read_text()
    assert "| attack_posthoc | fedavg | posthoc_l1 | 93.8 | 7.90 | 1 | 48 |" in md
    assert "Judge (%)" not in md.split("## Plots")[0]  # not measured: no column
    for name in ("results", "loss", "safety", "weights"):
        assert (run / "plots" / f"{name}.png").exists()
        assert f"plots/{name}.png" in md
    assert "Stealth" in md  # fedsafe.evaluation.stealth plots are included when the module is there
    html = html_path.read_text()
    imgs = re.findall(r"<img [^>]*src='([^']+)'", html)
    assert len(imgs) >= 4 and all(src.startswith("data:image/png;base64,") for src in imgs)
    assert "synthetic" in html and "93.8" in html


def test_report_with_no_results_yet(tmp_path):
    run = _synthetic_run(tmp_path)
    md_path, _ = write_report(run)
    assert "No evaluation results yet" in md_path.read_text()


# ------------------------------------------------------------------------------------------------
# Seeds and intervals
# ------------------------------------------------------------------------------------------------

N_PROMPTS = 20


def _flags(hits: set[int]) -> list[float]:
    return [100.0 if i in hits else 0.0 for i in range(N_PROMPTS)]


def _seeded_dir(tmp_path):
    """A grid-like directory: no_attack / attack / attack_posthoc for seeds 0 and 1, with per-prompt outcomes."""
    from fedsafe.report import write_outcomes, write_results

    d = tmp_path / "seeded"
    d.mkdir()
    refusals = {  # (scenario, seed) -> prompts answered with a refusal
        ("no_attack", 0): set(range(18)), ("no_attack", 1): set(range(19)),
        ("attack", 0): set(range(4)), ("attack", 1): set(range(6)),
        ("attack_posthoc", 0): set(range(4)), ("attack_posthoc", 1): set(range(6)),  # no recovery at all
    }
    rows, outcomes = [], []
    for (scenario, seed), hits in refusals.items():
        setting = "no_attack" if scenario == "no_attack" else "attack"
        defense = "posthoc_l1" if scenario.endswith("_posthoc") else "none"
        key = {"setting": setting, "scenario": scenario, "method": "fedavg", "defense": defense, "seed": seed}
        rows.append({**key, "rule": 100.0 * len(hits) / N_PROMPTS, "helpfulness_proxy": 5.0 + seed,
                     "n_prompts": N_PROMPTS})
        outcomes.append({**key, "prompt_ids": list(range(N_PROMPTS)), "rule": _flags(hits)})
    write_results(d, rows)
    write_outcomes(d, outcomes)
    return d


def test_summary_csv_gives_mean_std_and_interval_per_setting(tmp_path):
    d = _seeded_dir(tmp_path)
    md = write_report(d)[0].read_text()
    with open(d / "summary.csv", newline="") as f:
        summary = {r["scenario"]: r for r in csv.DictReader(f)}
    assert list(summary) == ["no_attack", "attack", "attack_posthoc"]
    s = summary["attack"]
    assert s["n_seeds"] == "2" and s["seeds"] == "0 1" and s["n_prompts"] == "20"
    assert float(s["rule_mean"]) == pytest.approx(25.0)  # (20 + 30) / 2
    assert float(s["rule_std"]) == pytest.approx(7.0710678, rel=1e-4)
    assert float(s["rule_ci_low"]) < 25.0 < float(s["rule_ci_high"])
    # the helpfulness proxy has no per-prompt values: a t-interval over the two seeds (5.0, 6.0)
    half = 12.706204736 * 0.5  # t_{0.975, 1} * sd / sqrt(2)
    assert float(s["helpfulness_proxy_ci_low"]) == pytest.approx(5.5 - half, rel=1e-6)
    assert "[" in md.split("## Comparisons")[0]  # numbers carry their interval in the table


def test_over_refusal_flows_into_table_summary_comparisons_and_plot(tmp_path):
    """Over-refusal has its own prompt ids (a benign set of another size) and gets the same per-prompt intervals."""
    from fedsafe.report import plot_results, read_outcomes, summarize, write_outcomes, write_results

    d = _seeded_dir(tmp_path)
    rows, outcomes = read_results(d), read_outcomes(d)
    n_normal = 8
    over = {"no_attack": {0}, "attack": {0, 1}, "attack_posthoc": set(range(7))}  # refused benign prompts
    for r, o in zip(rows, outcomes):
        hits = over[r["scenario"]] if r["seed"] == 0 else over[r["scenario"]] | {7}
        flags = [100.0 if i in hits else 0.0 for i in range(n_normal)]
        r.update(over_refusal=sum(flags) / n_normal, n_normal_prompts=n_normal)
        o.update(over_refusal=flags, over_refusal_prompt_ids=list(range(10, 10 + n_normal)))
    write_results(d, rows)
    write_outcomes(d, outcomes)
    assert read_results(d)[0]["n_normal_prompts"] == n_normal
    md = write_report(d)[0].read_text()
    with open(d / "summary.csv", newline="") as f:
        summary = {r["scenario"]: r for r in csv.DictReader(f)}
    s = summary["attack_posthoc"]
    assert float(s["over_refusal_mean"]) == pytest.approx(100 * (7 / 8 + 8 / 8) / 2)
    assert float(s["over_refusal_ci_low"]) < float(s["over_refusal_mean"]) <= float(s["over_refusal_ci_high"])
    groups = summarize(read_results(d), read_outcomes(d))
    assert {g["metrics"]["over_refusal"].method for g in groups} == {"t_seeds"}  # per-prompt, own ids
    header = md.split("## Results")[1].splitlines()[2]
    assert header.index("Rule (%) ↑") < header.index("Over-refusal (%) ↓") < header.index("Helpfulness proxy")
    assert "Over-refusal: the detector's refusal share on everyday benign prompts" in md
    assert "Refusal detector refusal-lr-" in md and "LOMO agreement with people" in md  # its measured agreement
    with open(d / "comparisons.csv", newline="") as f:
        diffs = {(r["compared"], r["metric"]): r for r in csv.DictReader(f)}
    assert float(diffs[("attack_posthoc", "over_refusal")]["difference"]) == pytest.approx(
        100 * ((7 - 2) / 8 + (8 - 3) / 8) / 2)
    import matplotlib

    matplotlib.use("Agg")
    titles = []
    real_title = matplotlib.axes.Axes.set_title
    matplotlib.axes.Axes.set_title = lambda self, t, *a, **k: titles.append(t) or real_title(self, t, *a, **k)
    try:
        assert plot_results(groups, tmp_path / "r.png").exists()
    finally:
        matplotlib.axes.Axes.set_title = real_title
    assert "Refusals of benign prompts" in titles


def test_comparisons_mark_what_is_not_significant(tmp_path):
    d = _seeded_dir(tmp_path)
    md = write_report(d)[0].read_text()
    with open(d / "comparisons.csv", newline="") as f:
        diffs = {(r["compared"], r["reference"], r["metric"]): r for r in csv.DictReader(f)}
    drop = diffs[("attack", "no_attack", "rule")]
    assert float(drop["difference"]) == pytest.approx(-67.5)  # (20 - 90 + 30 - 95) / 2
    assert float(drop["ci_high"]) < 0 and drop["significant"] == "true"
    same = diffs[("attack_posthoc", "attack", "rule")]  # identical outcomes, prompt by prompt
    assert float(same["difference"]) == 0.0 and float(same["ci_low"]) == float(same["ci_high"]) == 0.0
    assert same["significant"] == "false"
    assert "## Comparisons" in md and "| attack_posthoc | attack | Rule (%) ↑ | 0.0 [0.0, 0.0] | no |" in md


def _eval_run(root, name, seed, scenario, rules, posthoc=None, base=None):
    """A run directory whose metrics hold eval records (round -> Rule) and per-prompt outcomes."""
    run = root / f"{name}-s{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(ExperimentConfig(name=name, seed=seed)))
    recs = []

    def ev(rnd, scen, defense, rule):
        hits = set(range(round(rule * N_PROMPTS / 100)))
        recs.append({"type": "eval", "round": rnd, "setting": name, "scenario": scen, "method": "fedavg",
                     "defense": defense, "seed": seed, "rule": rule,
                     "per_prompt": {"prompt_ids": list(range(N_PROMPTS)), "rule": _flags(hits)}})
    if base is not None:
        ev(0, "base", "none", base)
        recs[-1]["method"] = "base"
    for rnd, rule in rules.items():
        ev(rnd, scenario, "none", rule)
    if posthoc is not None:
        ev(max(rules), scenario + "_posthoc", "posthoc_l1", posthoc)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return run


def test_safety_plot_draws_trajectories_with_two_points_only(tmp_path):
    from fedsafe.report import collect_safety, plot_safety, safety_lines

    # end-of-run evaluations only: one point per series, so no "over rounds" plot
    single = [_eval_run(tmp_path / "a", "no_attack", 0, "no_attack", {3: 90.0}),
              _eval_run(tmp_path / "a", "attack", 0, "attack", {3: 40.0}, posthoc=80.0)]
    assert safety_lines(collect_safety(single)) == []
    assert plot_safety(collect_safety(single), tmp_path / "none.png") is None
    # round 0 (eval.base) and every round, two seeds: lines labelled by scenario, post-hoc as a last step
    runs = []
    for seed in (0, 1):
        runs.append(_eval_run(tmp_path / "b", "no_attack", seed, "no_attack", {1: 95.0, 2: 95.0, 3: 90.0}, base=60.0))
        runs.append(_eval_run(tmp_path / "b", "attack", seed, "attack", {1: 60.0 - 10 * seed, 2: 40.0, 3: 20.0},
                              posthoc=85.0, base=60.0))
    lines = safety_lines(collect_safety(runs))
    by_label = {label: (xs, est, dashed) for label, xs, est, dashed in lines}
    assert set(by_label) == {"attack", "no_attack", "attack_posthoc"}  # no directory names
    xs, est, dashed = by_label["attack"]
    assert xs == [0, 1, 2, 3] and not dashed
    assert est[0].mean == 60.0 and est[1].mean == pytest.approx(55.0) and est[1].n_seeds == 2
    assert est[1].lo < 55.0 < est[1].hi  # the band
    xs, est, dashed = by_label["attack_posthoc"]
    assert xs == [3, 4] and dashed and est[0].mean == 20.0 and est[1].mean == 85.0
    path = plot_safety(collect_safety(runs), tmp_path / "plots" / "safety.png")
    assert path.exists() and path.stat().st_size > 10_000


def test_results_plot_has_error_bars(tmp_path):
    from fedsafe.report import plot_results, read_outcomes, summarize

    d = _seeded_dir(tmp_path)
    groups = summarize(read_results(d), read_outcomes(d))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = {}
    real_bar = matplotlib.axes.Axes.bar

    def spy(self, x, height, *args, **kwargs):
        seen.setdefault("yerr", []).append(kwargs.get("yerr"))
        return real_bar(self, x, height, *args, **kwargs)

    matplotlib.axes.Axes.bar = spy
    try:
        path = plot_results(groups, tmp_path / "results.png")
    finally:
        matplotlib.axes.Axes.bar = real_bar
        plt.close("all")
    assert path.exists()
    lower, upper = seen["yerr"][0]  # Rule: mean - lo and hi - mean for every bar
    assert len(lower) == 3 and all(v > 0 for v in lower + upper)


def test_report_summary_shows_lora_aggregation_error_and_bytes():
    """Issue 21: the report states the aggregation error per round and what a client sends."""
    from fedsafe.report import _lora_aggregation_lines

    recs = [{"type": "round", "round": 1, "aggregation_error": 33.1, "bytes_per_client": 2e6, "bytes_kind": "plaintext"},
            {"type": "round", "round": 2, "aggregation_error": None, "bytes_per_client": 1e6},
            {"type": "client", "round": 1}]
    (line,) = _lora_aggregation_lines(recs, "ffa")
    assert "ffa" in line and "33.1, -" in line and "1.50 MB per round (plaintext)" in line
    assert _lora_aggregation_lines([{"type": "round", "round": 1}], "factors") == []


# ------------------------------------------------------------------------------------------------
# report.html (a Jinja2 template): the same page the hand-assembled HTML gave
# ------------------------------------------------------------------------------------------------

class _Page:
    """report.html as parser events: headings in order, tables as cell text, images, links."""

    def __init__(self, text: str):
        from html.parser import HTMLParser

        page = self
        self.headings, self.tables, self.images, self.links, self.bold = [], [], [], [], []

        class P(HTMLParser):
            stack: list = []

            def handle_starttag(self, tag, attrs):
                attrs = dict(attrs)
                if tag == "table":
                    page.tables.append([])
                elif tag == "tr":
                    page.tables[-1].append([])
                elif tag == "img":
                    page.images.append((attrs["alt"], attrs["src"]))
                elif tag == "a":
                    page.links.append(attrs["href"])
                self.stack.append(tag)

            def handle_endtag(self, tag):
                self.stack.pop()

            def handle_data(self, data):
                top = self.stack[-1] if self.stack else None
                if top in ("h1", "h2", "h3"):
                    page.headings.append((top, data))
                elif top in ("td", "th"):
                    page.tables[-1][-1].append(data)
                elif top == "b":
                    page.bold.append(data)

        P(convert_charrefs=True).feed(text)


def test_report_html_has_the_sections_tables_and_inlined_plots(tmp_path):
    from fedsafe.report import comparison_rows, comparisons_table, read_outcomes, summarize

    d = _seeded_dir(tmp_path)
    groups = summarize(read_results(d), read_outcomes(d))
    header, body = results_table(read_results(d), groups=groups)
    cmp_header, cmp_body = comparisons_table(comparison_rows(groups))
    page = _Page(write_report(d)[1].read_text(encoding="utf-8"))
    assert [h for level, h in page.headings if level == "h2"] == ["Summary", "Results", "Comparisons", "Plots"]
    assert page.headings[0] == ("h1", f"fedsafe report: {d.name}")
    assert page.tables[0] == [header, *body]  # the results table, cell for cell
    assert page.tables[1] == [cmp_header, *cmp_body]
    captions = [h for level, h in page.headings if level == "h3"]
    assert captions == [alt for alt, _ in page.images] and "Results" in captions
    assert all(src.startswith("data:image/png;base64,") and len(src) > 1000 for _, src in page.images)


def test_report_html_escapes_values_and_renders_summary_marks(tmp_path):
    import base64

    from fedsafe.report import _html

    png = tmp_path / "p.png"
    png.write_bytes(b"\x89PNG not really")
    text = _html("fedsafe report: a<b", ["- **Run:** x & y", "- setting `s` -> [runs/s](runs/s/report.md)"],
                 ["Scenario", "<th>"], [["<script>alert(1)</script>", "'q' \"q\""]], [1], [("Stealth: <cos>", png)],
                 comparisons=None,
                 sections=[("Release gate", ["**PASS**: every metric", "", "| Metric | Verdict |", "|---|---|",
                                             "| Rule | <ok> |"])])
    assert "<script>" not in text and "<th><th>" not in text  # every value is text, never markup
    page = _Page(text)
    assert page.headings[0] == ("h1", "fedsafe report: a<b")
    assert page.tables == [[["Scenario", "<th>"], ["<script>alert(1)</script>", "'q' \"q\""]],
                           [["Metric", "Verdict"], ["Rule", "<ok>"]]]  # a plug-in's markdown table as a table
    assert page.bold == ["Run:", "PASS"] and page.links == ["runs/s/report.md"] and "<code>s</code>" in text
    assert [h for level, h in page.headings if level == "h2"] == ["Summary", "Results", "Release gate", "Plots"]
    assert page.images == [("Stealth: <cos>", "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode())]
    empty = _Page(_html("t", [], [], [], [], []))
    assert not empty.tables and not empty.images
    assert "No evaluation results yet." in _html("t", [], [], [], [], [])


def test_the_report_template_ships_with_the_package():
    import tomllib
    from fnmatch import fnmatch
    from pathlib import Path

    import fedsafe

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["fedsafe"]
    templates = Path(fedsafe.__file__).parent / "templates"
    shipped = [p.relative_to(templates.parent).as_posix() for p in templates.iterdir()]
    assert "templates/report.html.j2" in shipped
    assert all(any(fnmatch(f, g) for g in globs) for f in shipped), (shipped, globs)


def test_a_defended_row_is_told_by_its_defends_field_not_its_scenario_name(tmp_path):
    """A post-training defense's row names the scenario it defends (``defends``, written by the pipeline): the
    report pairs it with that scenario and draws its step from that series, whatever the defended scenario is
    called; a row written before the field existed still pairs by the old ``<scenario>_posthoc`` name."""
    from fedsafe.report import collect_safety, default_comparisons, safety_lines, summarize

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(ExperimentConfig(name="s")))
    common = {"setting": "s", "method": "fedavg", "seed": 0, "n_prompts": 4}
    append_results(run, [{**common, "scenario": "no_attack", "defense": "none", "rule": 90.0},
                         {**common, "scenario": "ours", "defense": "none", "rule": 20.0},
                         {**common, "scenario": "ours_guarded", "defense": "guard_v1", "defends": "ours",
                          "rule": 80.0},
                         {**common, "scenario": "attack", "defense": "none", "rule": 30.0},
                         {**common, "scenario": "attack_posthoc", "defense": "posthoc_l1", "rule": 70.0}])
    rows = read_results(run)
    assert [r["defends"] for r in rows] == ["", "", "ours", "", ""]
    pairs = {(ref["scenario"], g["scenario"]) for ref, g in default_comparisons(summarize(rows))}
    assert ("ours", "ours_guarded") in pairs and ("attack", "attack_posthoc") in pairs
    assert not {p for p in pairs if p[1] == "ours_guarded" and p[0] != "ours"}
    header, body = results_table(rows)
    assert [b[0] for b in body] == ["no_attack", "ours", "ours_guarded", "attack", "attack_posthoc"]
    recs = [{"type": "eval", "round": rnd, "setting": "s", "scenario": "ours", "method": "fedavg",
             "defense": "none", "rule": rule} for rnd, rule in ((1, 50.0), (2, 20.0))]
    recs.append({"type": "eval", "round": 2, "setting": "s", "scenario": "ours_guarded", "method": "fedavg",
                 "defense": "guard_v1", "defends": "ours", "rule": 80.0})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    lines = {label: (xs, [e.mean for e in est], dashed) for label, xs, est, dashed in
             safety_lines(collect_safety([run]))}
    assert lines == {"ours": ([1, 2], [50.0, 20.0], False), "ours_guarded": ([2, 3], [20.0, 80.0], True)}
