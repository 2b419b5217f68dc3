"""Evidence integrity (medaudit.integrity): a real audit's folder is sealed, `medaudit verify`
passes on it and catches every kind of alteration (exit 1), and refuses a folder that is not an
audit's (exit 2)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from medaudit.cli import cli
from medaudit.integrity import seal

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "model.pt"
DATA = ROOT / "examples" / "mni-patches" / "test.npz"
CONFIG = ROOT / "examples" / "mni-patches.yaml"


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small audit (one perturbation at one severity, 20 bootstrap resamples) with predictions."""
    out = tmp_path_factory.mktemp("integrity") / "out"
    result = CliRunner().invoke(cli, [
        "run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(out), "--quiet",
        "--perturbation", "intensity.gamma", "--severities", "1", "--bootstrap", "20", "--save-predictions",
        "--threads", "1"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def out(sealed: Path, tmp_path: Path) -> Path:
    """A copy of the sealed folder that a test may alter."""
    return Path(shutil.copytree(sealed, tmp_path / "out"))


def verify(path: Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["verify", str(path)])
    return result.exit_code, result.output


def integrity(path: Path) -> dict:
    return json.loads((path / "results.json").read_text(encoding="utf-8"))["integrity"]


def edit_byte(path: Path, old: bytes, new: bytes) -> None:
    """Replace the first occurrence of ``old`` by ``new`` (same length: a one-byte edit)."""
    assert len(old) == len(new)
    data = path.read_bytes()
    assert old in data, old
    path.write_bytes(data.replace(old, new, 1))


def test_a_fresh_audit_verifies(sealed: Path) -> None:
    code, output = verify(sealed)
    record = integrity(sealed)
    assert code == 0, output
    assert output.strip().splitlines()[-1] == (f"verified: {len(record['files'])} files, results.json content "
                                               f"sha256 {record['results_sha256']}")
    # every file the audit wrote but results.json, sorted; predictions.npz (--save-predictions) among them
    written = sorted(p.relative_to(sealed).as_posix() for p in sealed.rglob("*") if p.is_file())
    assert list(record["files"]) == [f for f in written if f != "results.json"]
    assert {"predictions.npz", "report.html", "tables/robustness-scenarios.csv"} <= set(record["files"])
    assert record["algorithm"] == "sha256"


def test_hashes_recomputed_by_hand(sealed: Path) -> None:
    # the recipe of docs/report.md, with hashlib only
    data = json.load(open(sealed / "results.json", encoding="utf-8"))
    record = data.pop("integrity")
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert hashlib.sha256(canonical).hexdigest() == record["results_sha256"]
    for rel, digest in record["files"].items():
        assert hashlib.sha256((sealed / rel).read_bytes()).hexdigest() == digest
    # medaudit's own serialisation: re-serialising the parsed file gives it back byte for byte
    raw = (sealed / "results.json").read_bytes()
    assert (json.dumps(json.loads(raw), indent=2, ensure_ascii=False) + "\n").encode("utf-8") == raw


def test_edited_value_in_results(out: Path) -> None:
    # one digit of the clean accuracy
    text = (out / "results.json").read_bytes()
    start = text.index(b'"value": 0.98') + len(b'"value": 0.98')
    edited = text[:start] + (b"7" if text[start:start + 1] != b"7" else b"6") + text[start + 1:]
    (out / "results.json").write_bytes(edited)
    code, output = verify(out)
    assert code == 1, output
    assert "results.json: content changed since it was sealed" in output
    assert "NOT verified" in output


def test_whitespace_edit_in_results(out: Path) -> None:
    # the parsed content is equal, so only the serialisation check sees it
    edit_byte(out / "results.json", b'"seed": ', b'"seed":\t')
    code, output = verify(out)
    assert code == 1, output
    assert "results.json: its bytes are not medaudit's serialisation" in output
    assert "content changed" not in output


def test_edited_report(out: Path) -> None:
    edit_byte(out / "report.html", b"<dt>Seed</dt>", b"<dt>Sead</dt>")
    code, output = verify(out)
    assert code == 1, output
    assert "report.html: changed since it was sealed" in output
    assert "report.html: the report does not follow from results.json" in output


def test_edited_table(out: Path) -> None:
    edit_byte(out / "tables" / "robustness-scenarios.csv", b"clean,,0,0.9", b"clean,,0,0.8")
    code, output = verify(out)
    assert code == 1, output
    assert "tables/robustness-scenarios.csv: changed since it was sealed" in output
    assert "tables/robustness-scenarios.csv: the report does not follow from results.json" in output


def test_deleted_file(out: Path) -> None:
    (out / "predictions.npz").unlink()
    code, output = verify(out)
    assert code == 1, output
    assert "predictions.npz: missing" in output


def test_added_file(out: Path) -> None:
    (out / ".DS_Store").write_bytes(b"hidden entries are not audit outputs")
    assert verify(out)[0] == 0
    (out / "tables" / "notes.txt").write_text("added later\n")
    code, output = verify(out)
    assert code == 1, output
    assert "tables/notes.txt: not covered by results.json's integrity record" in output


def test_rerendered_report_still_verifies(out: Path) -> None:
    before = (out / "report.html").read_bytes()
    result = CliRunner().invoke(cli, ["report", str(out / "results.json")])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").read_bytes() == before  # the report never shows timing's report phase nor integrity
    code, output = verify(out)
    assert code == 0, output


def test_reseal_covers_files_written_after_the_run(out: Path, tmp_path: Path) -> None:
    # what `medaudit run --pdf` and a model card written elsewhere do after the audit
    before = integrity(out)
    (out / "report.pdf").write_bytes(b"%PDF-1.4 stand-in")
    card = tmp_path / "card.md"
    card.write_text("# Model card\n")
    assert "report.pdf: not covered" in verify(out)[1]
    record = seal(out, extra=[card])
    assert record == integrity(out)
    assert record["results_sha256"] == before["results_sha256"]  # the content is unchanged
    assert record["files"]["report.pdf"] == hashlib.sha256(b"%PDF-1.4 stand-in").hexdigest()
    assert record["files"]["../card.md"] == hashlib.sha256(b"# Model card\n").hexdigest()
    assert verify(out)[0] == 0
    card.write_text("# Model card, edited\n")
    code, output = verify(out)
    assert code == 1 and "../card.md: changed since it was sealed" in output


def test_unsealed_results(out: Path) -> None:
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    del data["integrity"]
    (out / "results.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    code, output = verify(out)
    assert code == 1 and "results.json: no integrity record" in output


def test_not_an_audit_folder(tmp_path: Path) -> None:
    code, output = verify(tmp_path)
    assert code == 2 and "not a medaudit output folder (no results.json)" in output
    code, output = verify(tmp_path / "nowhere")
    assert code == 2 and "no such folder" in output
    (tmp_path / "results.json").write_text('{"hello": 1}\n')
    code, output = verify(tmp_path)
    assert code == 2 and "not a medaudit results file" in output
