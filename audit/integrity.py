"""Evidence integrity: results.json seals the audit's output folder, ``medaudit verify`` checks it.

``medaudit run`` writes, inside results.json, a top-level ``integrity`` record::

    "integrity": {
      "algorithm": "sha256",
      "results_sha256": "<SHA-256 of results.json's canonical content, the integrity key left out>",
      "files": {"predictions.npz": "<SHA-256 of the file's bytes>", "report.html": "…", "tables/ood.csv": "…"}
    }

* ``files`` lists every other file the audit wrote in its output folder (``report.html``,
  ``tables/*.csv``, ``predictions.npz``, ``report.pdf``, a model card …) by its path relative to the
  folder (``/``-separated, sorted), with the SHA-256 of its bytes (``sha256sum`` of it;
  :func:`medaudit.hashing.sha256_file`). A file written outside the folder and sealed with it
  (``extra`` of :func:`seal`) is listed by its relative path from the folder (``../card.md``).
  Hidden entries (a name starting with ``.``, such as the shard cache ``.medaudit-cache/`` or an
  editor's swap file) are not audit outputs and are neither listed nor checked.
* ``results_sha256`` is the SHA-256 of results.json's *canonical content*: the parsed JSON object
  without its ``integrity`` key, serialised with sorted keys, no white space and UTF-8. Anyone can
  recompute it with three lines of Python::

      import hashlib, json
      data = json.load(open("results.json", encoding="utf-8")); data.pop("integrity")
      print(hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")).hexdigest())

  and the other files' hashes with ``sha256sum``.

results.json's bytes are medaudit's own serialisation (:func:`medaudit.results.dumps`: two-space
indents, non-ASCII kept, a final newline), so re-serialising the parsed object that way gives the
file back byte for byte; :func:`verify` uses this to catch an edit that leaves the parsed content
equal (white space, number formatting, key order), which the canonical hash cannot see.

Not a signature: anyone who can edit the folder can also reseal it. The seal shows that a filed
audit is unaltered when its ``results_sha256`` (or results.json's own ``sha256sum``) is recorded
elsewhere, e.g. in a submission or a ticket.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from . import __version__
from .errors import DataError, MedauditError
from .hashing import sha256_file
from .results import Results, dumps, load_results
from .writing import write_atomic

if TYPE_CHECKING:
    from .plugin_manager import PluginManager

__all__ = ["ALGORITHM", "canonical_content", "content_sha256", "seal", "summary", "verify"]

ALGORITHM = "sha256"
RESULTS = "results.json"
REPORT = "report.html"
TABLES = "tables"


def canonical_content(data: dict[str, Any]) -> bytes:
    """results.json's canonical content: the object without ``integrity``, sorted keys, no white
    space, UTF-8 (what ``results_sha256`` hashes)."""
    content = {k: v for k, v in data.items() if k != "integrity"}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def content_sha256(data: dict[str, Any]) -> str:
    """Hex SHA-256 of :func:`canonical_content`."""
    return hashlib.sha256(canonical_content(data)).hexdigest()


def _outputs(out_dir: Path) -> list[str]:
    """Relative ``/``-paths of the regular files under ``out_dir`` but results.json, hidden entries
    left out, sorted."""
    found = []
    for root, dirs, files in os.walk(out_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(root) / name
            rel = path.relative_to(out_dir).as_posix()
            if not name.startswith(".") and rel != RESULTS and path.is_file():
                found.append(rel)
    return sorted(found)


def _relative(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir)).as_posix()


def seal(out_dir: Path, extra: Iterable[Path] = ()) -> dict[str, Any]:
    """Write the ``integrity`` record into ``out_dir/results.json`` and return it.

    It covers every regular file under ``out_dir`` except results.json and hidden entries, plus the
    ``extra`` files (outside the folder, e.g. a model card written elsewhere), listed by their path
    relative to ``out_dir``. Calling it again after more files were written (report.pdf, a model
    card) reseals: the record is recomputed from the folder as it is then, so pass ``extra`` again
    on every call. results.json is rewritten atomically in medaudit's serialisation
    (:func:`medaudit.results.dumps`); its content apart from ``integrity`` is unchanged.

    Raises
    ------
    MedauditError
        results.json is missing or not a medaudit results file; an ``extra`` file does not exist.
    """
    path = out_dir / RESULTS
    results = load_results(path)
    results.integrity = None
    files = {rel: sha256_file(out_dir / rel) for rel in _outputs(out_dir)}
    for p in extra:
        if not Path(p).is_file():
            raise MedauditError(f"cannot seal {out_dir}: {p} is not a file")
        files[_relative(Path(p), out_dir)] = sha256_file(Path(p))
    # the hash of exactly what is written: the content as results.json will hold it
    content = json.loads(dumps(results))
    record = {"algorithm": ALGORITHM, "results_sha256": content_sha256(content), "files": dict(sorted(files.items()))}
    results.integrity = record
    write_atomic(path, dumps(results).encode("utf-8"))
    return record


def _not_an_audit(out_dir: Path, why: str) -> DataError:
    return DataError(f"{out_dir}: not a medaudit output folder ({why})")


def verify(out_dir: Path, pm: PluginManager | None) -> list[str]:
    """Check an audit's output folder against results.json's ``integrity``; the mismatches, one
    human-readable line each (empty: verified).

    Checked: results.json parses and holds an integrity record; its bytes are its own
    re-serialisation (:func:`medaudit.results.dumps`); its canonical content hashes to
    ``results_sha256``; every listed file exists with its hash; no file in the folder is unlisted
    (added after sealing, or left there by an earlier run); and the report re-rendered from
    results.json (as ``medaudit report`` does, with the plugins of ``pm``) equals report.html and
    tables/*.csv byte for byte. report.pdf cannot be re-rendered byte-identically (Chromium embeds
    dates and ids), so only its hash is checked.

    Raises
    ------
    DataError
        ``out_dir`` is not a folder, or holds neither results.json nor report.html, or its
        results.json is unsealed and not a medaudit results file: not an audit folder.
    """
    if not out_dir.is_dir():
        raise _not_an_audit(out_dir, "no such folder" if not out_dir.exists() else "not a folder")
    path = out_dir / RESULTS
    if not path.is_file():
        if not (out_dir / REPORT).is_file():
            raise _not_an_audit(out_dir, f"no {RESULTS}")
        return [f"{RESULTS}: missing (the folder has a {REPORT}, but the results it was rendered from are gone)"]
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"{RESULTS}: not valid JSON ({exc}): it was altered"]
    if not isinstance(data, dict):
        return [f"{RESULTS}: not a JSON object: it was altered"]
    integrity = data.get("integrity")
    if integrity is None:
        try:
            Results.model_validate(data)
        except ValidationError:
            raise _not_an_audit(out_dir, f"{RESULTS} is not a medaudit results file") from None
        return [f"{RESULTS}: no integrity record: written by a medaudit without seals, or the record was removed; "
                "nothing can be verified"]
    if (not isinstance(integrity, dict) or integrity.get("algorithm") != ALGORITHM
            or not isinstance(integrity.get("results_sha256"), str) or not isinstance(integrity.get("files"), dict)):
        return [f"{RESULTS}: its integrity record is malformed (expected algorithm {ALGORITHM!r}, results_sha256 and "
                "files): it was altered"]

    problems = []
    if (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8") != raw:
        problems.append(f"{RESULTS}: its bytes are not medaudit's serialisation of its own content (edited by hand: "
                        "white space, number formatting or key order)")
    actual = content_sha256(data)
    if actual != integrity["results_sha256"]:
        problems.append(f"{RESULTS}: content changed since it was sealed (canonical SHA-256 {actual}, sealed "
                        f"{integrity['results_sha256']})")
    files: dict[str, Any] = integrity["files"]
    for rel, sealed in files.items():
        p = out_dir / rel
        if not p.is_file():
            problems.append(f"{rel}: missing (listed in {RESULTS}'s integrity record)")
        elif sha256_file(p) != sealed:
            problems.append(f"{rel}: changed since it was sealed (SHA-256 differs from {RESULTS}'s integrity record)")
    for rel in _outputs(out_dir):
        if rel not in files:
            problems.append(f"{rel}: not covered by {RESULTS}'s integrity record (added after sealing, or left by an "
                            "earlier run into the same folder)")
    if (out_dir / REPORT).is_file() or REPORT in files:
        problems += _rerender(out_dir, data, files, pm)
    return problems


def _rerender(out_dir: Path, data: dict[str, Any], files: dict[str, Any], pm: PluginManager | None) -> list[str]:
    """Mismatches between report.html, tables/*.csv and the report re-rendered from results.json."""
    from .report import render_report_files

    written = data.get("medaudit_version")
    hint = ("" if written == __version__ else
            f" (written by medaudit {written}, re-rendered with medaudit {__version__}: if the file hashes match, the "
            "renderer changed, not the report)")
    try:
        rendered = render_report_files(load_results(out_dir / RESULTS), pm)
    except MedauditError as exc:
        return [f"{REPORT}: cannot be re-rendered from {RESULTS} ({exc}): the report does not follow from {RESULTS}"]
    problems = []
    report = out_dir / REPORT
    if report.is_file() and report.read_bytes() != rendered.html.encode("utf-8"):
        problems.append(f"{REPORT}: the report does not follow from {RESULTS} (re-rendering {RESULTS} gives different "
                        f"bytes){hint}")
    tables = out_dir / TABLES
    on_disk = {p.name for p in tables.glob("*.csv") if not p.name.startswith(".")} if tables.is_dir() else set()
    for name in sorted(on_disk | set(rendered.tables)):
        rel = f"{TABLES}/{name}"
        if name not in rendered.tables:
            problems.append(f"{rel}: the report does not follow from {RESULTS} (re-rendering {RESULTS} writes no such "
                            f"table){hint}")
        elif name not in on_disk:
            if rel not in files:  # a listed file that is gone is reported above
                problems.append(f"{rel}: missing (re-rendering {RESULTS} writes it){hint}")
        elif (tables / name).read_bytes() != rendered.tables[name].encode("utf-8"):
            problems.append(f"{rel}: the report does not follow from {RESULTS} (re-rendering {RESULTS} gives different "
                            f"bytes){hint}")
    return problems


def summary(out_dir: Path) -> str:
    """``verified: N files, results.json content sha256 …``: the line ``medaudit verify`` prints for
    a verified folder (N: the files the record lists, results.json not counted)."""
    integrity = json.loads((out_dir / RESULTS).read_text(encoding="utf-8"))["integrity"]
    return f"verified: {len(integrity['files'])} files, {RESULTS} content sha256 {integrity['results_sha256']}"
