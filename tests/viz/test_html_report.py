"""compiled.report.to_html: one self-contained page, checked as text and opened in headless chromium."""

from __future__ import annotations

import html.parser
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from fxforge import viz

needs_dot = pytest.mark.skipif(not viz.dot_available(), reason="Graphviz 'dot' is not installed (make graphviz)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW = (1280, 2400)


class _Text(html.parser.HTMLParser):
    """The visible text of a page (no <style>), one string per text node."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs) -> None:
        self._skip += tag == "style"

    def handle_endtag(self, tag) -> None:
        self._skip -= tag == "style"

    def handle_data(self, data) -> None:
        if not self._skip and data.strip():
            self.parts.append(data.strip())


def page_text(page: str) -> str:
    parser = _Text()
    parser.feed(page)
    return "\n".join(parser.parts)


def assert_self_contained(page: str) -> None:
    lowered = page.lower()
    for needle in ("<script", "<link", "<iframe", "<img", 'src="http', "src='http", 'href="http', "url("):
        assert needle not in lowered, f"the report must not load anything: found {needle!r}"


def assert_report_text(text: str, report) -> None:
    assert report.pipeline in text
    for p in report.passes:
        assert p.spec in text and f"{p.nodes_before} → {p.nodes_after}" in text
    for layer in report.quantization.layers:
        assert layer.layer in text and layer.observer in text
    assert f"Per-layer quantization ({len(report.quantization.layers)} quantization points)" in text
    assert "own SQNR (dB)" in text and "cumulative SQNR (dB)" in text and "fp32 islands (0)" in text


@needs_dot
def test_int8_report_page_has_pipeline_timeline_tables_and_a_graph_per_changing_pass(compiled_models, tmp_path):
    report = compiled_models["resnet18-x86"].report
    page = report.to_html(tmp_path / "report.html").read_text()
    assert_self_contained(page)
    assert_report_text(page_text(page), report)
    changed = [s for s in report.stages if s.after != "trace"]
    assert page.count("<svg") == 1 + 2 * len(changed)  # traced graph, then a diff and the plain graph per pass
    for stage in changed:
        assert f'id="stage-{stage.index}"' in page and f'href="#stage-{stage.index}"' in page
    assert "<svg" not in report.to_html(tmp_path / "lean.html", graphs=False).read_text()


def test_fp32_islands_are_listed_with_their_reason(compiled_models, tmp_path):
    report = compiled_models["island-x86"].report
    text = page_text(report.to_html(tmp_path / "island.html", graphs=False).read_text())
    assert "fp32 islands (1)" in text and "exp: exp in '<root>' (no int8 implementation)" in text


def test_fp32_report_has_no_quantization_section(compiled_models, tmp_path):
    text = page_text(compiled_models["resnet18-cpu"].report.to_html(tmp_path / "cpu.html", graphs=False).read_text())
    assert "fold-bn" in text and "folded 20 BatchNorm(s)" in text and "Quantization" not in text


def test_without_dot_the_page_carries_the_dot_text(compiled_models, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    page = compiled_models["resnet18-cpu"].report.to_html(tmp_path / "r.html").read_text()
    assert "<svg" not in page and "is not installed" in page and "apt-get install graphviz" in page
    assert page.count("digraph {") == 1 + 2 * (len(compiled_models["resnet18-cpu"].report.stages) - 1)


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
               "--disable-background-networking", "--host-resolver-rules=MAP * ~NOTFOUND",  # no network at all
               f"--user-data-dir={profile}", "--hide-scrollbars", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: `make chromium` (as root) or "
                                             "'apt-get install chromium' to open the HTML report in a real browser")
@needs_dot
def test_report_opens_in_headless_chromium(compiled_models, tmp_path):
    report = compiled_models["resnet18-x86"].report
    url = report.to_html(tmp_path / "report.html").resolve().as_uri()
    dom = _chromium("--dump-dom", url, profile=tmp_path / "profile").stdout
    assert dom.count("<svg") == page_count_svgs(tmp_path / "report.html")  # the browser parsed every graph
    assert_report_text(page_text(dom), report)

    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", url, profile=tmp_path / "profile")
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == WINDOW
    print(f"screenshot of the report: {shot}")


def page_count_svgs(path: Path) -> int:
    return path.read_text().count("<svg")
