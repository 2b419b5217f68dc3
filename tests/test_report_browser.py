"""The report in a real browser: headless Chromium, network blocked, no console errors, no requests.

Skipped when no Chromium/Chrome is on PATH. Each check has a negative control (a tampered copy of
the report) so that a detector that silently sees nothing cannot pass the test.

How requests are detected: Chromium's net log (``--log-net-log``) records every URL request. The
browser itself also makes background requests (updates, time sync) despite the flags; those are
started by the browser ("initiator: not an origin"), while everything the page loads is started
by the ``file://`` document, so only requests whose network isolation key is ``file://`` count.
Console messages (JavaScript errors, CSP violations, failed loads) go to stderr with
``--enable-logging=stderr --v=0`` as ``INFO:CONSOLE`` lines.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from medaudit.pdf import chromium_command, find_chromium, html_to_pdf
from medaudit.plugin_manager import get_plugin_manager
from medaudit.report import render_report
from medaudit.results import Results

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium/Chrome not on PATH")
FIXTURES = Path(__file__).parent / "fixtures"


@dataclass
class PageLoad:
    dom: str
    console: list[str]
    page_requests: list[str]


def load_page(html_path: Path, work: Path, *extra: str) -> PageLoad:
    net_log = work / f"{html_path.stem}.netlog.json"
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="medaudit-test-chromium-") as profile:
        cmd = chromium_command(CHROMIUM, Path(profile), "--enable-logging=stderr", "--v=0",
                               f"--log-net-log={net_log}", "--net-log-capture-mode=Default", *extra,
                               html_path.as_uri())
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    log = json.loads(net_log.read_text())
    types = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    requests = []
    for event in log["events"]:
        params = event.get("params") or {}
        if types.get(event["type"]) == "URL_REQUEST_START_JOB" and "url" in params:
            started_by_page = params.get("network_isolation_key", "").startswith("file://")
            if started_by_page and not params["url"].startswith(("file:", "data:")):
                requests.append(params["url"])
    return PageLoad(proc.stdout, console, requests)


@pytest.fixture(scope="module")
def report_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = json.loads((FIXTURES / "results-full.json").read_text(encoding="utf-8"))
    data["model"]["classes"][0] = "<script>alert(1)</script>"  # must stay inert text
    path = tmp_path_factory.mktemp("browser") / "report.html"
    # with the installed plugins, as `medaudit report` renders: their sections hold most figures
    path.write_text(render_report(Results.model_validate(data), get_plugin_manager(warn=lambda m: None)),
                    encoding="utf-8")
    return path


def test_report_loads_offline_without_errors_or_requests(report_file: Path, tmp_path: Path) -> None:
    page = load_page(report_file, tmp_path, "--dump-dom")
    assert "<h2>Summary</h2>" in page.dom and "<h2>Appendix</h2>" in page.dom
    assert page.console == [], page.console
    assert page.page_requests == [], page.page_requests
    assert "<script" not in page.dom.lower()
    assert not re.search(r"""\s(?:src|href|xlink:href)\s*=\s*["']?\s*(?:https?:)?//""", page.dom, re.IGNORECASE)
    assert page.dom.count("<svg") >= 5  # robustness, reliability, OOD, two forest plots


def test_detectors_catch_an_external_load(report_file: Path, tmp_path: Path) -> None:
    html = report_file.read_text(encoding="utf-8")
    tampered = html.replace("<body>", '<body><img src="https://example.com/tracker.png" alt="">', 1)
    with_csp = tmp_path / "with-csp.html"
    with_csp.write_text(tampered, encoding="utf-8")
    page = load_page(with_csp, tmp_path, "--dump-dom")
    # the report's Content-Security-Policy blocks the load and says so on the console
    assert any("example.com/tracker.png" in line for line in page.console), page.console
    no_csp = tmp_path / "no-csp.html"
    no_csp.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", tampered), encoding="utf-8")
    page = load_page(no_csp, tmp_path, "--dump-dom")
    assert page.page_requests == ["https://example.com/tracker.png"]


def test_screenshot(report_file: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    load_page(report_file, tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", "--hide-scrollbars")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 3000)
    assert len(data) > 50_000  # a rendered page, not a blank one


def test_print_to_pdf(report_file: Path, tmp_path: Path) -> None:
    pdf = html_to_pdf(report_file, tmp_path / "out" / "report.pdf")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-")
    pages = len(re.findall(rb"/Type\s*/Page[^s]", data))
    assert pages >= 9  # a page break before every top-level section
    assert not list((tmp_path / "out").glob(".*partial"))
