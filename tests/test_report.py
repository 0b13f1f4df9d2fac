"""The HTML report: written by every run, self-contained (relative links to files that exist),
bounded, and clean in a real browser (headless Debian chromium: no broken image, no error)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.fixtures.audit_runs import METHODS, N_IMAGES, two_audited_runs
from tests.fixtures.debian import debian_tool
from xai_audit.flows.cli import main
from xai_audit.storage.parquet import ResultsStore
from xai_audit.storage.runs import RunRecord
from xai_audit.tasks.results import figures
from xai_audit.tasks.results import report as report_module
from xai_audit.tasks.results import tasks as results_tasks
from xai_audit.tasks.results.report import write_report
from xai_audit.tasks.results.summary import empty_frame

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # any attempt to reach the network fails, so a remote resource shows up as an error
    "--host-resolver-rules=MAP * ~NOTFOUND",
]

# Injected at the top of a copy of a page: records failed loads, script errors and console.error
# calls, then on load lists the images that did not decode, into <pre id="xai-audit-check">.
CHECKER = """<script>
(function () {
  var problems = [];
  window.addEventListener("error", function (event) {
    var target = event.target;
    problems.push(
      target && target !== window ? "failed to load " + (target.src || target.href) : "script error: " + event.message
    );
  }, true);
  var consoleError = console.error;
  console.error = function () {
    problems.push("console.error: " + Array.prototype.join.call(arguments, " "));
    consoleError.apply(console, arguments);
  };
  window.addEventListener("load", function () {
    var images = Array.prototype.slice.call(document.images);
    var out = document.createElement("pre");
    out.id = "xai-audit-check";
    out.textContent = JSON.stringify({
      images: images.length,
      broken: images
        .filter(function (image) { return !image.complete || image.naturalWidth === 0; })
        .map(function (image) { return image.getAttribute("src"); }),
      problems: problems,
      tableBorders: Array.prototype.slice
        .call(document.querySelectorAll("table.t"))
        .map(function (t) { return getComputedStyle(t).borderCollapse; }),
      noAlt: images
        .filter(function (image) { return !image.getAttribute("alt"); })
        .map(function (image) { return image.getAttribute("src"); }),
      scrollWidth: document.documentElement.scrollWidth,
      viewportWidth: document.documentElement.clientWidth
    });
    document.body.appendChild(out);
  });
})();
</script>"""


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory):
    return two_audited_runs(tmp_path_factory)


def chromium_binary() -> str:
    """Debian's chromium, installed with apt-get when absent (as root); skipped only outside CI."""
    return debian_tool("chromium", lambda: shutil.which("chromium"))


@pytest.fixture(scope="module")
def chromium():
    return chromium_binary()


def browse(chromium: str, page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )


def check_in_browser(chromium: str, page: Path, profile: Path, extra_body: str = "", width: int = 1280) -> dict:
    """Load a copy of ``page`` (same folder, so relative links hold) with the checker injected,
    in a window ``width`` px wide."""
    copy = page.with_name(f"_check-{page.name}")
    text = page.read_text()
    copy.write_text(text.replace("<head>", "<head>" + CHECKER, 1).replace("</body>", extra_body + "</body>", 1))
    try:
        loaded = browse(
            chromium, copy, profile, "--virtual-time-budget=10000", f"--window-size={width},2000", "--dump-dom"
        )
    finally:
        copy.unlink()
    found = re.search(r'<pre id="xai-audit-check">(.*?)</pre>', loaded.stdout, re.S)
    assert found, f"the checker did not report; chromium said: {loaded.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href") and value]


def links_of(page: Path) -> list[str]:
    parser = _Links()
    parser.feed(page.read_text())
    return parser.links


def test_every_run_writes_its_report_with_relative_links_to_existing_files(runs):
    index = Path(runs.second.report_path)
    assert index == Path(runs.results) / "reports" / runs.second.run_id / "index.html"
    pages = [index, *sorted((index.parent / "images").glob("*.html"))]
    assert len(pages) == 1 + N_IMAGES
    for page in pages:
        for link in links_of(page):
            target = link.split("#")[0]
            if not target:
                continue
            assert "://" not in link and not link.startswith("/"), f"{page.name}: {link} is not a relative link"
            assert (page.parent / target).is_file(), f"{page.name}: {link} points at nothing"
    text = index.read_text()
    assert f"Against <code>{runs.first.run_id}</code>" in text
    assert all(method in text for method in METHODS)
    assert "No earlier completed run" in Path(runs.first.report_path).read_text()


