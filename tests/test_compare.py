"""``medaudit.compare``: metric changes between two audits, significance by CI overlap or paired tests,
regressions, refusal of audits of different data or protocols, the leaderboard of two or more audits
with the baseline rule, and the summarised console (through the CLI)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from medaudit.cli import cli
from medaudit.compare import (SUMMARY_LINES, DifferentProtocols, IncomparableAudits, compare, compare_audits, describe,
                              leaderboard, monte_carlo_p, paired_comparison, render_audits, render_compare)
from medaudit.bootstrap import bootstrap_weights
from medaudit.paired import paired_bootstrap
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
    lines = same.stdout.splitlines()
    assert lines[0] == "protocol: none" and lines[1] == f"leaderboard, best first ([1] {a}, [2] {a}):"
    # audited without --save-predictions: the comparison says it falls back to CI overlap
    assert lines[-3] == (f"note: no paired tests for [1] vs [2]: no predictions.npz beside [1] {a} (audit it with "
                         "--save-predictions); significance falls back to CI overlap")
    assert lines[-2:] == ["0 improvement(s) beyond 0.0", "0 regression(s) beyond 0.0"]
    worse = json.loads(a.read_text())
    acc = worse["scenarios"][0]["metrics"]["accuracy"]
    acc["value"] -= 0.2
    new = tmp_path / "new.json"
    new.write_text(json.dumps(worse))
    diff = CliRunner().invoke(cli, ["compare", str(a), str(new), "--max-drop", "0.05"])
    assert diff.exit_code == 1, diff.output
    assert [ln for ln in diff.stdout.splitlines() if ln.startswith("regression: ")][0].startswith(
        "regression: clean accuracy: ")
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
    assert lines[:3] == [f"comparison: {html}", "protocol: none", f"leaderboard, best first ([1] {old_p}, [2] {new_p}):"]
    assert lines[-SUMMARY_LINES - 4:] == [
        f"note: no paired tests for [1] vs [2]: no predictions.npz beside [1] {old_p} (audit it with --save-predictions); "
        "significance falls back to CI overlap",
        *shown, f"... and {n - SUMMARY_LINES} more (all in {html})", "0 improvement(s) beyond 0.0",
        f"{n} regression(s) beyond 0.0"]
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


# --- two or more audits: leaderboard, baseline rule, protocols -----------------------------------------------

def _scores(mce_vs: float | None, rood: float, own: float) -> dict[str, Any]:
    """A robustness section with the literature scores as medaudit.scores.summarize_scores shapes them."""
    def est(v: float | None) -> dict[str, Any]:
        return {"value": v, "ci_low": None if v is None else v - 0.01, "ci_high": None if v is None else v + 0.01,
                "reason": None if v is not None else "needs a baseline model's audit"}
    return {"mce": {"accuracy": {"value": own, "mean_error_increase": 0.1, "n_perturbations": 2}},
            "mce_vs_baseline": {"score": "mce_vs_baseline", "metric": "accuracy", **est(mce_vs)},
            "rood_degradation": {"accuracy": {"score": "rood_degradation", "metric": "accuracy", **est(rood)},
                                 "ece": {"score": "rood_degradation", "metric": "ece", **est(rood / 10)}}}


def _three(base: dict[str, Any]) -> list[dict[str, Any]]:
    """A baseline, a better audit and a worse one of the same data."""
    a = copy.deepcopy(base)
    b = shift(shift(base, "clean", "accuracy", +0.005), "mri.noise@5", "accuracy", +0.05)
    c = shift(shift(base, "clean", "accuracy", -0.1), "clean", "ece", -0.005)
    for d, (vs, rood, own) in zip((a, b, c), ((1.0, 0.2, 0.9), (None, 0.1, 0.8), (0.7, 0.3, 1.1)), strict=True):
        d["robustness"].update(_scores(vs, rood, own))
    return [a, b, c]


def _write(tmp_path: Path, dicts: list[dict[str, Any]]) -> list[Path]:
    paths = []
    for i, d in enumerate(dicts):
        folder = tmp_path / f"audit{i}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(d))
        paths.append(folder / "results.json")
    return paths


def _board(boards: list[Any], kind: str, name: str, view: str) -> list[int]:
    b = next(b for b in boards if b.kind == kind and b.name == name and b.view == view)
    return [s.audit for s in b.standings]


def test_leaderboard_ranks_best_first(base: dict[str, Any]) -> None:
    boards = leaderboard(_three(base))
    perturbed = [s["id"] for s in base["scenarios"] if s["perturbation"]]
    assert _board(boards, "metric", "accuracy", "clean") == [1, 0, 2]  # higher is better
    assert _board(boards, "metric", "ece", "clean") == [2, 0, 1]  # lower is better; ties keep command-line order
    mean = next(b for b in boards if b.name == "accuracy" and b.view == f"mean of {len(perturbed)} perturbed")
    assert [s.audit for s in mean.standings] == [1, 0, 2]
    values = [s["metrics"]["accuracy"]["value"] for s in base["scenarios"] if s["perturbation"]]
    assert mean.standings[1].value == pytest.approx(sum(values) / len(values)) and mean.standings[1].ci_low is None
    worst = next(b for b in boards if b.name == "accuracy" and b.view == "worst perturbed")
    lowest = min(base["scenarios"][1:], key=lambda s: s["metrics"]["accuracy"]["value"])
    assert worst.standings[1].where == lowest["id"] and worst.standings[1].ci_low is not None
    # the headline metrics of a file without metric_info, in HEADLINE order, three views each
    assert [b.name for b in boards if b.kind == "metric"][::3] == ["accuracy", "balanced_accuracy", "auroc", "f1_macro",
                                                                   "ece", "brier", "nll"]
    # scores: lower is better; an undefined value ranks last with its reason
    assert _board(boards, "score", "mce", "accuracy") == [1, 0, 2]
    assert _board(boards, "score", "rood_degradation", "accuracy") == [1, 0, 2]
    assert _board(boards, "score", "rood_degradation", "ece") == [1, 0, 2]
    vs = next(b for b in boards if b.name == "mce_vs_baseline")
    assert vs.view == "accuracy" and [s.audit for s in vs.standings] == [2, 0, 1]
    assert vs.standings[-1].value is None and vs.standings[-1].where == "needs a baseline model's audit"
    assert not any(b.name in ("be", "rbe", "relative_mce_vs_baseline") for b in boards)  # in no audit: no board


def test_cli_three_audits_judge_every_audit_against_the_first(base: dict[str, Any], tmp_path: Path) -> None:
    a, b, c = _write(tmp_path, _three(base))
    html = tmp_path / "cmp.html"
    res = CliRunner().invoke(cli, ["compare", str(a), str(b), str(c), "-o", str(html)])
    assert res.exit_code == 1, res.output  # [3] regresses against [1]
    lines = res.stdout.splitlines()
    assert lines[:3] == [f"comparison: {html}", "protocol: none",
                         f"leaderboard, best first ([1] {a}, [2] {b}, [3] {c}):"]
    acc = next(ln for ln in lines if ln.startswith("  accuracy (higher is better): clean "))
    assert re.match(r"  accuracy \(higher is better\): clean \[2\] 0\.9933 \[[^]]+\], \[1\] 0\.9883 \[[^]]+\], "
                    r"\[3\] 0\.8883 \[[^]]+\] \| mean of 4 perturbed \[2\] ", acc)
    assert "  mce_vs_baseline accuracy (lower is better): [3] 0.7000 [0.6900, 0.7100], [1] 1.0000 [0.9900, 1.0100], " \
           "[2] undefined" in lines
    assert "  rood_degradation accuracy (lower is better): [2] 0.1000 [0.0900, 0.1100], [1] 0.2000 [0.1900, 0.2100], " \
           "[3] 0.3000 [0.2900, 0.3100]" in lines
    assert not any("rood_degradation ece" in ln for ln in lines)  # the console shows a per-metric score for the primary metric
    for k in (1, 2):  # neither has predictions.npz: both pairs fall back to CI overlap
        assert any(ln.startswith(f"note: no paired tests for [1] vs [{k + 1}]: no predictions.npz beside [1] {a}")
                   and ln.endswith("significance falls back to CI overlap") for ln in lines)
    i2 = lines.index(f"[2] {b} vs baseline [1]: 0 regression(s), 2 improvement(s) beyond 0.0")
    i3 = lines.index(f"[3] {c} vs baseline [1]: 1 regression(s), 1 improvement(s) beyond 0.0")
    assert i2 < i3 and lines[i3 + 1].startswith("  regression: clean accuracy: 0.9883 -> 0.8883 (worse by 0.1000")
    assert lines[-1] == "1 of 2 audit(s) regress against the baseline [1] beyond 0.0"
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "medaudit comparison of 3 audits" in page
    assert "Verdict: <strong>REGRESSION</strong> (1 of 2 audit(s)" in page and "Protocol: <strong>none</strong>" in page
    assert "<td>[2] 0.1000 [0.0900, 0.1100]</td>" in page and "falls back to CI overlap" in page
    assert "https://" not in page and "<script" not in page.lower()
    # the baseline rule: a tolerance larger than the drop, or a worse audit that is not compared, exits 0
    assert CliRunner().invoke(cli, ["compare", str(a), str(b), str(c), "--max-drop", "0.15"]).exit_code == 0
    assert CliRunner().invoke(cli, ["compare", str(a), str(b), str(a)]).exit_code == 0
    # …and every audit is judged against the first, not against its neighbour: c first makes a and b better
    assert CliRunner().invoke(cli, ["compare", str(c), str(a), str(b)]).exit_code == 1  # ece of c is the best
    assert CliRunner().invoke(cli, ["compare", str(c), str(a), str(b), "--max-drop", "0.01"]).exit_code == 0
    multi = compare_audits([a, b, c])
    assert multi.regressed == [2] and multi.has_regression and json.dumps(multi.to_dict())
    assert render_audits(multi) == render_audits(compare_audits([a, b, c]))  # deterministic


def test_cli_needs_two_audits(base: dict[str, Any], tmp_path: Path) -> None:
    (a,) = _write(tmp_path, [base])
    for args in ([], [str(a)]):
        res = CliRunner().invoke(cli, ["compare", *args])
        assert res.exit_code == 2 and "compare needs at least two results.json files (the first is the baseline), " \
                                      f"got {len(args)}" in res.output


PROTOCOL = {"name": "mri-v1", "version": 1, "sha256": "0123456789ab" + "cd" * 26, "conformant": True, "overrides": []}


@pytest.mark.parametrize("other", [
    None,
    {**PROTOCOL, "sha256": "fe" * 32},  # same name, other content
    {**PROTOCOL, "name": "mri-v2", "version": 2},
    {**PROTOCOL, "conformant": False, "overrides": ["audit.bootstrap 200 (protocol: 1000)"]},
])
def test_different_protocols_are_refused(base: dict[str, Any], tmp_path: Path, other: dict[str, Any] | None) -> None:
    first = copy.deepcopy(base)
    first["protocol"] = PROTOCOL
    second = copy.deepcopy(base)
    second["protocol"] = other
    a, b, c = _write(tmp_path, [first, copy.deepcopy(first), second])
    with pytest.raises(DifferentProtocols) as exc:
        compare_audits([a, c])
    assert isinstance(exc.value, IncomparableAudits)  # a DataError: exit 2
    for args in ([a, c], [a, b, c], [a, c, "--allow-different-data"]):  # no flag mixes protocols
        res = subprocess.run([sys.executable, "-m", "medaudit.cli", "compare", *map(str, args)],
                             capture_output=True, text=True)
        assert res.returncode == 2 and res.stdout == "", res.stdout
        msg = res.stderr.strip()
        assert "\n" not in msg and msg.startswith("medaudit: error: audits under different protocols are never compared: ")
        assert f"[1] {a} under protocol mri-v1 (sha256 0123456789ab), version 1" in msg
        third = len([x for x in args if x != "--allow-different-data"])
        if other is None:
            assert f"[{third}] {c} under no protocol" in msg
        else:
            assert f"[{third}] {c} under protocol {other['name']} (sha256 {other['sha256'][:12]}" in msg
        if other and not other["conformant"]:
            assert "not conformant (overridden: audit.bootstrap 200 (protocol: 1000))" in msg
        assert f"[2] {b}" not in msg  # the audit that shares the baseline's protocol is not named


def test_shared_protocol_is_stated(base: dict[str, Any], tmp_path: Path) -> None:
    first = copy.deepcopy(base)
    first["protocol"] = PROTOCOL
    a, b = _write(tmp_path, [first, first])
    html = tmp_path / "cmp.html"
    res = CliRunner().invoke(cli, ["compare", str(a), str(b), "-o", str(html)])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[1] == "protocol: mri-v1 (sha256 0123456789ab)"
    assert "Protocol: <strong>mri-v1 (sha256 0123456789ab)</strong> (both audits)" in html.read_text()


# --- paired tests on the predictions of two real audits ------------------------------------------------------

def _audit_with_predictions(model: Path, out: Path) -> Path:
    res = subprocess.run(
        [sys.executable, "-m", "medaudit.cli", "run", str(model), "--data", str(ROOT / "examples" / "mni-patches" / "test.npz"),
         "--config", str(ROOT / "examples" / "mni-patches.yaml"), "--out", str(out), "--quiet", "--threads", "1",
         "--perturbation", "intensity.gamma", "--severities", "5", "--bootstrap", "50", "--save-predictions"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    return out / "results.json"


@pytest.fixture(scope="module")
def paired_audits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The example model and a copy whose head favours the first class, both audited on the example's test set
    with their predictions saved."""
    import torch

    tmp = tmp_path_factory.mktemp("paired")
    with warnings.catch_warnings():  # the example model is TorchScript, which torch deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(ROOT / "examples" / "model.pt"))
        with torch.no_grad():
            dict(model.named_parameters())["classifier.2.bias"] += torch.tensor([1.5, 0.0, 0.0])
        torch.jit.save(model, str(tmp / "biased.pt"))
    return (_audit_with_predictions(ROOT / "examples" / "model.pt", tmp / "a"),
            _audit_with_predictions(tmp / "biased.pt", tmp / "b"))


