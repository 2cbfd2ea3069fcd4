"""The documentation site builds with --strict (issue 34 item 2): a broken link, anchor or API reference fails.

`make docs` runs the same build. The API reference (docs/reference/) names packages, not modules, so a module
that moves inside its package keeps its page; a package that disappears fails here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("mkdocs", reason="the docs extra is not installed (make test installs it)")
pytest.importorskip("mkdocstrings", reason="the docs extra is not installed (make test installs it)")

ROOT = Path(__file__).resolve().parents[1]


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of ``config`` into ``site``."""
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, cwd=config.parent,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=900)


def test_the_site_builds_strictly_with_its_api_reference(tmp_path):
    done = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stats_page = (tmp_path / "site" / "reference" / "stats" / "index.html").read_text(encoding="utf-8")
    assert "wilson_interval" in stats_page and "Wilson score interval" in stats_page  # rendered from docstrings
    assert (tmp_path / "site" / "demo" / "index.html").exists()


def test_every_docs_page_is_in_the_nav():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]

    def pages(item):
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for value in item.values():
                yield from pages(value)
        elif isinstance(item, list):
            for value in item:
                yield from pages(value)

    in_nav = set(pages(nav))
    on_disk = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk - in_nav == set(), "docs pages missing from mkdocs.yml's nav"
    assert in_nav - on_disk == set(), "nav entries without a page"


@pytest.mark.parametrize("page, needles", [
    ("See [the setup](no_such_page.md) and [a section](#no-such-section).\n", ["no_such_page.md", "no-such-section"]),
    ("::: fedsafe.no_such_module\n", ["fedsafe.no_such_module"]),
], ids=["broken-links", "broken-api-reference"])
def test_a_broken_link_or_reference_fails_the_build(tmp_path, page, needles):
    """The repository's own mkdocs settings on a one-page site with one defect: the strict build fails."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    config.pop("nav", None)
    config["docs_dir"] = "docs"
    config["plugins"][1]["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT / "src")]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n" + page, encoding="utf-8")
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    done = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    log = done.stdout + done.stderr
    assert done.returncode != 0 and all(needle in log for needle in needles), log[-3000:]


def test_no_page_quotes_a_test_count_that_rots():
    """The suite's size changes with every commit: the docs say how to count it, never a number."""
    import re

    pattern = re.compile(r"\b\d+ passed\b|\b\d+ tests?(?::| pass| ran| in \d)")  # "649 tests: 644 passed ..."
    quoted = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
              for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert not quoted, quoted
