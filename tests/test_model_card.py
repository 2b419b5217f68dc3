"""medaudit.modelcard: a results.json as a Model Card Toolkit (v0.0.2) document.

The card of a small real audit (the README's example model and data, one perturbation, 50
bootstrap rounds, subgroups by hemisphere and level: a few seconds) must validate against the
vendored schema, and every metric entry must map back to the exact number in results.json.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from medaudit.modelcard import MODEL_CARD_SCHEMA_VERSION, model_card
from medaudit.results import Results

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "audit" / "schemas"
SCHEMA_FILE = SCHEMAS / "model_card.schema.json"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real audit's results, as ``Results.model_dump(mode="json")``."""
    from click.testing import CliRunner

    from medaudit.cli import cli

    out = tmp_path_factory.mktemp("model-card") / "out"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        run = CliRunner().invoke(cli, ["run", "examples/model.pt", "--data", "examples/mni-patches/test.npz",
                                       "--config", "examples/mni-patches.yaml", "--out", str(out),
                                       "--perturbation", "intensity.gamma", "--severities", "3",
                                       "--bootstrap", "50", "--quiet"])
    finally:
        os.chdir(cwd)
    assert run.exit_code == 0, run.output
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return Results.model_validate(data).model_dump(mode="json")


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    assert cls is jsonschema.Draft7Validator  # what the schema's $schema names
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@pytest.fixture(scope="module")
def card(results: dict[str, Any]) -> dict[str, Any]:
    return model_card(results)


