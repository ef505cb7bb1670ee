"""report.html and index.html: self-contained, escaped, and rendered by a real browser.

The browser test drives Debian's chromium (apt-get install chromium) through playwright with the
system executable (playwright's own browser download needs the network); it skips only where no
chromium exists. It checks that every image loaded, that the console shows no error, that no request
leaves the page, that pair links resolve and the tables sort; it saves screenshots in tmp_path.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CHROMIUM, browser_page
from patching.analyses.patch.report import experiment_page
from patching.api import ModelSpec, Pair, load, run
from patching.cli import main

torch.set_num_threads(1)

MICHELLE = {"clean": "Michelle Jones was a top-notch student. Michelle",
            "corrupt": "Michelle Smith was a top-notch student. Michelle", "target": "Jones", "foil": "Smith"}
JESSICA = {"clean": "Jessica Smith was a top-notch student. Jessica",
           "corrupt": "Jessica Jones was a top-notch student. Jessica", "target": "Smith", "foil": "Jones"}


def external_references(page: str) -> list[str]:
    """src/href values that would fetch something: anything but data: URIs and relative file links."""
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    return [r for r in refs if re.match(r"^[a-z]+:", r) and not r.startswith("data:")]


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_ckpt) -> Path:
    """A small study with per-pair figures: two good pairs and one skipped."""
    root = tmp_path_factory.mktemp("html")
    doc = {"defaults": {"model": str(tiny_ckpt), "device": "cpu", "top_k": 5},
           "experiments": [MICHELLE, JESSICA, {**MICHELLE, "target": "Jonesification"}],
           "study": {"bootstrap": 100, "figures": True}}
    (root / "s.yaml").write_text(yaml.safe_dump(doc))
    assert main(["--batch", str(root / "s.yaml"), "--out", str(root / "out")]) == 0
    return root / "out"


@pytest.fixture(scope="module")
def dla_study(tmp_path_factory, tiny_ckpt) -> Path:
    """The same pairs as `study`, with direct logit attribution as the study's analysis."""
    root = tmp_path_factory.mktemp("html-dla")
    doc = {"defaults": {"model": str(tiny_ckpt), "device": "cpu"}, "analysis": {"kind": "dla"},
           "experiments": [MICHELLE, JESSICA, {**MICHELLE, "target": "Jonesification"}],
           "study": {"bootstrap": 100, "figures": True}}
    (root / "s.yaml").write_text(yaml.safe_dump(doc))
    assert main(["--batch", str(root / "s.yaml"), "--out", str(root / "out")]) == 0
    return root / "out"


def test_experiment_page_is_self_contained_and_escaped(tiny_ckpt):
    ctx = load(ModelSpec(model=str(tiny_ckpt), device="cpu"))
    result = run("patch", ctx, Pair("<b>Michelle</b> Jones was a student. Michelle",
                                    "<b>Michelle</b> Smith was a student. Michelle", "Jones", "Smith"), top_k=5)
    page = experiment_page(result, b"\x89PNG fake")
    assert "<b>Michelle" not in page and "&lt;b&gt;Michelle" in page  # prompts are text, never markup
    assert 'src="data:image/png;base64,iVBORyBmYWtl"' in page
    assert external_references(page) == []
    for text in ("How to read it", "Token index", "sweep_seconds", "torch", " Jones", "logit-diff"):
        assert text in page, text


def test_study_pages_link_every_pair_and_fetch_nothing(study):
    index = (study / "index.html").read_text()
    assert external_references(index) == []
    links = re.findall(r'href="(pairs/[^"]+/report.html)"', index)
    assert len(links) == 2 and all((study / link).is_file() for link in links)
    assert "target not one token" in index and "aggregate" in index.lower()
    for link in links:
        assert external_references((study / link).read_text()) == []


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")
def test_pages_render_in_chromium(study, dla_study, tmp_path):
    pages = [study / "index.html", *sorted(study.glob("pairs/*/report.html")), dla_study / "index.html"]
    for i, path in enumerate(pages):
        with browser_page(path) as (page, problems, requests):
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
            assert images, f"{path} has no figure"
            assert all(done and width > 0 for done, width, _ in images), (path, images)
            assert problems == [], (path, problems)
            assert all(u.startswith(("file:", "data:")) for u in requests), requests
            page.screenshot(path=str(tmp_path / f"page-{i}.png"), full_page=True)
            assert (tmp_path / f"page-{i}.png").stat().st_size > 10_000
            if path.name == "index.html":  # the inline script sorts: click the pairs table's # column twice
                table = page.locator("table.sortable").nth(1)
                first = lambda: table.locator("tbody tr td").first.inner_text()  # noqa: E731
                assert first() == "1"
                table.locator("th").first.click()
                table.locator("th").first.click()
                assert first() == "3"
                assert problems == [], problems
