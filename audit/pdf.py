"""PDF export of a report through headless Chromium (``--print-to-pdf``).

Why Chromium: the report's print stylesheet (page breaks between sections, table headers repeated,
rows kept whole) is written for a browser's print engine; a pure-Python HTML→PDF converter would
render inline SVG and modern CSS differently. Chromium is optional: without it,
:func:`html_to_pdf` raises a :class:`MedauditError` that says what to install.

The browser runs with a fresh throw-away profile, no network (every host name resolves to
nothing, so even a stray external reference cannot be fetched), no GPU and no first-run or
background services.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import MedauditError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
HEADLESS_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--mute-audio",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


def find_chromium() -> str | None:
    """The Chromium/Chrome executable: ``$MEDAUDIT_CHROMIUM`` if set, else the first found on PATH."""
    env = os.environ.get("MEDAUDIT_CHROMIUM")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    return next((p for p in (shutil.which(n) for n in CHROMIUM_NAMES) if p), None)


def chromium_command(chromium: str, profile: Path, *args: str) -> list[str]:
    """A headless, offline Chromium command line with a throw-away profile."""
    return [chromium, *HEADLESS_FLAGS, f"--user-data-dir={profile}", *args]


def html_to_pdf(html_path: Path | str, pdf_path: Path | str, *, timeout: float = 180.0) -> Path:
    """Print ``html_path`` to ``pdf_path`` (A4, the report's print stylesheet, no browser header/footer).

    Raises :class:`MedauditError` when no Chromium is found, when it fails or times out, or when it
    writes no PDF.
    """
    html_path, pdf_path = Path(html_path).resolve(), Path(pdf_path).resolve()
    if not html_path.is_file():
        raise MedauditError(f"{html_path}: no such report file")
    chromium = find_chromium()
    if chromium is None:
        raise MedauditError(
            "PDF export needs Chromium or Google Chrome on PATH (looked for: " + ", ".join(CHROMIUM_NAMES)
            + "; or set MEDAUDIT_CHROMIUM); install it (e.g. `apt install chromium`) or open report.html in a "
            "browser and use Print → Save as PDF")
    pdf_path.parent.mkdir(parents=True, exist_ok=True)
    # write beside the target and rename, so a failed export never leaves a truncated PDF behind
    tmp_pdf = pdf_path.with_name(f".{pdf_path.name}.partial")
    with tempfile.TemporaryDirectory(prefix="medaudit-chromium-") as profile:
        cmd = chromium_command(chromium, Path(profile), f"--print-to-pdf={tmp_pdf}", "--no-pdf-header-footer",
                               "--run-all-compositor-stages-before-draw", html_path.as_uri())
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            tmp_pdf.unlink(missing_ok=True)
            raise MedauditError(f"{chromium} did not finish printing {html_path} within {timeout:.0f} s") from None
        except OSError as exc:
            raise MedauditError(f"could not start {chromium}: {exc}") from None
    if proc.returncode != 0 or not tmp_pdf.is_file() or tmp_pdf.stat().st_size == 0:
        tmp_pdf.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise MedauditError(f"{chromium} failed to print {html_path} to PDF (exit {proc.returncode}): "
                            + (" | ".join(tail) or "no output"))
    with open(tmp_pdf, "rb") as fh:
        if fh.read(5) != b"%PDF-":
            tmp_pdf.unlink(missing_ok=True)
            raise MedauditError(f"{chromium} wrote something that is not a PDF for {html_path}")
    os.replace(tmp_pdf, pdf_path)
    return pdf_path
