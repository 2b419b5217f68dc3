"""``medaudit.compare``: metric changes between two audits, significance by CI overlap, regressions,
refusal of audits of different data, and the summarised console (through the CLI)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from medaudit.cli import cli
from medaudit.compare import SUMMARY_LINES, IncomparableAudits, compare, describe, render_compare
from medaudit.results import Results

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def base() -> dict[str, Any]:
    return json.loads((FIXTURES / "results-full.json").read_text(encoding="utf-8"))


def res(d: dict[str, Any]) -> Results:
    return Results.model_validate(d)


def shift(d: dict[str, Any], sid: str, key: str, by: float) -> dict[str, Any]:
    d = copy.deepcopy(d)
    est = next(s for s in d["scenarios"] if s["id"] == sid)["metrics"][key]
    for k in ("value", "ci_low", "ci_high"):
        est[k] += by
    return d


def change(result: Any, sid: str, key: str) -> Any:
    return next(c for c in result.changes if c.scenario == sid and c.metric == key)


def test_identical_audits_have_no_change(base: dict[str, Any]) -> None:
    r = compare(res(base), res(base))
    assert r.changes and not r.has_regression and not r.regressions
    assert all(c.delta == 0 and not c.significant for c in r.changes if c.delta is not None)
    assert any("same data" in n for n in r.notes) and any("same model" in n for n in r.notes)


def test_accuracy_drop_is_a_significant_regression(base: dict[str, Any]) -> None:
    new = shift(base, "clean", "accuracy", -0.1)  # CI [0.880, 0.897] vs [0.980, 0.997]: disjoint
    r = compare(res(base), res(new))
    c = change(r, "clean", "accuracy")
    assert c.higher_is_better is True
    assert c.delta == pytest.approx(-0.1) and c.worsening == pytest.approx(0.1)
    assert c.significant and c.regression and r.has_regression
    assert [x.metric for x in r.regressions] == ["accuracy"]


def test_tolerance_and_direction(base: dict[str, Any]) -> None:
    worse = shift(base, "clean", "accuracy", -0.01)
    assert not compare(res(base), res(worse), max_drop=0.02).has_regression
    assert compare(res(base), res(worse), max_drop=0.005).has_regression
    # a small non-significant worsening counts unless significance is required
    c = change(compare(res(base), res(worse)), "clean", "accuracy")
    assert c.regression and not c.significant
    assert not compare(res(base), res(worse), require_significant=True).has_regression
    # lower-is-better: ECE up is worse, ECE down is an improvement
    up = compare(res(base), res(shift(base, "mri.noise@5", "ece", +0.05)))
    assert change(up, "mri.noise@5", "ece").worsening == pytest.approx(0.05) and up.has_regression
    down = compare(res(base), res(shift(base, "mri.noise@5", "ece", -0.02)))
    assert change(down, "mri.noise@5", "ece").worsening == pytest.approx(-0.02) and not down.has_regression
    with pytest.raises(ValueError):
        compare(res(base), res(base), max_drop=-1)


def test_unknown_direction_and_undefined_values_never_regress(base: dict[str, Any]) -> None:
    new = copy.deepcopy(base)
    del new["metric_directions"]["nll"]
    old = copy.deepcopy(base)
    del old["metric_directions"]["nll"]
    new = shift(new, "clean", "nll", +1.0)
    c = change(compare(res(old), res(new)), "clean", "nll")
    assert c.higher_is_better is None and c.worsening is None and not c.regression and c.significant
    undefined = copy.deepcopy(base)
    undefined["scenarios"][0]["metrics"]["auroc"] = {"value": None, "ci_low": None, "ci_high": None}
    c = change(compare(res(base), res(undefined)), "clean", "auroc")
    assert c.delta is None and not c.regression


def test_scenarios_in_one_run_only_are_counted(base: dict[str, Any]) -> None:
    new = copy.deepcopy(base)
    new["scenarios"] = [s for s in new["scenarios"] if s["id"] != "mri.noise@1"]
    r = compare(res(base), res(new))
    assert r.only_old == ["mri.noise@1"] and r.only_new == []
    assert not any(c.scenario == "mri.noise@1" for c in r.changes)
    assert r.unmatched == "1 scenario(s) in one audit only, not compared (1 only in the old, 0 only in the new)"
    assert compare(res(base), res(base)).unmatched is None


def test_different_data_or_task_is_refused_unless_allowed(base: dict[str, Any]) -> None:
    new = copy.deepcopy(base)
    new["dataset"]["sha256"] = "ab" * 32
    new["dataset"]["path"] = "/elsewhere/other.npz"
    with pytest.raises(IncomparableAudits) as exc:
        compare(res(base), res(new))
    msg = str(exc.value)
    assert "\n" not in msg and "e2c7f627f089" in msg and "abababababab" in msg
    assert base["dataset"]["path"] in msg and "/elsewhere/other.npz" in msg and "--allow-different-data" in msg
    r = compare(res(base), res(new), allow_different_data=True)
    assert len(r.mismatch) == 1 and "e2c7f627f089" in r.mismatch[0] and r.changes
    assert not any("same data" in n for n in r.notes)
    # a different label space on the same file is just as incomparable
    relabelled = copy.deepcopy(base)
    relabelled["config"]["task"]["classes"] = ["csf", "grey_matter", "white_matter"]
    with pytest.raises(IncomparableAudits, match=r"different task: old multiclass \[csf_other, grey_matter, "
                                                  r"white_matter\], new multiclass \[csf, grey_matter"):
        compare(res(base), res(relabelled))
    assert compare(res(base), res(relabelled), allow_different_data=True).mismatch[0].startswith("different task")


def test_settings_that_differ_are_stated_not_refused(base: dict[str, Any]) -> None:
    new = copy.deepcopy(base)
    new["seed"] = 7
    new["config"]["audit"]["bootstrap"] = 200
    new["config"]["audit"]["severities"] = [1, 3, 5]
    r = compare(res(base), res(new))
    assert r.settings == ["seed 0 vs 7", "audit.bootstrap 50 vs 200", "audit.severities [1, 5] vs [1, 3, 5]"]
    assert any("seed 0 vs 7" in n for n in r.notes) and not r.mismatch
    assert compare(res(base), res(base)).settings == []


def test_regressions_worst_first_and_improvements(base: dict[str, Any]) -> None:
    new = shift(base, "clean", "accuracy", -0.02)  # CIs [0.960, 0.977] vs [0.980, 0.997]: disjoint
    new = shift(new, "intensity.gamma@5", "accuracy", -0.05)  # width 0.071: CIs overlap, larger drop
    new = shift(new, "mri.noise@5", "accuracy", -0.1)  # width 0.049: disjoint, largest drop
    new = shift(new, "intensity.gamma@5", "ece", -0.2)  # width 0.068: disjoint improvement
    new = shift(new, "mri.noise@1", "f1_macro", +0.001)  # overlapping improvement
    r = compare(res(base), res(new))
    assert [(c.scenario, c.metric) for c in r.regressions] == [
        ("mri.noise@5", "accuracy"), ("clean", "accuracy"), ("intensity.gamma@5", "accuracy")]
    assert [(c.scenario, c.metric) for c in r.improvements] == [("intensity.gamma@5", "ece"), ("mri.noise@1", "f1_macro")]
    assert len(compare(res(base), res(new), max_drop=0.01).improvements) == 1
    assert [c.metric for c in compare(res(base), res(new), require_significant=True).improvements] == ["ece"]
    assert r.best_improvement == ("largest with disjoint CIs: intensity.gamma@5 ece: 0.3012 -> 0.1012 "
                                  "(better by 0.2000, CIs disjoint)")
    small = compare(res(base), res(shift(base, "mri.noise@1", "f1_macro", +0.001)))
    assert small.best_improvement == "largest: mri.noise@1 f1_macro: 0.9850 -> 0.9860 (better by 0.0010, CIs overlap)"
    assert compare(res(base), res(base)).best_improvement is None
    no_ci = copy.deepcopy(base)
    no_ci["scenarios"][0]["metrics"]["accuracy"].update(value=0.9, ci_low=None, ci_high=None)  # audit.bootstrap: 0
    assert describe(compare(res(base), res(no_ci)).regressions[0]).endswith("0.9883 -> 0.9000 (worse by 0.0883, no CIs)")


def test_render_compare_html(base: dict[str, Any]) -> None:
    new = shift(base, "clean", "accuracy", -0.1)
    new["model"]["path"] = "/m/<script>alert(1)</script>.pt"
    new["checks"][0]["passed"] = False
    r = compare(res(base), res(new), max_drop=0.01)
    html = render_compare(r)
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Verdict: <strong>REGRESSION</strong>" in html and 'role="alert"' not in html
    assert html.count("REGRESSION") >= 3  # verdict, regressions table, headline table
    assert "<li>clean accuracy: 0.9883 -&gt; 0.8883 (worse by 0.1000, CIs disjoint)</li>" in html
    assert "http://" not in html.replace('"http://www.w3.org', "") and "https://" not in html
    ok = render_compare(compare(res(base), res(base)))
    assert "Verdict: <strong>no regression</strong>" in ok and "No metric worsened" in ok
    assert render_compare(compare(res(base), res(base))) == ok  # deterministic
    assert r.to_dict()["has_regression"] is True and json.dumps(r.to_dict())


# --- through the CLI, on results.json files of real (tiny) audits -------------------------------------------

def _audit(data: Path, out: Path) -> Path:
    """A tiny real audit of the bundled example model on ``data``; its results.json."""
    res = subprocess.run(
        [sys.executable, "-m", "medaudit.cli", "run", str(ROOT / "examples" / "model.pt"), "--data", str(data),
         "--config", str(ROOT / "examples" / "mni-patches.yaml"), "--out", str(out), "--quiet", "--threads", "1",
         "--perturbation", "intensity.gamma", "--severities", "1,5", "--bootstrap", "20"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    return out / "results.json"


@pytest.fixture(scope="module")
def audits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two audits of the same model on disjoint fifths of the example's test set (different data)."""
    tmp = tmp_path_factory.mktemp("compare")
    with np.load(ROOT / "examples" / "mni-patches" / "test.npz") as d:
        arrays = {k: d[k] for k in d.files}
    paths = []
    for i in (0, 1):
        data = tmp / f"fifth{i}.npz"
        np.savez(data, **{k: v[i::5] for k, v in arrays.items()})
        paths.append(_audit(data, tmp / f"out{i}"))
    return paths[0], paths[1]


