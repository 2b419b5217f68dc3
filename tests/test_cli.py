"""End to end through the CLI on the bundled example: outputs, schema, checks, exit codes, atomicity."""

from __future__ import annotations

from html import unescape as html_unescape

import json
import os
import re
import signal
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

import medaudit.cli
from medaudit.cli import cli
from medaudit.hookspecs import hookimpl
from medaudit.plugins.intensity import Gamma
from medaudit.results import SCHEMA_PATH, VOLATILE_KEYS, json_schema
from medaudit.checks import PLAIN  # a plain check's (empty) non-inferiority fields

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "model.pt"
DATA = ROOT / "examples" / "mni-patches" / "test.npz"
CONFIG = ROOT / "examples" / "mni-patches.yaml"
FAST = ["--perturbation", "intensity.gamma", "--perturbation", "mri.noise", "--severities", "1,5", "--bootstrap", "100"]


def run(args: list[str], cwd: Path | None = None) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "medaudit.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=cwd)


@pytest.fixture(scope="module")
def audit_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "out"
    res = run(["run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(out), "--quiet",
               "--save-predictions", "--fail-on", "clean.accuracy<0.5", "--junit", str(out.parent / "junit.xml"), *FAST])
    assert res.returncode == 0, res.stderr
    assert f"report:  {out / 'report.html'}" in res.stdout
    return out


def test_outputs_written(audit_out: Path) -> None:
    assert sorted(p.name for p in audit_out.iterdir()) == ["predictions.npz", "report.html", "results.json", "tables"]
    assert (audit_out / "tables" / "robustness-scenarios.csv").is_file()
    assert not list(audit_out.parent.glob(".out.partial-*"))


def test_results_match_schema_and_contract(audit_out: Path) -> None:
    results = json.loads((audit_out / "results.json").read_text())
    jsonschema.validate(results, json.loads(SCHEMA_PATH.read_text()))
    assert results["schema_version"] == "1.0"
    assert [s["id"] for s in results["scenarios"]] == [
        "clean", "intensity.gamma@1", "intensity.gamma@5", "mri.noise@1", "mri.noise@5"]
    clean = results["scenarios"][0]
    assert clean["n_samples"] == 600
    acc = clean["metrics"]["accuracy"]
    assert acc["ci_low"] <= acc["value"] <= acc["ci_high"]
    assert results["model"]["format"] == "torchscript"
    assert len(results["model"]["sha256"]) == 64
    assert results["dataset"]["class_counts"] == {"csf_other": 200, "grey_matter": 200, "white_matter": 200}
    # the config file's check comes first, then --fail-on's
    assert results["checks"] == [
        {"expr": "clean.accuracy<0.9", "value": acc["value"], "passed": True, "threshold": 0.9, "error": None,
         "scenario": "clean", **PLAIN},
        {"expr": "clean.accuracy<0.5", "value": acc["value"], "passed": True, "threshold": 0.5, "error": None,
         "scenario": "clean", **PLAIN}]
    assert results["config_path"] == str(CONFIG)
    assert "intensity" in results["environment"]["plugins"]
    # every catalogue entry names the plugin that provides it
    assert {p["name"]: p["plugin"] for p in results["perturbation_catalogue"]} == {
        "intensity.gamma": "intensity", "mri.noise": "mri"}
    # a CPU run of a convolutional model: channels-last by default (audit.channels_last: auto)
    assert results["environment"]["memory_format"] == "channels_last"
    assert "fp32, channels-last memory format" in (audit_out / "report.html").read_text()


def test_predictions_npz(audit_out: Path) -> None:
    with np.load(audit_out / "predictions.npz", allow_pickle=False) as d:
        assert d["probs"].shape == (5, 600, 3)
        assert list(d["scenario_ids"]) == ["clean", "intensity.gamma@1", "intensity.gamma@5", "mri.noise@1", "mri.noise@5"]
        assert d["labels"].shape == (600,)
        assert d["sample_ids"].shape == (600,)
        np.testing.assert_allclose(d["probs"].sum(-1), 1.0, atol=1e-5)
        results = json.loads((audit_out / "results.json").read_text())
        acc = (d["probs"][0].argmax(1) == d["labels"]).mean()
        assert abs(acc - results["scenarios"][0]["metrics"]["accuracy"]["value"]) < 1e-9


