"""What `medaudit run` writes as evidence besides results.json and the report: the model card
(--model-card, inside or outside the output folder), report.pdf (--pdf) and a JUnit file inside
the folder are sealed with the rest from the start (`medaudit verify` passes); a previous run's
outputs that this run does not write are removed; `medaudit report` on a sealed folder keeps it
verifiable; the report links the card and states the protocol."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from medaudit.cli import cli
from medaudit.pdf import find_chromium

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "model.pt"
DATA = ROOT / "examples" / "mni-patches" / "test.npz"
CONFIG = ROOT / "examples" / "mni-patches.yaml"
CARD_SCHEMA = ROOT / "audit" / "schemas" / "model_card.schema.json"


def run(out: Path, *extra: str) -> str:
    result = CliRunner().invoke(cli, [
        "run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(out), "--quiet",
        "--perturbation", "intensity.gamma", "--severities", "1", "--bootstrap", "20", "--threads", "1", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def verify(out: Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["verify", str(out)])
    return result.exit_code, result.output


def files(out: Path) -> dict[str, str]:
    return json.loads((out / "results.json").read_text(encoding="utf-8"))["integrity"]["files"]


def test_model_card_outside_the_folder_is_sealed_valid_and_linked(tmp_path: Path) -> None:
    out, card = tmp_path / "out", tmp_path / "cards" / "model-card.json"
    output = run(out, "--model-card", str(card))
    assert f"model card: {card}" in output
    document = json.loads(card.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator(json.loads(CARD_SCHEMA.read_text(encoding="utf-8"))).validate(document)
    assert files(out)["../cards/model-card.json"]
    assert verify(out)[0] == 0
    # the report links the card by its path from the report
    assert '<a href="../cards/model-card.json">' in (out / "report.html").read_text(encoding="utf-8")
    # an edited card is caught
    card.write_text(card.read_text(encoding="utf-8").replace('"', "'", 1), encoding="utf-8")
    code, message = verify(out)
    assert code == 1 and "model-card.json" in message


def test_card_and_junit_inside_the_folder_are_written_with_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(out, "--model-card", str(out / "model-card.json"), "--junit", str(out / "ci" / "junit.xml"),
        "--fail-on", "clean.accuracy<0.5")
    sealed = files(out)
    assert {"model-card.json", "ci/junit.xml"} <= set(sealed)
    assert "<testsuite" in (out / "ci" / "junit.xml").read_text(encoding="utf-8")
    assert verify(out)[0] == 0


def test_previous_outputs_this_run_does_not_write_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(out, "--save-predictions")
    assert (out / "predictions.npz").is_file()
    (out / "report.pdf").write_bytes(b"%PDF-1.4 an earlier run's report")
    (out / "notes.txt").write_text("the user's own file", encoding="utf-8")
    run(out)
    # an earlier audit's predictions and PDF must not sit beside these results; other files stay
    assert not (out / "predictions.npz").exists() and not (out / "report.pdf").exists()
    assert (out / "notes.txt").is_file()
    code, message = verify(out)
    assert code == 1 and "notes.txt" in message  # not the audit's: verify names it


def test_report_rerendered_in_a_sealed_folder_stays_verifiable(tmp_path: Path) -> None:
    out, card = tmp_path / "out", tmp_path / "card.json"
    run(out, "--model-card", str(card))
    result = CliRunner().invoke(cli, ["report", str(out / "results.json")])
    assert result.exit_code == 0, result.output
    assert verify(out)[0] == 0
    assert "../card.json" in files(out)  # a card outside the folder stays sealed


@pytest.mark.skipif(find_chromium() is None, reason="--pdf needs Chromium")
def test_pdf_is_sealed_with_the_audit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(out, "--pdf")
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF")
    assert "report.pdf" in files(out)
    assert verify(out)[0] == 0
