"""The HTML report: self-contained, and it loads in a real headless browser without errors."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import require

from defectml.cli import main

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
BROWSER = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=8000",
           "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="module")
def report(tmp_path_factory, copper):
    """A search's report, with a quarantined trial among the warnings."""
    cif = tmp_path_factory.mktemp("host") / "Cu.cif"
    copper.to(filename=str(cif))
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["search", str(cif), "--defect", "v_Cu", "--charge", "0", "--model", "emt",
                 "--min-length", "7", "--quiet", "--out", str(out)]) == 0
    return out / "report.html"


def test_search_writes_a_self_contained_report(report):
    text = report.read_text()
    assert "v_Cu_0" in text and "Oh, no new bonds" in text
    assert "cannot score itself" in text  # a universal model's landscape says it is not scored
    assert "<script src=" not in text  # nothing to fetch: plotly.js is inside
    assert text.count("Plotly.newPlot") >= 2  # the energy plot and a 3D view


def test_report_command_rewrites_it(report, tmp_path, capsys):
    out = tmp_path / "again.html"
    assert main(["report", str(report.parent), "--out", str(out)]) == 0
    assert out.stat().st_size > 1_000_000 and f"report: {out}" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_report_loads_in_a_headless_browser_without_errors(report, tmp_path):
    require(CHROMIUM is not None, "a headless Chromium (apt-get install chromium)")
    dom = subprocess.run([CHROMIUM, *BROWSER, "--dump-dom", report.as_uri()], capture_output=True,
                         text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # plotly's own SVG and WebGL containers exist only if its JavaScript ran
    assert dom.stdout.count('class="main-svg"') >= 2 and "gl-container" in dom.stdout
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not [ln for ln in console if "rror" in ln or "Uncaught" in ln], console
    shot = tmp_path / "report.png"
    run = subprocess.run([CHROMIUM, *BROWSER, "--window-size=1200,1400", f"--screenshot={shot}",
                          report.as_uri()], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1400, 1200)
    assert pixels[..., :3].std() > 0.05  # not a blank page: text, tables and plots are drawn