def sha12(results: Path) -> str:
    return json.loads(results.read_text())["dataset"]["sha256"][:12]


def test_cli_refuses_different_data(audits: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = audits
    html = tmp_path / "cmp.html"
    res = subprocess.run([sys.executable, "-m", "medaudit.cli", "compare", str(a), str(b), "-o", str(html)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("medaudit: error: the two audits are not comparable: different data")
    assert sha12(a) != sha12(b) and sha12(a) in lines[0] and sha12(b) in lines[0]
    assert "fifth0.npz" in lines[0] and "fifth1.npz" in lines[0] and "--allow-different-data" in lines[0]
    assert not html.exists() and not list(tmp_path.iterdir())


def test_cli_allow_different_data_states_the_mismatch(audits: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = audits
    html = tmp_path / "cmp.html"
    res = subprocess.run([sys.executable, "-m", "medaudit.cli", "compare", str(a), str(b), "-o", str(html),
                          "--allow-different-data"], capture_output=True, text=True)
    out = res.stdout.splitlines()
    assert out[0].startswith("warning: different data: old ") and sha12(a) in out[0] and sha12(b) in out[0]
    assert out[1] == f"comparison: {html}"
    n = int(re.fullmatch(r"(\d+) regression\(s\) beyond 0\.0", out[-1]).group(1))  # type: ignore[union-attr]
    assert res.returncode == (1 if n else 0), res.stderr
    page = html.read_text()
    banner = page.index('role="alert"')
    assert banner < page.index('id="summary"') and "not like for like" in page[banner:banner + 200]
    assert sha12(a) in page[banner:page.index('id="summary"')] and sha12(b) in page[banner:page.index('id="summary"')]


def test_cli_same_audit_and_exit_1_semantics(audits: tuple[Path, Path], tmp_path: Path) -> None:
    a = audits[0]
    same = CliRunner().invoke(cli, ["compare", str(a), str(a)])
    assert same.exit_code == 0, same.output
    assert same.stdout.splitlines() == ["0 improvement(s) beyond 0.0", "0 regression(s) beyond 0.0"]
    worse = json.loads(a.read_text())
    acc = worse["scenarios"][0]["metrics"]["accuracy"]
    acc["value"] -= 0.2
    new = tmp_path / "new.json"
    new.write_text(json.dumps(worse))
    diff = CliRunner().invoke(cli, ["compare", str(a), str(new), "--max-drop", "0.05"])
    assert diff.exit_code == 1, diff.output
    assert diff.stdout.splitlines()[0].startswith("regression: clean accuracy: ")
    assert diff.stdout.splitlines()[-1] == "1 regression(s) beyond 0.05"
    assert CliRunner().invoke(cli, ["compare", str(a), str(new), "--max-drop", "0.25"]).exit_code == 0


def test_cli_many_regressions_are_summarised(base: dict[str, Any], tmp_path: Path) -> None:
    # every metric with a direction worse in every scenario, the i-th by 0.002·(i + 1) in its units
    new = copy.deepcopy(base)
    expected = []  # (CIs disjoint, worsening, scenario, metric), worked out here from the shifted intervals
    for s in new["scenarios"]:
        for key, est in s["metrics"].items():
            if est["value"] is None or key not in base["metric_directions"]:
                continue
            worse = 0.002 * (len(expected) + 1)
            old = dict(est)
            for k in ("value", "ci_low", "ci_high"):
                est[k] += -worse if base["metric_directions"][key] else worse
            expected.append((old["ci_high"] < est["ci_low"] or est["ci_high"] < old["ci_low"], worse, s["id"], key))
    old_p, new_p, html = tmp_path / "old.json", tmp_path / "new.json", tmp_path / "cmp.html"
    old_p.write_text(json.dumps(base))
    new_p.write_text(json.dumps(new))
    res = CliRunner().invoke(cli, ["compare", str(old_p), str(new_p), "-o", str(html)])
    assert res.exit_code == 1, res.output
    lines = res.stdout.splitlines()
    n = len(expected)
    assert n > SUMMARY_LINES + 20
    shown = [ln for ln in lines if ln.startswith("regression: ")]
    assert len(shown) == SUMMARY_LINES
    assert lines == [f"comparison: {html}", *shown, f"... and {n - SUMMARY_LINES} more (all in {html})",
                     "0 improvement(s) beyond 0.0", f"{n} regression(s) beyond 0.0"]
    # worst first: disjoint CIs before overlapping ones, each by worsening
    first = sorted(expected, key=lambda e: (not e[0], -e[1]))[:SUMMARY_LINES]
    assert any(not sig for sig, *_ in expected) and any(sig for sig, *_ in expected)
    assert [ln.split(":")[1].strip() for ln in shown] == [f"{sid} {key}" for _, _, sid, key in first]
    for ln, (sig, worse, _, _) in zip(shown, first, strict=True):
        assert f"(worse by {worse:.4f}, CIs {'disjoint' if sig else 'overlap'})" in ln
    page = html.read_text()
    regressions = page[page.index('id="regressions"'):page.index('id="changes"')]
    assert regressions.count("<td>REGRESSION</td>") == n
    assert f"… and {n - SUMMARY_LINES} more" in page


def _perturbed(d: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in d["scenarios"] if s["perturbation"])


def test_robustness_rows_side_by_side(base: dict[str, Any]) -> None:
    new = copy.deepcopy(base)
    sc = _perturbed(new)
    # the new model drops far more in this scenario, with an interval disjoint from the old one's
    old_drop = _perturbed(base)["drop"]["accuracy"]
    sc["drop"]["accuracy"] = {**old_drop, "value": old_drop["value"] + 0.5, "ci_low": (old_drop["ci_high"] or 0) + 0.1,
                              "ci_high": (old_drop["ci_high"] or 0) + 0.6}
    sc["representation"] = {"cka": {"value": 0.42, "ci_low": 0.4, "ci_high": 0.45}}
    result = compare(res(base), res(new), 0.05)
    rows = {r.scenario: r for r in result.robustness}
    assert set(rows) == {s["id"] for s in base["scenarios"] if s["perturbation"]}
    row = rows[sc["id"]]
    assert row.metric == "accuracy" and row.more_robust == "old"
    assert row.new_representation["cka"]["value"] == 0.42 and row.old_representation == {}
    unchanged = next(r for r in result.robustness if r.scenario != sc["id"])
    assert unchanged.more_robust == "neither (CIs overlap)"
    html = render_compare(result)
    assert "Robustness per perturbation" in html and "0.420 [0.400, 0.450]" in html
    assert result.to_dict()["robustness"][0]["more_robust"]


def test_encoder_audit_compares_with_the_classifier_of_its_classes(base: dict[str, Any]) -> None:
    enc = copy.deepcopy(base)
    enc["config"]["task"]["type"] = "embedding"
    enc["model"]["task"] = "embedding"
    result = compare(res(enc), res(base))  # no IncomparableAudits: the same label space
    assert any("different kinds (embedding vs" in n for n in result.notes)
    other = copy.deepcopy(enc)
    other["config"]["task"]["classes"] = [*base["config"]["task"]["classes"], "extra"]
    with pytest.raises(IncomparableAudits, match="different task"):
        compare(res(other), res(base))