def test_junit(audit_out: Path) -> None:
    xml = (audit_out.parent / "junit.xml").read_text()
    assert 'tests="2" failures="0"' in xml and 'name="clean.accuracy&lt;0.5"' in xml


def test_same_seed_same_results_whatever_batch_size(audit_out: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    res = run(["run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(out), "--quiet",
               "--batch-size", "37", "--fail-on", "clean.accuracy<0.5", *FAST])
    assert res.returncode == 0, res.stderr
    a = json.loads((audit_out / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    for key in VOLATILE_KEYS:
        a.pop(key), b.pop(key)
    a["config"]["audit"].pop("batch_size"), b["config"]["audit"].pop("batch_size")
    a["config"]["output"].pop("dir"), b["config"]["output"].pop("dir")
    a["config"]["output"].pop("save_predictions"), b["config"]["output"].pop("save_predictions")
    for s in a["scenarios"] + b["scenarios"]:
        s.pop("throughput")
    assert a == b


def test_failed_check_exits_1(tmp_path: Path) -> None:
    res = run(["run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(tmp_path / "o"),
               "--quiet", "--perturbation", "intensity.gamma", "--severities", "5", "--bootstrap", "0",
               "--fail-on", "clean.accuracy>0.5"])
    assert res.returncode == 1
    # the value to 4 significant digits and the failure condition apart: "FAIL clean.accuracy>0.5"
    # alone read as if accuracy were above 0.5 and wrong
    assert "PASS clean.accuracy = 0.9883 (fails if < 0.9)\nFAIL clean.accuracy = 0.9883 (fails if > 0.5)\n" in res.stdout
    assert (tmp_path / "o" / "report.html").exists()  # the report is still written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fail-on", "clean.accuracy<<0.5"], "not a check"),
        (["--fail-on", "nosuch.accuracy<0.5"], "names no scenario"),
        # misspelt names are found before the first forward pass, not after the whole audit
        (["--fail-on", "clean.acuracy<0.5"], "no metric 'acuracy' in this audit; metrics are: "),
        (["--fail-on", "*.drop.sensitivity/grey_mater>0.1"], "no metric 'sensitivity/grey_mater'"),
        (["--fail-on", "*.ood.mahalanobs.auroc<0.5"], "no detector 'mahalanobs' runs in this audit"),
        (["--fail-on", "subgroup.sex.accuracy_gap>0.1"], "'sex' is not a metadata column of the data; columns are: "
                                                          "hemisphere, level, voxel"),
        (["--subgroup", "sex"], "--subgroup sex: not a metadata column of"),
        (["--suite", "nosuchsuite"], "unknown suite"),
        (["--severities", "7"], "audit.severities"),
        (["--device", "tpu"], "audit.device"),
    ],
)
def test_usage_errors_exit_2_and_leave_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "o"
    res = run(["run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(out), "--quiet",
               "--perturbation", "intensity.gamma", "--severities", "1", "--bootstrap", "0", *args]
              if "--severities" not in args else
              ["run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(out), "--quiet", *args])
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_model_and_data(tmp_path: Path) -> None:
    res = run(["run", str(tmp_path / "nope.pt"), "--data", str(DATA), "--out", str(tmp_path / "o")])
    assert res.returncode == 2 and "nope.pt does not exist" in res.stderr
    res = run(["run", str(MODEL), "--data", str(tmp_path / "nodata.npz"), "--out", str(tmp_path / "o")])
    assert res.returncode == 2 and "nodata.npz does not exist" in res.stderr
    assert not (tmp_path / "o").exists()


def test_debug_shows_traceback(tmp_path: Path) -> None:
    res = run(["--debug", "run", str(tmp_path / "nope.pt"), "--data", str(DATA)])
    assert res.returncode == 2 and "Traceback" in res.stderr


def test_report_rerender_round_trip(audit_out: Path, tmp_path: Path) -> None:
    target = tmp_path / "again.html"
    result = CliRunner().invoke(cli, ["report", str(audit_out / "results.json"), "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_text() == (audit_out / "report.html").read_text()


def test_report_rejects_non_results(tmp_path: Path) -> None:
    bad = tmp_path / "r.json"
    bad.write_text('{"hello": 1}')
    result = CliRunner().invoke(cli, ["report", str(bad)])
    assert result.exit_code == 2 and "not a medaudit results file" in result.output


def test_shipped_schema_is_current() -> None:
    assert json.loads(SCHEMA_PATH.read_text()) == json_schema(), "run `python -m medaudit.results` to regenerate"


def test_init_and_config_schema(tmp_path: Path) -> None:
    runner = CliRunner()
    target = tmp_path / "m.yaml"
    assert runner.invoke(cli, ["init", str(target)]).exit_code == 0
    again = runner.invoke(cli, ["init", str(target)])
    assert again.exit_code == 2 and "already exists" in again.output
    schema = json.loads(runner.invoke(cli, ["config-schema"]).output)
    assert "audit" in schema["properties"]


def test_plugins_and_perturbations_listing() -> None:
    runner = CliRunner()
    listing = json.loads(runner.invoke(cli, ["plugins", "--json"]).output)
    by_name = {p["name"]: p for p in listing["plugins"]}
    assert by_name["intensity"]["distribution"] == "medaudit"
    assert "intensity.gamma" in by_name["intensity"]["contributes"]["perturbations"]
    assert by_name["intensity"]["api_version"] == 1
    perts = json.loads(runner.invoke(cli, ["perturbations", "--json"]).output)
    gamma = next(p for p in perts if p["name"] == "intensity.gamma")
    assert gamma["suite"] == "intensity" and set(gamma["severities"]) == {"1", "2", "3", "4", "5"}
    assert gamma["plugin"] == "intensity"
    assert listing["warnings"] == []  # the built-ins have no load problems and keep to their suites
    text = runner.invoke(cli, ["perturbations"]).stdout
    assert next(line for line in text.splitlines() if line.startswith("intensity.gamma ")).endswith("[plugin intensity]")


class _Sloppy:
    @hookimpl
    def medaudit_perturbations(self):  # type: ignore[no-untyped-def]
        class Zipper(Gamma):
            name = "mri.zipper"
            suite = "mri"
        return [Zipper]

    def medaudit_metrics(self, config):  # type: ignore[no-untyped-def]  # @hookimpl forgotten
        return []


def test_plugins_and_perturbations_show_load_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    real = medaudit.cli.get_plugin_manager
    monkeypatch.setattr(medaudit.cli, "get_plugin_manager", lambda **kw: real(extra=[("sloppy", _Sloppy())], **kw))
    runner = CliRunner()
    unmarked = ('plugin "sloppy" (from (local)): function "medaudit_metrics" is not decorated with @medaudit.hookimpl; '
                "it is never called")
    joins = 'perturbation "mri.zipper" of plugin "sloppy" joins suite "mri" of plugin "mri"'
    listing = runner.invoke(cli, ["plugins", "--json"])
    assert [w[:len(joins)] if w.startswith("perturbation") else w for w in json.loads(listing.stdout)["warnings"]] == [
        unmarked, joins]
    text = runner.invoke(cli, ["plugins"]).stdout
    assert f"WARNING {unmarked}" in text and f"WARNING {joins}" in text
    perts = runner.invoke(cli, ["perturbations", "--json"])
    assert perts.exit_code == 0 and f"medaudit: warning: {joins}" in perts.stderr
    assert next(p for p in json.loads(perts.stdout) if p["name"] == "mri.zipper")["plugin"] == "sloppy"


def test_ood_data_reference_and_subgroups(tmp_path: Path) -> None:
    # A second set: the same patches inverted (a plainly shifted "other contrast" set) as external OOD data.
    with np.load(DATA) as d:
        images, labels = d["images"], d["labels"]
    ood = tmp_path / "inverted.npz"
    np.savez(ood, images=(255 - images[:200]), labels=labels[:200])
    ref = tmp_path / "reference.npz"
    np.savez(ref, images=images[::2], labels=labels[::2])
    config = tmp_path / "no-subgroups.yaml"
    config.write_text(CONFIG.read_text().replace("attributes: [hemisphere, level]", "attributes: []"))
    out = tmp_path / "o"
    res = run(["run", str(MODEL), "--data", str(DATA), "--config", str(config), "--out", str(out),
               "--perturbation", "intensity.gamma", "--severities", "5", "--bootstrap", "50",
               "--ood-data", str(ood), "--reference", str(ref), "--subgroup", "hemisphere",
               "--save-predictions", "--fail-on", "ood:inverted.ood.mahalanobis.auroc<0.9"])
    assert res.returncode == 0, res.stdout + res.stderr
    results = json.loads((out / "results.json").read_text())
    # one scenario count: the console's is the report's (results.json scenarios, the external set included)
    assert len(results["scenarios"]) == 3
    assert "3 scenarios (clean, 1 perturbed from 1 perturbation, 1 external OOD set) of 600 samples" in res.stderr
    ext = next(s for s in results["scenarios"] if s["id"] == "ood:inverted")
    assert ext["n_samples"] == 200 and ext["metrics"] == {}
    assert ext["ood"]["mahalanobis"]["auroc"]["value"] > 0.9  # inverted contrast is far from the reference
    assert results["analyses"]["ood_fitting"]["method"] == "reference"
    assert results["analyses"]["ood_fitting"]["reference"]["n_samples"] == 300
    assert {g["attribute"] for g in results["subgroups"]} == {"hemisphere"}  # from --subgroup alone
    with np.load(out / "predictions.npz", allow_pickle=False) as d:
        assert d["ood_mahalanobis"].shape == (2, 600)
        assert d["external_inverted_ood_mahalanobis"].shape == (200,)
        assert d["external_inverted_probs"].shape == (200, 3)
        keys = set(d.files)
    # the README lists every key predictions.npz holds, as a pattern
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    documented = {"scenario_ids": r"scenario_ids", "labels": r"labels", "sample_ids": r"sample_ids", "probs": r"probs",
                  "`ood_<detector>`": r"ood_\w+", "`external_NAME_probs`": r"external_inverted_probs",
                  "`external_NAME_ood_<detector>`": r"external_inverted_ood_\w+"}
    section = readme[readme.index("`predictions.npz` holds"):]
    section = section[:section.index("\n\n")]
    for name, pattern in documented.items():
        assert name in section
    assert all(any(re.fullmatch(p, k) for p in documented.values()) for k in keys), keys


def test_compare_exits_1_on_regression(audit_out: Path, tmp_path: Path) -> None:
    results = json.loads((audit_out / "results.json").read_text())
    worse = json.loads(json.dumps(results))
    worse["scenarios"][0]["metrics"]["accuracy"]["value"] -= 0.2
    new = tmp_path / "new.json"
    new.write_text(json.dumps(worse))
    same = CliRunner().invoke(cli, ["compare", str(audit_out / "results.json"), str(audit_out / "results.json")])
    assert same.exit_code == 0, same.output
    diff = CliRunner().invoke(cli, ["compare", str(audit_out / "results.json"), str(new), "--max-drop", "0.05",
                                    "-o", str(tmp_path / "cmp.html")])
    assert diff.exit_code == 1
    assert "regression: clean accuracy" in diff.output
    assert (tmp_path / "cmp.html").read_text().startswith("<!DOCTYPE html>")


def test_perturb_and_preview_commands(tmp_path: Path) -> None:
    with np.load(DATA) as d:
        image = d["images"][0].astype(np.float32)
    src = tmp_path / "in.npy"
    np.save(src, image)
    out = tmp_path / "out.npy"
    runner = CliRunner()
    res = runner.invoke(cli, ["perturb", str(src), "-p", "mri.motion", "-s", "3", "--seed", "1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    moved = np.load(out)
    assert moved.shape == image.shape and not np.allclose(moved, image)
    again = tmp_path / "again.npy"
    runner.invoke(cli, ["perturb", str(src), "-p", "mri.motion", "-s", "3", "--seed", "1", "-o", str(again)])
    np.testing.assert_array_equal(np.load(again), moved)  # the seed fixes the corruption
    bad = runner.invoke(cli, ["perturb", str(src), "-p", "mri.nosuch", "-s", "3", "-o", str(out)])
    assert bad.exit_code == 2 and "unknown perturbation 'mri.nosuch'" in bad.output
    grid = tmp_path / "grid.png"
    res = runner.invoke(cli, ["preview", "--data", str(DATA), "--config", str(CONFIG), "--perturbation", "mri.noise",
                              "--perturbation", "intensity.gamma", "-o", str(grid)])
    assert res.exit_code == 0, res.output
    from PIL import Image

    with Image.open(grid) as im:
        assert im.width > im.height  # two rows, six columns


def test_new_plugin_command(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["new-plugin", "medaudit-hospital-artifacts", "--dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    root = tmp_path / "medaudit-hospital-artifacts"
    assert (root / "pyproject.toml").exists()
    again = runner.invoke(cli, ["new-plugin", "medaudit-hospital-artifacts", "--dir", str(tmp_path)])
    assert again.exit_code == 2 and "exists" in again.output


def test_resume_after_interruption_gives_identical_results(tmp_path: Path) -> None:
    from medaudit.audit import run_audit
    from medaudit.config import load_config
    from medaudit.plugin_manager import get_plugin_manager
    from medaudit.runner import executor as runner_mod  # where the local executor calls the shard loop

    out = tmp_path / "o"
    overrides = {"output.dir": str(out), "audit.suites": [], "audit.perturbations": ["intensity.gamma"],
                 "audit.severities": [2], "audit.bootstrap": 20, "audit.shard_size": 256}
    pm = get_plugin_manager(warn=lambda m: None)
    full = run_audit(pm, MODEL, DATA, load_config(CONFIG, overrides), command="x")
    original = runner_mod.run_shard
    calls = {"n": 0}

    def crash_on_third(*args, **kwargs):  # noqa: ANN002, ANN003
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    runner_mod.run_shard = crash_on_third
    try:
        with pytest.raises(KeyboardInterrupt) as interrupted:
            run_audit(pm, MODEL, DATA, load_config(CONFIG, overrides), command="x")
    finally:
        runner_mod.run_shard = original
    cached = list((out / ".medaudit-cache").rglob("shard-*.npz"))
    assert len(cached) == 2  # two of three shards finished before the interruption
    assert str(interrupted.value) == (f"interrupted; 2 completed shard(s) are cached in {cached[0].parent}: run again "
                                      "with --resume to continue")
    resumed = run_audit(pm, MODEL, DATA, load_config(CONFIG, overrides), command="x", resume=True)
    a, b = full.model_dump(mode="json"), resumed.model_dump(mode="json")
    for key in VOLATILE_KEYS:
        a.pop(key), b.pop(key)
    for s in a["scenarios"] + b["scenarios"]:
        s.pop("throughput")
    assert a == b
    assert not (out / ".medaudit-cache").exists()  # removed after success


def test_entry_point_fast_exit_keeps_exit_code_output_and_every_atexit_handler() -> None:
    # main() ends the process with os._exit after Python's exit work; a command's exit code, its
    # buffered output (more than a pipe holds) and atexit handlers it registered must survive that.
    script = (
        "import atexit, sys\n"
        "import medaudit.cli as c\n"
        "atexit.register(lambda: print('import-time handler ran'))\n"  # as torch, logging, multiprocessing do
        "@c.cli.command('late')\n"
        "def late():\n"
        "    atexit.register(lambda: print('late handler ran'))\n"
        "    print('x' * 200000)\n"
        "    sys.exit(5)\n"
        "sys.argv = ['medaudit', 'late']\n"
        "c.main()\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 5, res.stderr
    assert res.stdout == "x" * 200000 + "\nlate handler ran\nimport-time handler ran\n"
    # An exception escaping a command is not a recorded exit: the usual exit (traceback, code 1).
    crash = script.replace("sys.exit(5)", "raise RuntimeError('boom')")
    res = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True)
    assert res.returncode == 1 and "RuntimeError: boom" in res.stderr and res.stdout.endswith("late handler ran\nimport-time handler ran\n")


def test_resume_fingerprint_separates_device_kinds_and_memory_format_settings() -> None:
    # Outputs differ in the last bits between device kinds and memory formats: shards of one must
    # not be resumed into an audit run with another.
    import dataclasses

    import torch

    from medaudit.audit import cache_fingerprint, prepare
    from medaudit.config import load_config
    from medaudit.plugin_manager import get_plugin_manager

    prep = prepare(get_plugin_manager(warn=lambda m: None), MODEL, DATA, load_config(CONFIG))
    base = cache_fingerprint(prep, 2048)
    assert cache_fingerprint(prep, 2048) == base
    assert cache_fingerprint(dataclasses.replace(prep, device=torch.device("cuda")), 2048) != base
    prep.config.audit.channels_last = False
    assert cache_fingerprint(prep, 2048) != base


def test_threads_option_applies_to_the_audit_only_and_is_recorded(tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    want = before + 1  # differs from the process's setting, whatever the machine
    seen: list[int] = []
    from medaudit import evaluate

    original = evaluate.evaluate_detectors

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    evaluate.evaluate_detectors = spy
    try:
        res = CliRunner().invoke(cli, ["run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out",
                                       str(tmp_path / "o"), "--quiet", "--threads", str(want), "--fail-on",
                                       "clean.accuracy<0.5", *FAST])
    finally:
        evaluate.evaluate_detectors = original
    assert res.exit_code == 0, res.output
    assert seen == [want] and torch.get_num_threads() == before  # set for the audit, restored after it
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["environment"]["threads"] == want and results["config"]["audit"]["threads"] == want
    assert f"{want} CPU threads" in (tmp_path / "o" / "report.html").read_text()
    bad = run(["run", str(MODEL), "--data", str(DATA), "--config", str(CONFIG), "--out", str(tmp_path / "b"),
               "--threads", "0"])
    assert bad.returncode == 2 and "audit.threads" in bad.stderr and not (tmp_path / "b").exists()


def test_a_closed_pipe_ends_quietly() -> None:
    # `medaudit perturbations | head`: the reader is gone before medaudit writes
    res = subprocess.run(f"{shlex.quote(sys.executable)} -m medaudit.cli perturbations | true; "
                         "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True, text=True)
    assert res.returncode == 141, res.stderr  # 128 + SIGPIPE, as Unix tools end
    assert "error" not in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_report_written_alone_gets_the_usual_file_mode(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text((Path(__file__).parent / "fixtures" / "results-small.json").read_text())
    out = tmp_path / "alone.html"
    res = run(["report", str(results), "-o", str(out)])
    assert res.returncode == 0, res.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # 0644 under the usual umask, not mkstemp's 0600


def test_a_model_at_chance_is_loud_everywhere(tmp_path: Path) -> None:
    # the example model given the wrong input spec (no config: min-max scaling, mean 0 / std 1)
    # scores 1/3 on three balanced classes; the audit must not read as reassuring evidence
    out = tmp_path / "out"
    res = run(["run", str(ROOT / "examples" / "model.pt"), "--data", str(ROOT / "examples" / "mni-patches" / "test.npz"),
               "--out", str(out), "--suite", "intensity", "--severities", "3", "--bootstrap", "20", "--quiet"])
    assert res.returncode == 0, res.stderr
    assert "warning: the model is near chance on the clean data: balanced accuracy 0.333" in res.stderr
    assert "verdict: ALERT: THE AUDIT MAY NOT BE MEANINGFUL" in res.stdout
    results = json.loads((out / "results.json").read_text())
    # the preprocessing probe's alert comes too (tests/test_sanity.py)
    assert sorted(w["code"] for w in results["warning_records"] if w["alert"]) == ["near-chance", "preprocessing-suspect"]
    [alert] = [w for w in results["warning_records"] if w["code"] == "near-chance"]
    assert alert["plugin"] == "classification" and alert["scenario"] == "clean"
    html = (out / "report.html").read_text()
    summary = html[html.index('<section id="summary">'):html.index('<section id="identity">')]
    assert 'role="alert"' in summary and "near chance on the clean data" in summary
    assert summary.index('role="alert"') < summary.index("Verdict:")  # above the verdict, first thing read
    # and the verdict is not a pass, even with no check failing: the evidence itself is in doubt
    assert results["verdict"]["status"] == "alert" and results["verdict"]["alerts"] == 2
    assert 'class="verdict verdict-alert">Verdict: <strong>ALERT: THE AUDIT MAY NOT BE MEANINGFUL' in summary
    # no drop can be "significant" at chance: the old reassuring finding must not be the headline
    assert "No perturbation caused a statistically significant drop" not in summary.split("Key findings")[0]
    # nor does the OOD section recommend a detector ranked by the broken audit's errors
    rec = results["ood_recommendation"]
    assert rec is not None and rec["withheld"] and rec["detector"] is None
    assert rec["statement"] in html_unescape(html)


def test_run_reads_medaudit_yaml_in_the_working_directory_and_says_which_config(tmp_path: Path) -> None:
    # `medaudit init` writes ./medaudit.yaml; `run` without --config must use it, and say so
    (tmp_path / "medaudit.yaml").write_text(CONFIG.read_text(), encoding="utf-8")
    args = ["run", str(MODEL), "--data", str(DATA), "--out", "o", "--quiet", "--perturbation", "intensity.gamma",
            "--severities", "5", "--bootstrap", "0"]
    res = run(args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines()[0] == "config: medaudit.yaml"
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["config_path"] == "medaudit.yaml"
    assert results["scenarios"][0]["metrics"]["accuracy"]["value"] > 0.95  # its input spec, not the defaults' 1/3
    assert [c["expr"] for c in results["checks"]] == ["clean.accuracy<0.9"]  # its check too
    # a TOML file when there is no YAML file
    (tmp_path / "medaudit.yaml").unlink()
    (tmp_path / "medaudit.toml").write_text('[audit]\nseed = 7\n', encoding="utf-8")
    res = run([*args, "--out", "t"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines()[0] == "config: medaudit.toml"
    assert json.loads((tmp_path / "t" / "results.json").read_text())["seed"] == 7


def test_run_without_a_config_says_so(tmp_path: Path) -> None:
    res = run(["run", str(MODEL), "--data", str(DATA), "--out", "o", "--quiet", "--fail-on", "clean.acuracy<0.5"],
              cwd=tmp_path)
    assert res.returncode == 2  # the misspelt metric, refused before any work
    assert res.stderr.splitlines()[0] == "config: none (defaults)"


def test_warnings_grouped_at_the_end_with_a_count_and_progress_lines_without_a_terminal(tmp_path: Path) -> None:
    # no task.classes (classes-inferred, medaudit's) and a subgroup column the data lacks (the
    # subgroups plugin's): both reach the console, grouped, after the outputs, counted
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.read_text().replace("  classes: [csf_other, grey_matter, white_matter]\n", "")
                      .replace("attributes: [hemisphere, level]", "attributes: [hemisphere, sex]"), encoding="utf-8")
    # stderr is a pipe here, as in CI: progress comes as lines (every 10 s; at once with 0)
    script = ("import sys, medaudit.runner.progress as p; p.LINE_INTERVAL_S = 0; import medaudit.cli as c; "
              "sys.argv = ['medaudit', *sys.argv[1:]]; c.main()")
    res = subprocess.run([sys.executable, "-c", script, "run", str(MODEL), "--data", str(DATA), "--config", str(config),
                          "--out", str(tmp_path / "o"), "--perturbation", "intensity.gamma", "--severities", "1,5",
                          "--bootstrap", "0", "--fail-on", "*.accuracy<0.9"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 1, res.stderr  # the wildcard check fails ...
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    [check] = [c for c in results["checks"] if c["expr"] == "*.accuracy<0.9"]
    worst = min((s for s in results["scenarios"] if s["perturbation"]), key=lambda s: s["metrics"]["accuracy"]["value"])
    assert check["scenario"] == worst["id"]  # ... and names the scenario that failed it
    assert f"FAIL *.accuracy in {worst['id']} = {worst['metrics']['accuracy']['value']:.4g} (fails if < 0.9)" in res.stdout
    assert f"<td>{worst['id']}</td>" in (tmp_path / "o" / "report.html").read_text()
    err = res.stderr.splitlines()
    assert "\r" not in res.stderr
    progress = [line for line in err if line.startswith("[medaudit] ")]
    assert progress and all(re.fullmatch(r"\[medaudit\] \d+% \d/3 scenarios · [\d,]+ samples/s( · eta [\d,]+ s)?", line)
                            for line in progress), progress
    assert progress[-1].startswith("[medaudit] 100% 3/3 scenarios")
    assert sum(line.startswith("[medaudit] 100%") for line in progress) == 1  # the end is said once
    # the verdict precedes the checks on stdout: a failed wildcard check is a FAIL verdict
    assert res.stdout.index("verdict: FAIL — ") < res.stdout.index("FAIL *.accuracy")
    records = results["warning_records"]
    assert {w["code"] for w in records} >= {"classes-inferred"}
    assert err[-1] == f"{len(records)} warnings (see Limitations in the report)"
    assert "medaudit: warning: [medaudit] classes-inferred:" in err
    subgroup_line = next(i for i, line in enumerate(err) if "'sex' is not a metadata column" in line)
    assert err[subgroup_line].startswith("  subgroups: attribute 'sex'")
    assert err[subgroup_line - 1].startswith("medaudit: warning: [subgroups] ")
    assert err.index("medaudit: warning: [medaudit] classes-inferred:") > max(map(err.index, progress))


def test_ctrl_c_before_any_shard_completed_promises_nothing(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "medaudit.cli", "run", str(MODEL), "--data", str(DATA), "--config",
                             str(CONFIG), "--out", str(tmp_path / "o"), "--bootstrap", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stderr is not None
    for line in proc.stderr:  # prepared: the forward passes of the 91 scenarios (one shard) begin
        if " scenarios (clean, " in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "medaudit: interrupted before any shard completed; nothing was kept" in err
    assert "--resume" not in err
    assert not (tmp_path / "o").exists()