def test_paired_tests_match_statsmodels(paired_audits: tuple[Path, Path], tmp_path: Path) -> None:
    sm_tables = pytest.importorskip("statsmodels.stats.contingency_tables")
    sm_multitest = pytest.importorskip("statsmodels.stats.multitest")
    from sklearn.metrics import roc_auc_score

    a, b = paired_audits
    result = compare_audits([a, b])
    (pairing,) = result.pairings
    assert pairing.paired and pairing.n_samples == 600 and pairing.n_resamples == 50
    with np.load(a.parent / "predictions.npz") as fa, np.load(b.parent / "predictions.npz") as fb:
        ids, labels = list(fa["scenario_ids"]), fa["labels"]
        probs_a, probs_b = fa["probs"], fb["probs"]
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    tests = {(t.scenario, t.name): t for t in pairing.tests}
    assert {t.scenario for t in pairing.tests} == set(ids) == {"clean", "intensity.gamma@5"}
    for i, sid in enumerate(ids):
        # McNemar: the exact test of statsmodels on the same correct/incorrect vectors
        ok_a, ok_b = probs_a[i].argmax(axis=1) == labels, probs_b[i].argmax(axis=1) == labels
        table = np.array([[np.sum(ok_a & ok_b), np.sum(ok_a & ~ok_b)], [np.sum(~ok_a & ok_b), np.sum(~ok_a & ~ok_b)]])
        acc = tests[(sid, "accuracy")]
        assert acc.method == "McNemar" and (acc.detail["b"], acc.detail["c"]) == (table[0, 1], table[1, 0])
        assert acc.p_value == pytest.approx(sm_tables.mcnemar(table, exact=True).pvalue, rel=1e-12)
        # every difference is the difference of what the two results files record (the same metric plugins)
        metrics_a = next(s for s in ra["scenarios"] if s["id"] == sid)["metrics"]
        metrics_b = next(s for s in rb["scenarios"] if s["id"] == sid)["metrics"]
        for key in ("accuracy", "balanced_accuracy", "f1_macro", "ece", "brier", "nll"):
            t = tests[(sid, key)]
            assert t.value_a == pytest.approx(metrics_a[key]["value"], abs=1e-9)
            assert t.difference == pytest.approx(metrics_b[key]["value"] - metrics_a[key]["value"], abs=1e-9)
            assert t.ci_low <= t.difference <= t.ci_high
            assert t.method == ("McNemar" if key == "accuracy" else "paired bootstrap")
        # DeLong one-vs-rest per class of a multiclass task, its AUCs scikit-learn's
        for c, name in enumerate(ra["config"]["task"]["classes"]):
            t = tests[(sid, f"auroc ({name} vs rest)")]
            assert t.method == "DeLong one-vs-rest" and t.metric == "auroc" and t.target == name
            assert t.value_a == pytest.approx(roc_auc_score(labels == c, probs_a[i][:, c]))
            assert t.value_b == pytest.approx(roc_auc_score(labels == c, probs_b[i][:, c]))
    # Holm over every p-value shown equals statsmodels'
    shown = [t for t in pairing.tests if t.p_value is not None]
    expected = sm_multitest.multipletests([t.p_value for t in shown], method="holm")[1]
    assert [t.p_adjusted for t in shown] == pytest.approx(list(expected), rel=1e-12)
    assert all(t.significant == (t.p_adjusted < 0.05) for t in shown)
    # a metric a paired test covers is significant by that test, not by CI overlap
    pair = result.pairs[0]
    for c in pair.changes:
        t = tests.get((c.scenario, c.metric))
        assert (c.paired is t) if t is not None else c.paired is None
        if t is not None:
            assert c.significant == t.significant
    assert any(c.paired and c.significant for c in pair.changes)  # McNemar under the perturbation
    assert any(n.startswith("Both audits ran on the same data and saved their predictions") for n in pair.notes)