def errors(validator: jsonschema.protocols.Validator, doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def entries(card: dict[str, Any]) -> list[dict[str, Any]]:
    return card["quantitative_analysis"]["performance_metrics"]


def find(card: dict[str, Any], kind: str, slice_: str) -> dict[str, Any]:
    found = [e for e in entries(card) if e["type"] == kind and e["slice"] == slice_]
    assert len(found) == 1, (kind, slice_, found)
    return found[0]


def test_card_of_a_real_audit_validates(validator: jsonschema.protocols.Validator, card: dict[str, Any]) -> None:
    assert errors(validator, card) == []
    assert card["schema_version"] == MODEL_CARD_SCHEMA_VERSION == "0.0.2"
    json.dumps(card, allow_nan=False)  # JSON-ready, no NaN


@pytest.mark.parametrize("name", ["small", "full"])
def test_cards_of_older_results_files_validate(validator: jsonschema.protocols.Validator, name: str) -> None:
    # the report fixtures predate warning_records and metric_info; results-full has OOD entries
    data = json.loads((FIXTURES / f"results-{name}.json").read_text(encoding="utf-8"))
    card = model_card(data)
    assert errors(validator, card) == []
    if name == "full":
        assert any(e["type"].startswith("ood:") for e in entries(card))
        assert any(e["type"].startswith("failure_detection:") for e in entries(card))


def test_mutated_cards_fail_validation(validator: jsonschema.protocols.Validator, card: dict[str, Any]) -> None:
    """The validation is not vacuous: each of these breaks the schema."""
    number_value = copy.deepcopy(card)
    entries(number_value)[0]["value"] = float(entries(number_value)[0]["value"])  # the schema wants a string
    name_not_string = copy.deepcopy(card)
    name_not_string["model_details"]["name"] = 42
    unknown_top_level = {**copy.deepcopy(card), "medaudit": {}}  # additionalProperties: false
    metrics_not_array = copy.deepcopy(card)
    metrics_not_array["quantitative_analysis"]["performance_metrics"] = {"accuracy": "1.0"}
    for bad in (number_value, name_not_string, unknown_top_level, metrics_not_array):
        assert errors(validator, bad), bad.keys()


def test_known_metric_and_interval_are_exact(results: dict[str, Any], card: dict[str, Any]) -> None:
    clean = next(s for s in results["scenarios"] if s["id"] == "clean")
    acc = clean["metrics"]["accuracy"]
    entry = find(card, "accuracy", "clean")
    assert float(entry["value"]) == acc["value"] and entry["value"] == repr(acc["value"])
    assert float(entry["confidence_interval"]["lower_bound"]) == acc["ci_low"]
    assert float(entry["confidence_interval"]["upper_bound"]) == acc["ci_high"]
    perturbed = next(s for s in results["scenarios"] if s["id"] == "intensity.gamma@3")
    drop = find(card, "drop:accuracy", "intensity.gamma@3")
    assert float(drop["value"]) == perturbed["drop"]["accuracy"]["value"]


def _lookup(results: dict[str, Any], kind: str, slice_: str) -> dict[str, Any]:
    """The Estimate in ``results`` that a card entry (type, slice) names."""
    scenario, _, group = slice_.partition("/")
    if group:
        attribute, _, name = group.partition("=")
        source = next(g for g in results["subgroups"]
                      if (g["scenario"], g["attribute"], g["group"]) == (scenario, attribute, name))
    else:
        source = next(s for s in results["scenarios"] if s["id"] == scenario)
    family, sep, key = kind.partition(":")
    if not sep:
        return source["metrics"][kind]
    if family == "ood":
        detector, _, key = key.partition(":")
        return source["ood"][detector][key]
    return source[family][key]


def test_every_number_comes_from_results(results: dict[str, Any], card: dict[str, Any]) -> None:
    """Each metric entry maps back to its Estimate exactly, and every defined metric of every
    scenario and subgroup has its entry (nothing invented, nothing dropped)."""
    seen = set()
    for e in entries(card):
        est = _lookup(results, e["type"], e["slice"])
        assert float(e["value"]) == est["value"]
        ci = e.get("confidence_interval", {})
        assert ("lower_bound" in ci) == (est.get("ci_low") is not None)
        if ci:
            assert float(ci["lower_bound"]) == est["ci_low"] and float(ci["upper_bound"]) == est["ci_high"]
        seen.add((e["type"], e["slice"]))
    assert len(seen) == len(entries(card))  # no duplicates
    for s in results["scenarios"]:
        for key, est in s["metrics"].items():
            assert (key, s["id"]) in seen or est["value"] is None
    for g in results["subgroups"]:
        for key, est in g["metrics"].items():
            assert (key, f"{g['scenario']}/{g['attribute']}={g['group']}") in seen or est["value"] is None


def test_subgroups_appear_as_slices(results: dict[str, Any], card: dict[str, Any]) -> None:
    assert {g["attribute"] for g in results["subgroups"]} == {"hemisphere", "level"}
    left = next(g for g in results["subgroups"]
                if (g["scenario"], g["attribute"], g["group"]) == ("clean", "hemisphere", "left"))
    entry = find(card, "accuracy", "clean/hemisphere=left")
    assert float(entry["value"]) == left["metrics"]["accuracy"]["value"]
    assert float(entry["confidence_interval"]["upper_bound"]) == left["metrics"]["accuracy"]["ci_high"]
    perturbed = [e for e in entries(card) if e["slice"].startswith("intensity.gamma@3/level=")]
    assert any(e["type"] == "drop:accuracy" for e in perturbed)
    # a significant gap is an ethical consideration, with the numbers of results.json
    significant = [g for g in results["analyses"].get("subgroup_gaps", []) if g.get("significant")]
    risks = card["considerations"].get("ethical_considerations", [])
    assert len(risks) == len(significant)
    for g, risk in zip(significant, risks):
        assert repr(g["gap"]["value"]) in risk["name"] and g["attribute"] in risk["name"]


def test_intended_use_flows_through(results: dict[str, Any], card: dict[str, Any]) -> None:
    assert results["model"]["intended_use"] == results["config"]["model"]["intended_use"]
    assert card["considerations"]["use_cases"] == [{"description": results["model"]["intended_use"]}]
    other = copy.deepcopy(results)
    other["model"]["intended_use"] = other["config"]["model"]["intended_use"] = "Triage of adult brain MRI only."
    assert model_card(other)["considerations"]["use_cases"] == [{"description": "Triage of adult brain MRI only."}]
    other["model"]["intended_use"] = other["config"]["model"]["intended_use"] = None
    assert "use_cases" not in model_card(other)["considerations"]


def test_identity_and_limitations(results: dict[str, Any], card: dict[str, Any]) -> None:
    details = card["model_details"]
    assert details["name"] == results["model"]["name"]
    assert details["version"]["name"] == f"sha256:{results['model']['sha256']}"
    assert details["path"] == results["model"]["path"]
    citation = details["citations"][0]["citation"]
    assert results["medaudit_version"] in citation and results["created_at"] in citation
    data = card["model_parameters"]["data"]
    assert len(data) == 1 and results["dataset"]["sha256"] in data[0]["description"]
    assert data[0]["name"] == Path(results["dataset"]["path"]).name

    unnamed = copy.deepcopy(results)
    unnamed["model"]["name"] = None
    assert model_card(unnamed)["model_details"]["name"] == Path(results["model"]["path"]).name

    limitations = [x["description"] for x in card["considerations"]["limitations"]]
    assert any(results["verdict"]["headline"] in x for x in limitations)
    broken = [(name, key) for name, entry in results["robustness"]["breaking_points"].items()
              for key, p in entry["metrics"].items() if p["severity"] is not None]
    assert broken  # gamma at severity 3 breaks the example's accuracy
    for name, key in broken:
        p = results["robustness"]["breaking_points"][name]["metrics"][key]
        assert any(f"{name} " in x and f" breaks {key} at severity {p['severity']}:" in x and repr(p["drop"]) in x
                   for x in limitations), (name, key)
    not_broken = [key for entry in results["robustness"]["breaking_points"].values()
                  for key, p in entry["metrics"].items() if p["severity"] is None]
    for key in not_broken:
        assert not any(f" breaks {key} at" in x for x in limitations)
    for message in results["warnings"]:
        assert any(message in x for x in limitations)


def test_deterministic_and_pure(results: dict[str, Any]) -> None:
    before = copy.deepcopy(results)
    first = json.dumps(model_card(results), sort_keys=False)
    assert json.dumps(model_card(copy.deepcopy(results)), sort_keys=False) == first
    assert results == before
    # the only time in the card is the audit's own
    stamps = set(re.findall(r"\d{4}-\d{2}-\d{2}T[\d:.]+(?:[+-]\d{2}:\d{2}|Z)?", first))
    assert stamps == {results["created_at"]}


def test_schema_is_the_recorded_upstream_file_and_ships() -> None:
    notes = (SCHEMAS / "MODEL_CARD_SCHEMA.md").read_text(encoding="utf-8")
    digest = hashlib.sha256(SCHEMA_FILE.read_bytes()).hexdigest()
    assert f"File sha256 | `{digest}`" in notes
    licence = (SCHEMAS / "LICENSE-model-card-toolkit").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence and "END OF TERMS AND CONDITIONS" in licence
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]["medaudit.schemas"]
    for name in ("model_card.schema.json", "MODEL_CARD_SCHEMA.md", "LICENSE-model-card-toolkit"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name