def test_the_report_loads_in_chromium_without_broken_images_or_errors(runs, chromium, tmp_path):
    index = Path(runs.second.report_path)
    checked = check_in_browser(chromium, index, tmp_path / "profile")
    assert checked["broken"] == [] and checked["problems"] == []
    # drift, concepts, scores, categories, IoU, leaderboard and 2 x 3 best/worst grids at least
    assert checked["images"] >= 12
    assert set(checked["tableBorders"]) == {"collapse"}, "style.css did not apply"
    image_page = sorted((index.parent / "images").glob("*.html"))[0]
    checked = check_in_browser(chromium, image_page, tmp_path / "profile")
    # the maps and the concept attributions
    assert checked["images"] == 2 and checked["broken"] == [] and checked["problems"] == []
    screenshot = tmp_path / "report.png"
    shot = browse(
        chromium,
        index,
        tmp_path / "profile",
        f"--screenshot={screenshot}",
        "--window-size=1280,2000",
        "--enable-logging=stderr",
        "--v=0",
    )
    assert ":CONSOLE" not in shot.stderr, shot.stderr
    with Image.open(screenshot) as image:
        assert image.size == (1280, 2000)
        assert np.asarray(image.convert("L")).std() > 10, "the screenshot is blank"


@pytest.mark.parametrize("width", [1280, 390])
def test_the_report_fits_a_desktop_and_a_phone_without_horizontal_scrolling(runs, chromium, tmp_path, width):
    """At 1280 px and at 390 px (a phone) the overview and an image page never scroll sideways
    (wide tables scroll inside their own box), every figure has alt text, and a screenshot at
    that width is not blank."""
    index = Path(runs.second.report_path)
    image_page = sorted((index.parent / "images").glob("*.html"))[0]
    for page in (index, image_page):
        checked = check_in_browser(chromium, page, tmp_path / "profile", width=width)
        assert checked["noAlt"] == [], page
        assert checked["scrollWidth"] <= checked["viewportWidth"], (page.name, checked)
    screenshot = tmp_path / f"report-{width}.png"
    browse(chromium, index, tmp_path / "profile", f"--screenshot={screenshot}", f"--window-size={width},1600")
    with Image.open(screenshot) as image:
        assert image.size == (width, 1600)
        assert np.asarray(image.convert("L")).std() > 10, "the screenshot is blank"


def test_the_width_check_sees_a_page_that_scrolls_sideways(runs, chromium, tmp_path):
    """The negative control of the check above: an element wider than a phone makes it fire."""
    checked = check_in_browser(
        chromium, Path(runs.first.report_path), tmp_path / "profile", '<div style="width:900px">wide</div>', width=390
    )
    assert checked["scrollWidth"] > checked["viewportWidth"]


def test_the_browser_check_catches_broken_images_and_errors(runs, chromium, tmp_path):
    """The negative control: the same check on a page with a missing image and a failing script."""
    index = Path(runs.first.report_path)
    checked = check_in_browser(
        chromium,
        index,
        tmp_path / "profile",
        '<img src="figures/missing.png"><script>console.error("boom"); notDefined();</script>',
    )
    assert checked["broken"] == ["figures/missing.png"]
    assert any("missing.png" in problem for problem in checked["problems"])
    assert any("boom" in problem for problem in checked["problems"])
    assert any("notDefined" in problem for problem in checked["problems"])


def test_per_image_pages_are_bounded_to_the_first_best_and_worst(runs, tmp_path, monkeypatch):
    store = ResultsStore(shutil.copytree(runs.results, tmp_path / "copy"))
    monkeypatch.setattr(report_module, "FIRST_IMAGES", 1)
    monkeypatch.setattr(report_module, "EXTREME_IMAGES", 1)
    index = Path(write_report(store, runs.second.run_id))
    images = store.read("summary_images", runs.second.run_id)
    expected = {images["image_id"].min(), *images.loc[images["rank"].isin([1, len(images)]), "image_id"]}
    pages = sorted((index.parent / "images").glob("*.html"))
    assert len(pages) == len(expected)
    assert {image_id for page in pages for image_id in expected if image_id in page.read_text()} == expected


def test_image_pages_show_the_samples_each_lime_map_used_and_the_index_their_mean(runs):
    """Every LIME map of the fixture's run used its 40 samples (no adaptive LIME): its page and the index say so."""
    index = Path(runs.second.report_path)
    uncertainty = runs.store.read("lime_uncertainty", runs.second.run_id)
    assert len(uncertainty) == N_IMAGES and set(uncertainty["samples_used"]) == {40}
    pages = sorted((index.parent / "images").glob("*.html"))
    assert pages
    for page in pages:
        text = page.read_text()
        assert "LIME: samples and uncertainty" in text
        assert "<td>40</td>" in text.split("LIME: samples and uncertainty", 1)[1]
    assert "LIME: model evaluations and uncertainty" in index.read_text()