def test_cli_paired_tests_and_fallback(paired_audits: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = paired_audits
    html = tmp_path / "cmp.html"
    res = CliRunner().invoke(cli, ["compare", str(a), str(b), "-o", str(html), "--max-drop", "0.01"])
    assert res.exit_code == 1, res.output  # the biased model is worse
    lines = res.stdout.splitlines()
    assert not any("no paired tests" in ln for ln in lines)
    head = next(i for i, ln in enumerate(lines) if ln.startswith("paired tests: "))
    n_tests, m, n_sig, m2 = map(int, re.fullmatch(
        r"paired tests: (\d+) comparison\(s\), (\d+) with a p-value, (\d+) significant after Holm's correction over "
        r"those (\d+) \(alpha 0\.05\); significant first:", lines[head]).groups())  # type: ignore[union-attr]
    assert n_tests == 2 * 9 and 0 < n_sig < SUMMARY_LINES and m == m2 <= n_tests  # 2 scenarios x (6 + 3 classes)
    listed = lines[head + 1:head + 1 + SUMMARY_LINES]
    assert all(ln.endswith(", significant)") for ln in listed[:n_sig])
    assert all(not ln.endswith(", significant)") for ln in listed[n_sig:])
    assert lines[head + 1 + SUMMARY_LINES] == f"  ... and {n_tests - SUMMARY_LINES} more (all in {html})"
    # with 50 resamples and this many tests no paired bootstrap alone can reach significance after Holm: said so
    assert any(ln.startswith("note: with 50 bootstrap resamples the smallest paired-bootstrap p-value is 2/(1 + 50)")
               for ln in lines)
    page = html.read_text()
    paired = page[page.index('id="paired"'):page.index('id="regressions"')]
    assert paired.count("<tr") == n_tests + 1 and paired.count('<tr class="drop">') == n_sig  # every test listed
    assert "McNemar" in paired and "DeLong one-vs-rest" in paired and "paired bootstrap" in paired
    # the same audits without their predictions: no paired tests, and the comparison says so
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "results.json").write_bytes(b.read_bytes())
    html2 = tmp_path / "cmp2.html"
    res = CliRunner().invoke(cli, ["compare", str(a), str(alone / "results.json"), "-o", str(html2)])
    note = (f"note: no paired tests for [1] vs [2]: no predictions.npz beside [2] {alone / 'results.json'} (audit it "
            "with --save-predictions); significance falls back to CI overlap")
    assert note in res.stdout.splitlines() and "paired tests: " not in res.stdout
    page = html2.read_text()
    assert "no paired tests (no predictions.npz beside [2]" in page and "falls back to CI overlap" in page
    assert "No paired test ran: significance falls back to CI overlap" in page


