"""``cltoolbox report RUNS --html``: one self-contained page, checked in a real headless Chromium (the system's
package): the page of a small sweep loads with no console message, its screenshot shows the figures (far more
non-white pixels than the same page with the images removed), and a click on a column header sorts the table."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cltoolbox.cli import main
from cltoolbox.html_report import page_summary
from cltoolbox.sweep import sweep

# the sweep example (experiments/sweep_split_mnist5k.yaml) made small: digits, a 32-unit MLP, 2 seeds
SWEEP = {
    "name": "sweep_split",
    "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 5},
    "model": {"name": "mlp", "hidden": [32]},
    "strategy": [{"name": "naive"}, {"name": "er", "memory_size": 100}, {"name": "joint"}],
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "seeds": [0, 1],
}
BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine (apt-get install chromium; "
                                                           ".ci/run installs it)")


def chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
           "--v=0", "--no-first-run", "--disable-extensions", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def console_messages(stderr: str) -> list[str]:
    """What the page printed to its console (Chromium logs each as ``INFO:CONSOLE(line)] "message"``)."""
    return [line for line in stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]


def dark_pixels(png: Path) -> int:
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(png).convert("L"))
    return int((img < 200).sum())


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html")
    sweep(copy.deepcopy(SWEEP), out=str(out / "runs"), workers=1, quiet=True)
    assert main(["report", str(out / "runs"), "--html"]) == 0  # --out defaults to <runs>/report
    return out / "runs" / "report" / "report.html"


@pytest.mark.slow  # the module's sweep and report: ~30-55 s on 2 busy cores
def test_page_is_self_contained(page: Path) -> None:
    info = page_summary(page)
    assert info["images"] >= 8  # heatmaps, curves, bars and Pareto plots, class-IL and task-IL
    assert info["tables"] == 3  # class-IL and task-IL summaries, the runs
    assert info["details"] == 2 * 6  # config.yaml and env.json of each of the 6 runs
    assert info["external"] == []
    text = page.read_text()
    assert "<script src" not in text and "<link" not in text  # nothing fetched from anywhere
    # relative links to the run folders, which exist from where the page is
    links = re.findall(r'<a href="([^"]+)/">', text)
    assert len(links) == 6 and all((page.parent / link / "DONE").is_file() for link in links)


@needs_browser
def test_console_check_catches_errors(tmp_path: Path) -> None:
    # the check below can fail: a page with a console error and an exception is caught
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><script>console.error("boom"); missingFn();</script></body></html>')
    proc = chromium("--dump-dom", bad.as_uri())
    msgs = console_messages(proc.stderr)
    assert any("boom" in m for m in msgs) and any("missingFn" in m for m in msgs)


@pytest.mark.slow
@needs_browser
def test_page_loads_in_chromium_without_console_messages_and_shows_figures(page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "page.png"
    proc = chromium("--window-size=1280,6000", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    assert console_messages(proc.stderr) == []
    # the same page without its images: the figures make most of the drawn area
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', page.read_text()))
    bare_shot = tmp_path / "bare.png"
    chromium("--window-size=1280,6000", f"--screenshot={bare_shot}", bare.as_uri())
    with_figs, without = dark_pixels(shot), dark_pixels(bare_shot)
    assert with_figs > 2 * without + 20_000, (with_figs, without)


@pytest.mark.slow
@needs_browser
def test_a_header_click_sorts_the_runs_table(page: Path, tmp_path: Path) -> None:
    # click "ACC class-IL (%)" of the runs table twice (descending), then read the DOM Chromium ends with
    click = """<script>
var t = document.querySelectorAll("table.sortable")[2];
var th = Array.prototype.filter.call(t.querySelectorAll("th"), function (h) {
  return h.textContent.indexOf("ACC class-IL") === 0; })[0];
th.click(); th.click();
document.body.setAttribute("data-sorted", th.getAttribute("aria-sort"));
</script></body>"""
    clicked = tmp_path / "clicked.html"
    clicked.write_text(page.read_text().replace("</body>", click))
    proc = chromium("--dump-dom", clicked.as_uri())
    assert console_messages(proc.stderr) == []
    assert 'data-sorted="descending"' in proc.stdout
    runs_table = proc.stdout.split('<table class="sortable">')[3]
    rows = re.findall(r"<tr>(.*?)</tr>", runs_table, flags=re.S)[1:]
    acc = [float(re.findall(r'data-v="([^"]+)"', r)[1]) for r in rows]  # seed, then class-IL ACC
    assert len(acc) == 6 and acc == sorted(acc, reverse=True) and acc != sorted(acc)