def test_report_command_rewrites_a_report_and_rejects_unknown_runs(runs, tmp_path, capsys):
    store = ResultsStore(shutil.copytree(runs.results, tmp_path / "copy"))
    index = Path(store.root) / "reports" / runs.first.run_id / "index.html"
    index.unlink()
    assert main(["report", runs.first.run_id, "--results", store.root]) == 0
    assert f"report: {index}" in capsys.readouterr().out and index.is_file()
    assert not [path for path in index.parent.parent.iterdir() if path.name.startswith(".")], (
        "staging folders left behind"
    )
    assert main(["report", "no-such-run", "--results", store.root]) == 2


def test_a_run_without_rows_still_gets_a_report(tmp_path):
    store = ResultsStore(tmp_path)
    RunRecord(run_id="empty", config_name="c", config_json="{}", config_hash="h", device="cpu").save(store)
    text = Path(write_report(store, "empty")).read_text()
    assert "labelled no units" in text and "explained no images" in text


def test_reports_go_to_object_store_roots_too():
    store = ResultsStore("memory://xai-audit-report-test/results")
    RunRecord(run_id="remote", config_name="c", config_json="{}", config_hash="h", device="cpu").save(store)
    assert write_report(store, "remote") == "memory:///xai-audit-report-test/results/reports/remote/index.html"
    assert store.fs.cat("/xai-audit-report-test/results/reports/remote/index.html").startswith(b"<!DOCTYPE html>")


def test_a_failing_report_becomes_an_error_row_and_keeps_the_tables(prefect_harness, tmp_path, monkeypatch):
    """The run's tables outlive a report bug: status partial, an errors row of stage report."""
    from xai_audit.flows.audit import run_audit
    from xai_audit.tasks.core.config import parse_config

    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            images / f"{index}.png"
        )

    def broken_report(store, run_id):
        raise RuntimeError("no disk left for figures")

    monkeypatch.setattr(results_tasks, "write_report", broken_report)
    config = parse_config(
        {
            "name": "report-failure",
            "dissect": {"enabled": False},
            "images": {"kind": "folder", "root": str(images)},
            "models": [
                {
                    "name": "tiny",
                    "source": "python",
                    "callable": "tests.fixtures.tiny_models:tiny_resnet",
                    "num_classes": 3,
                    "preprocess": {"resize": 32, "crop": 32},
                }
            ],
            "explain": {"methods": ["gradcam"]},
        }
    )
    outcome = run_audit(config, str(tmp_path / "results"))
    store = ResultsStore(tmp_path / "results")
    assert (outcome.status, outcome.n_errors, outcome.report_path) == ("partial", 1, None)
    (error,) = store.read("errors", outcome.run_id).to_dict("records")
    assert (error["stage"], error["error_type"], error["message"]) == (
        "report",
        "RuntimeError",
        "no disk left for figures",
    )
    assert len(store.read("summary_methods", outcome.run_id)) == 1


def test_figures_draw_models_side_by_side_and_nothing_for_empty_inputs(tmp_path):
    categories = pd.DataFrame(
        {
            "model": ["a", "a", "b"],
            "layer": ["layer3", "layer4", "layer4"],
            "method": "netdissect",
            "category": ["color", "texture", "color"],
            "units": [2, 3, 4],
            "share": [0.2, 0.3, 0.4],
        }
    )
    one = figures.category_shares(categories, ["a"], "netdissect", tmp_path / "one.png")
    two = figures.category_shares(categories, ["a", "b"], "netdissect", tmp_path / "two.png")
    with Image.open(one) as single, Image.open(two) as double:
        assert double.size[0] == 2 * single.size[0] and double.size[1] == single.size[1]
    assert figures.category_shares(categories, ["a"], "clip_dissect", tmp_path / "none.png") is None
    assert figures.layer_concepts(empty_frame("summary_concepts"), "t", tmp_path / "c.png") is None
    assert figures.leaderboard(empty_frame("summary_methods"), tmp_path / "l.png") is None
    assert (
        figures.iou_distributions(pd.DataFrame(columns=["model", "method_a", "method_b", "iou"]), tmp_path / "i.png")
        is None
    )
    assert (
        figures.drift_summary(
            empty_frame("summary_drift_layers"), empty_frame("summary_drift_metrics"), "t", tmp_path / "d.png"
        )
        is None
    )
    assert not list(tmp_path.glob("[cldi].png"))