def test_pairing_is_refused_with_a_reason(paired_audits: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = paired_audits
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    pred_a, pred_b = a.parent / "predictions.npz", b.parent / "predictions.npz"
    # predictions that are not the ones the results were computed from
    stale = paired_comparison(ra, rb, pred_a, pred_a, labels=("A", "B"))
    assert not stale.paired and stale.reason.startswith("the predictions.npz beside B do not reproduce its results.json")
    # other samples, or the same samples in another order, or other labels
    with np.load(pred_b) as f:
        arrays = {k: f[k] for k in f.files}
    shuffled = tmp_path / "shuffled.npz"
    np.savez(shuffled, **{**arrays, "sample_ids": arrays["sample_ids"][::-1]})
    why = paired_comparison(ra, rb, pred_a, shuffled, labels=("A", "B")).reason
    assert why.startswith("different samples or another order: sample_ids differ at 600 position(s), the first at 0")
    fewer = tmp_path / "fewer.npz"
    np.savez(fewer, **{**arrays, "sample_ids": arrays["sample_ids"][:10]})
    assert paired_comparison(ra, rb, pred_a, fewer, labels=("A", "B")).reason == \
        "different samples: A saved 600 predictions, B 10"
    relabelled = tmp_path / "relabelled.npz"
    np.savez(relabelled, **{**arrays, "labels": (arrays["labels"] + 1) % 3})
    assert paired_comparison(ra, rb, pred_a, relabelled, labels=("A", "B")).reason == \
        "the same samples with different labels (600 of 600 differ)"
    assert paired_comparison(ra, rb, pred_a, None, labels=("A", "B")).reason == \
        "no predictions.npz beside B (audit it with --save-predictions)"


def _binary_audit(tmp_path: Path, name: str, probs: np.ndarray, labels: np.ndarray) -> tuple[dict[str, Any], Path]:
    """A results dict of a binary task whose metrics are the plugins' on ``probs`` ``[S, N, 2]``, and its predictions."""
    import torch

    from medaudit.bootstrap import evaluate
    from medaudit.compare import _metric_setup

    results: dict[str, Any] = {
        "seed": 0, "config": {"task": {"type": "binary", "classes": ["healthy", "lesion"]},
                              "audit": {"bootstrap": 200, "confidence": 0.95}}}
    metrics, ctx, _ = _metric_setup(results)
    ones = torch.ones(1, labels.shape[0])
    scenarios = []
    for sid, p in zip(("clean", "noise@5"), probs, strict=True):
        est = evaluate(metrics, torch.from_numpy(p), torch.from_numpy(labels), ones, ctx)[0]
        scenarios.append({"id": sid, "metrics": est})
    results.update(scenarios=scenarios, metric_directions={m: True for m in ("accuracy", "balanced_accuracy", "auroc",
                                                                             "f1_macro")} | {"ece": False, "brier": False,
                                                                                             "nll": False})
    path = tmp_path / f"{name}.npz"
    np.savez(path, scenario_ids=np.array(["clean", "noise@5"]), sample_ids=np.array([f"s{i}" for i in range(labels.size)]),
             probs=probs, labels=labels)
    return results, path


def test_binary_pairs_get_one_delong_test_and_mcnemar_at_the_threshold(tmp_path: Path) -> None:
    from medaudit.paired import delong, mcnemar

    rng = np.random.default_rng(5)
    n = 300
    labels = rng.integers(0, 2, size=n)
    score_a = np.clip(labels * 0.3 + rng.random(n) * 0.7, 0, 1)
    score_b = np.clip(labels * 0.5 + rng.random(n) * 0.5, 0, 1)
    as_probs = lambda s: np.stack([np.stack([1 - s, s], axis=1)] * 2).astype(np.float32)  # noqa: E731
    ra, pa = _binary_audit(tmp_path, "a", as_probs(score_a), labels)
    rb, pb = _binary_audit(tmp_path, "b", as_probs(score_b), labels)
    pairing = paired_comparison(ra, rb, pa, pb)
    assert pairing.paired and pairing.n_resamples == 200
    clean = {t.name: t for t in pairing.tests if t.scenario == "clean"}
    assert set(clean) == {"accuracy", "balanced_accuracy", "auroc", "f1_macro", "ece", "brier", "nll"}
    sa, sb = as_probs(score_a)[0][:, 1].astype(np.float64), as_probs(score_b)[0][:, 1].astype(np.float64)
    ref = delong(sa, sb, labels == 1)
    assert clean["auroc"].method == "DeLong" and clean["auroc"].p_value == pytest.approx(ref["p_value"])
    half_width = 1.959963984540054 * ref["se"]
    assert (clean["auroc"].ci_low, clean["auroc"].ci_high) == pytest.approx((ref["difference"] - half_width,
                                                                             ref["difference"] + half_width))
    # a binary prediction is p_1 >= task.threshold (0.5), as the classification metrics define it
    mc = mcnemar((sa >= 0.5) == labels, (sb >= 0.5) == labels)
    assert clean["accuracy"].p_value == mc["p_value"] and clean["accuracy"].method == "McNemar"
    # the other audit's own threshold is stated: both models are measured as the baseline defines the metrics
    rb["config"]["task"]["threshold"] = 0.3
    assert paired_comparison(ra, rb, pa, pb).notes == [
        "the metrics of both models are computed as [1] configured them (threshold 0.5 vs 0.3): the paired differences "
        "use one definition, and need not equal the difference of the two results files"]


def test_paired_bootstrap_on_given_weights_is_the_drawn_bootstrap() -> None:
    # the weight rows of the index sets paired_bootstrap draws from a seed give the same difference, interval and
    # (share) p-value with a weighted metric: the form medaudit compare evaluates the audit's metric plugins in
    rng = np.random.default_rng(0)
    n, r = 120, 300
    y = rng.integers(0, 2, size=n)
    a = np.eye(2)[np.where(rng.random(n) < 0.3, 1 - y, y)]
    b = np.eye(2)[np.where(rng.random(n) < 0.2, 1 - y, y)]

    def accuracy(p: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(p.argmax(axis=1) == labels))

    def weighted_accuracy(p: np.ndarray, labels: np.ndarray, w: np.ndarray) -> np.ndarray:
        return w @ (p.argmax(axis=1) == labels) / w.sum(axis=1)

    weights = bootstrap_weights(n, r, 7).numpy().astype(np.float64)  # the resamples paired_bootstrap draws for seed 7
    drawn = paired_bootstrap(accuracy, a, b, y, n_resamples=r, seed=7)
    given = paired_bootstrap(weighted_accuracy, a, b, y, weights=weights)
    assert given.keys() == drawn.keys()
    for key in ("difference", "ci_low", "ci_high", "p_value"):
        assert given[key] == pytest.approx(drawn[key], abs=1e-12)
    assert given["n_used"] == drawn["n_used"] == r
    with pytest.raises(ValueError, match="either weights"):
        paired_bootstrap(weighted_accuracy, a, b, y, n_resamples=r, weights=weights)
    with pytest.raises(ValueError, match="row 0"):
        paired_bootstrap(weighted_accuracy, a, b, y, weights=weights[1:])
    with pytest.raises(ValueError, match=r"shape \(1 \+ R, 120\)"):
        paired_bootstrap(weighted_accuracy, a, b, y, weights=weights[:, :5])
    with pytest.raises(ValueError, match="one value per weight row"):
        paired_bootstrap(lambda p, labels, w: np.zeros(3), a, b, y, weights=weights)


def test_monte_carlo_p_counts_the_data_as_a_resample() -> None:
    assert monte_carlo_p(0.0, 50) == pytest.approx(2 / 51)
    assert monte_carlo_p(2 * 5 / 100, 100) == pytest.approx(2 * 6 / 101)
    assert monte_carlo_p(1.0, 100) == 1.0 and monte_carlo_p(None, 0) is None


def test_three_audits_refuse_other_data_naming_the_pair(base: dict[str, Any], tmp_path: Path) -> None:
    other = copy.deepcopy(base)
    other["dataset"].update(sha256="ab" * 32, path="/elsewhere/other.npz")
    a, b, c = _write(tmp_path, [base, base, other])
    res = CliRunner().invoke(cli, ["compare", str(a), str(b), str(c)])
    assert res.exit_code == 2
    assert (f"medaudit: error: [1] {a} and [3] {c} are not comparable: different data: [1] {base['dataset']['path']} "
            "(SHA-256 e2c7f627f089), [3] /elsewhere/other.npz (SHA-256 abababababab); pass --allow-different-data") \
        in res.output
    res = CliRunner().invoke(cli, ["compare", str(a), str(b), str(c), "--allow-different-data"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0].startswith("warning: [1] vs [3]: different data: [1] ")


def test_leaderboard_places_are_english_ordinals() -> None:
    from medaudit.compare import _ordinal

    assert [_ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "101st", "111th"]
