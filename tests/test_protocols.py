"""Frozen audit protocols (medaudit.protocols, plugins/protocols): pinned hashes of the shipped
protocols, validation, applying one to a run's config, checking the plan against it, publishing one
from a plugin, and end to end through ``medaudit run --protocol`` and ``--baseline``.

The end-to-end audits run under a tiny protocol a test plugin publishes (one perturbation at two
severities, 20 bootstrap resamples, one detector), injected into the CLI as tests/test_cli.py does
(``medaudit.cli.get_plugin_manager`` patched to register it): a built-in protocol's 90 scenarios with
1000 resamples would take minutes.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from pydantic import ValidationError
from torch import Tensor

import medaudit
import medaudit.cli
import medaudit.plugins.protocols as builtin_protocols
from medaudit.cli import cli
from medaudit.config import Config, load_config, read_config_file
from medaudit.errors import ConfigError, PluginError
from medaudit.perturbation import Perturbation, finish, per_sample
from medaudit.plugin_manager import get_plugin_manager
from medaudit.protocols import Protocol, ProtocolRun, check_metrics, check_plan, load_protocol_file, resolve_protocol
from medaudit.results import SCHEMA_PATH
from medaudit.rng import SampleRNG
from medaudit.runner.plan import plan_scenarios
from medaudit.settings import resolve_settings

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "model.pt"
DATA = ROOT / "examples" / "mni-patches" / "test.npz"
EXAMPLE_CONFIG = ROOT / "examples" / "mni-patches.yaml"
SHIPPED_DIR = Path(builtin_protocols.__file__).parent

#: The SHA-256 of every shipped protocol. A published protocol NEVER changes: audits that name it
#: were compared on the promise that the name means these exact settings. Do not update a hash here;
#: add the next version (mri-v2.json) beside the old file and pin its hash too.
SHIPPED = {
    "ct-v1": "eb4067f77f00edde361c63d924091b537fc3545a5ada1f473c8992a68559650a",
    "generic-v1": "ad8ab238890ae3b532b95949e3452c44a2f856568d705882a5bb96022193daba",
    "mri-v1": "f2441e572d62dc9da766c1b460b57fad083ddd063379b5dee54fc10a00c7858a",
    "xray-v1": "72b56f3e4083a3ebbeb35a2bbba17d3df2941bbd92bc1e5e8d7a6b5b62c16409",
}
#: modality, suites and number of perturbations of each (docs/protocols.md's table says the same)
SHAPES = {
    "ct-v1": ("ct", ["ct", "intensity", "geometry"], 16),
    "generic-v1": ("generic", ["intensity", "geometry"], 11),
    "mri-v1": ("mri", ["mri", "intensity", "geometry"], 18),
    "xray-v1": ("xray", ["xray", "intensity", "geometry"], 17),
}


def quiet_pm(*extra: tuple[str, object]) -> Any:
    return get_plugin_manager(extra=list(extra), warn=lambda m: None)


@pytest.fixture(scope="module")
def shipped() -> dict[str, Protocol]:
    """The built-in protocols, as the plugin manager collects them."""
    found = quiet_pm().protocols()
    return {name: p for name, (plugin, p) in found.items() if plugin == "protocols"}


def plugin_module(name: str, protocols: Sequence[Any] = (), perturbations: Sequence[type[Perturbation]] = ()) -> types.ModuleType:
    """A plugin as a module object, as an entry point loads one: ``@medaudit.hookimpl`` functions."""
    mod = types.ModuleType(name)
    mod.MEDAUDIT_API_VERSION = 1

    @medaudit.hookimpl
    def medaudit_protocols() -> list[Protocol]:
        return list(protocols)

    mod.medaudit_protocols = medaudit_protocols
    if perturbations:
        @medaudit.hookimpl
        def medaudit_perturbations() -> list[type[Perturbation]]:
            return list(perturbations)

        mod.medaudit_perturbations = medaudit_perturbations
    return mod


def invoke(args: list[str], *plugins: tuple[str, object]) -> Result:
    """``medaudit ARGS`` in-process, with ``plugins`` registered besides the installed ones."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(medaudit.cli, "get_plugin_manager", lambda **kw: get_plugin_manager(extra=list(plugins), **kw))
        return CliRunner().invoke(cli, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------
# The shipped protocols never change
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_protocol_hash_is_pinned(name: str, shipped: dict[str, Protocol]) -> None:
    assert shipped[name].sha256 == SHIPPED[name], (
        f"shipped protocol {name} changed (sha256 {shipped[name].sha256}): a published protocol never changes, "
        f"audits compared under its name would silently mean something else. Revert the change to "
        f"plugins/protocols/{name}.json and publish a new version instead (e.g. {name[:-1]}{int(name[-1]) + 1}.json)")


def test_every_shipped_protocol_is_pinned(shipped: dict[str, Protocol]) -> None:
    files = sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))
    assert files == sorted(shipped) == sorted(SHIPPED), "a new shipped protocol needs its hash pinned in SHIPPED"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_protocol_shape(name: str, shipped: dict[str, Protocol]) -> None:
    p = shipped[name]
    assert (p.modality, p.suites, len(p.perturbations)) == SHAPES[name]
    assert (p.name, p.version, p.severities, p.seed, p.bootstrap, p.confidence) == (name, 1, [1, 2, 3, 4, 5], 0, 1000, 0.95)
    assert p.detectors == ["msp", "energy", "entropy", "mahalanobis", "knn", "spectral"]
    assert p.margins == {"*": 0.05, "hd95": 1.0}


@pytest.mark.parametrize("path", sorted(SHIPPED_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_canonical_hash_recipe_recomputed_with_hashlib(path: Path) -> None:
    # the recipe docs/protocols.md gives, on the file's parsed content, without medaudit's model
    data = json.loads(path.read_text(encoding="utf-8"))
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    digest = hashlib.sha256(canonical).hexdigest()
    protocol = load_protocol_file(path)
    assert digest == protocol.sha256 == SHIPPED[path.stem]
    assert protocol.content() == data  # the file holds the canonical content, nothing defaulted
    assert path.stem == data["name"]


def test_docs_list_the_shipped_protocols_and_a_working_hash_recipe() -> None:
    text = (ROOT / "docs" / "protocols.md").read_text(encoding="utf-8")
    rows = {m[0]: m[1:] for m in re.findall(r"^\| `([a-z0-9.-]+-v\d+)` \| `([0-9a-f]{64})` \| (\w+) \| ([\w, ]+) \| (\d+)",
                                            text, re.MULTILINE)}
    assert {name: (sha, modality, suites.split(", "), int(n)) for name, (sha, modality, suites, n) in rows.items()} == {
        name: (SHIPPED[name], *SHAPES[name]) for name in SHIPPED}
    # the recipe, run as written on a shipped file
    recipe = re.search(r"```python\n(import hashlib, json\n.*?)```", text, re.DOTALL)[1]
    assert len(recipe.strip().splitlines()) == 3
    printed: list[str] = []
    exec(recipe.replace('"mri-v1.json"', repr(str(SHIPPED_DIR / "mri-v1.json"))), {"print": printed.append})
    assert printed == [SHIPPED["mri-v1"]]


def test_protocols_command_lists_every_shipped_protocol() -> None:
    result = invoke(["protocols"])
    assert result.exit_code == 0, result.output
    for name, sha in SHIPPED.items():
        assert f"{name}  sha256 {sha}  [plugin protocols]" in result.stdout
    assert "modality mri; 18 perturbations (mri, intensity, geometry) at severities 1,2,3,4,5; seed 0; " \
           "bootstrap 1000 at 0.95" in result.stdout

    result = invoke(["protocols", "--json"])
    assert result.exit_code == 0, result.output
    listed = {e["name"]: e for e in json.loads(result.stdout)}
    assert {n: e["sha256"] for n, e in listed.items() if e["plugin"] == "protocols"} == SHIPPED
    for name, entry in listed.items():
        content = {k: v for k, v in entry.items() if k not in ("sha256", "plugin")}
        assert Protocol.model_validate(content).sha256 == entry["sha256"]  # the full content, hashable again


@pytest.fixture(scope="module")
def installed_perturbations() -> dict[str, dict[str, Any]]:
    """``medaudit perturbations --json`` of this installation, by name."""
    result = invoke(["perturbations", "--json"])
    assert result.exit_code == 0, result.output
    return {e["name"]: e for e in json.loads(result.stdout)}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_pinned_parameters_are_the_installed_ones(name: str, shipped: dict[str, Protocol],
                                                  installed_perturbations: dict[str, dict[str, Any]]) -> None:
    """What check_plan compares, on a clean install: else every run under the protocol is refused."""
    protocol = shipped[name]
    in_suites = {n for n, e in installed_perturbations.items() if e["suite"] in protocol.suites}
    assert in_suites == set(protocol.perturbations)
    for pname, pin in protocol.perturbations.items():
        entry = installed_perturbations[pname]
        assert (entry["suite"], entry["dims"]) == (pin.suite, pin.dims), pname
        for level in map(str, protocol.severities):
            assert entry["severities"][level] == pin.severities[level], f"{pname} at severity {level}"


@pytest.mark.parametrize("name", sorted(SHIPPED))
@pytest.mark.parametrize("dims", [2, 3])
def test_a_clean_install_plans_each_protocol_conformantly(name: str, dims: int, shipped: dict[str, Protocol]) -> None:
    pm = quiet_pm()
    run, overrides = resolve_protocol(shipped, name, {}, {}, allow_override=False)
    config = load_config(None, {**overrides, "input.dims": dims})
    scenarios, perturbations = plan_scenarios(config, pm.perturbations())
    catalogue = {n: cls.describe() for n, (_p, cls) in pm.perturbations().items() if n in perturbations}
    checked = check_plan(run, catalogue, dims, allow_override=False)
    assert checked.conformant and checked.record() == {**shipped[name].identity(), "conformant": True, "overrides": []}
    expected = {n for n, pin in shipped[name].perturbations.items() if dims in pin.dims}
    assert set(perturbations) == expected
    assert len(scenarios) == 1 + 5 * len(expected)
    assert (config.protocol, config.audit.bootstrap, config.audit.seed, config.input.modality) == (
        name, 1000, 0, shipped[name].modality)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def mri_content(shipped: dict[str, Protocol]) -> dict[str, Any]:
    return shipped["mri-v1"].content()


@pytest.mark.parametrize(("change", "message"), [
    ({"name": "mri-v2"}, r"protocol name 'mri-v2' must end in -v1 \(its version\)"),
    ({"name": "mri-v1", "version": 2}, r"must end in -v2"),
    ({"name": "mri"}, r"name\n.*String should match pattern"),
    ({"name": "MRI-v1"}, r"String should match pattern"),
    ({"severities": []}, r"severities must be an ascending list of distinct levels 1..5, got \[\]"),
    ({"severities": [3, 1]}, r"got \[3, 1\]"),
    ({"severities": [1, 1, 2]}, r"got \[1, 1, 2\]"),
    ({"severities": [0, 1]}, r"got \[0, 1\]"),
    ({"severities": [5, 6]}, r"got \[5, 6\]"),
    ({"bootstrap": -1}, r"bootstrap"),
    ({"confidence": 1.0}, r"confidence"),
    ({"modality": "ultrasound"}, r"modality"),
    ({"unknown_key": 1}, r"unknown_key"),
])
def test_invalid_protocols_are_refused(mri_content: dict[str, Any], change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Protocol.model_validate({**mri_content, **change})


def test_a_perturbation_outside_the_suites_is_refused(mri_content: dict[str, Any], shipped: dict[str, Protocol]) -> None:
    stray = {**mri_content["perturbations"], "ct.ring": shipped["ct-v1"].perturbations["ct.ring"].model_dump()}
    with pytest.raises(ValidationError, match=r"protocol mri-v1: perturbations \['ct.ring'\] belong to no suite of "
                                              r"\['mri', 'intensity', 'geometry'\]"):
        Protocol.model_validate({**mri_content, "perturbations": stray})
    # leaving a suite out of `suites` strands its perturbations the same way
    with pytest.raises(ValidationError, match=r"perturbations \['geometry.flip_lr', "):
        Protocol.model_validate({**mri_content, "suites": ["mri", "intensity"]})


def test_every_pin_covers_every_severity(mri_content: dict[str, Any]) -> None:
    # a pin without parameters at one of the protocol's severities would make check_plan refuse every
    # audit as if the installed perturbation had changed
    pins = json.loads(json.dumps(mri_content["perturbations"]))
    del pins["mri.motion"]["severities"]["5"]
    with pytest.raises(ValidationError, match=r"protocol mri-v1: no parameters pinned for mri.motion@5 \(every "
                                              r"perturbation pins each of the severities \[1, 2, 3, 4, 5\]\)"):
        Protocol.model_validate({**mri_content, "perturbations": pins})
    # a protocol of fewer severities needs only those
    assert Protocol.model_validate({**mri_content, "name": "mri-v2", "version": 2, "severities": [1, 2, 3, 4],
                                    "perturbations": pins}).severities == [1, 2, 3, 4]


def test_a_protocol_is_frozen(shipped: dict[str, Protocol]) -> None:
    with pytest.raises(ValidationError):
        shipped["mri-v1"].seed = 3  # type: ignore[misc]


def test_an_invalid_protocol_file_names_the_file(tmp_path: Path, mri_content: dict[str, Any]) -> None:
    bad = tmp_path / "site-v1.json"
    bad.write_text(json.dumps({**mri_content, "severities": [2, 1]}))
    with pytest.raises(ConfigError, match=rf"(?s)protocol file {re.escape(str(bad))}:.*severities must be an ascending"):
        load_protocol_file(bad)
    broken = tmp_path / "broken-v1.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match=rf"protocol file {re.escape(str(broken))} cannot be read"):
        load_protocol_file(broken)


# ---------------------------------------------------------------------------------------------
# resolve_protocol: contradictions, equal values, overrides
# ---------------------------------------------------------------------------------------------


def test_a_contradicting_flag_names_the_flag_and_the_protocol_value(shipped: dict[str, Protocol]) -> None:
    with pytest.raises(ConfigError, match=r"protocol mri-v1 pins what these set differently: --seed = 3 \(protocol: 0\)"
                                          r"\. Remove them, or pass --protocol-override"):
        resolve_protocol(shipped, "mri-v1", {}, {"audit.seed": 3}, allow_override=False)
    with pytest.raises(ConfigError, match=r"--severities = \[1, 3\] \(protocol: \[1, 2, 3, 4, 5\]\); "
                                          r"--bootstrap = 20 \(protocol: 1000\)"):
        resolve_protocol(shipped, "mri-v1", {}, {"audit.severities": [1, 3], "audit.bootstrap": 20},
                         allow_override=False)
    with pytest.raises(ConfigError, match=r'--perturbation = \["mri.motion"\] \(protocol: \[\]\)'):
        resolve_protocol(shipped, "mri-v1", {}, {"audit.perturbations": ["mri.motion"]}, allow_override=False)


def test_a_contradicting_config_key_names_the_key_and_the_file(tmp_path: Path, shipped: dict[str, Protocol]) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("audit:\n  bootstrap: 10\ninput:\n  modality: ct\n")
    with pytest.raises(ConfigError) as err:
        resolve_protocol(shipped, "mri-v1", read_config_file(path), {}, allow_override=False, source=str(path))
    assert f'input.modality in {path} = "ct" (protocol: "mri")' in str(err.value)
    assert f"audit.bootstrap in {path} = 10 (protocol: 1000)" in str(err.value)


def test_equal_values_are_no_contradiction(shipped: dict[str, Protocol]) -> None:
    # the bundled example sets seed 0 and bootstrap 1000: mri-v1's own values
    file_data = read_config_file(EXAMPLE_CONFIG)
    assert (file_data["audit"]["seed"], file_data["audit"]["bootstrap"]) == (0, 1000)
    run, overrides = resolve_protocol(shipped, "mri-v1", file_data,
                                      {"audit.seed": 0, "audit.severities": [5, 4, 3, 2, 1], "audit.bootstrap": None,
                                       "audit.suites": ["geometry", "mri", "intensity"]}, allow_override=False)
    assert run.conformant and run.overrides == []
    assert overrides["audit.seed"] == 0 and overrides["audit.severities"] == [1, 2, 3, 4, 5]
    assert overrides["audit.bootstrap"] == 1000 and overrides["protocol"] == "mri-v1"
    # a margin the protocol pins (by name or through '*') may be restated
    file_data = {"verdict": {"margins": {"accuracy": 0.05, "hd95": 1}}, "audit": {"confidence": 0.95}}
    assert resolve_protocol(shipped, "mri-v1", file_data, {}, allow_override=False)[0].conformant
    with pytest.raises(ConfigError, match=r'verdict.margins in the config file = \{"accuracy": 0.1\}'):
        resolve_protocol(shipped, "mri-v1", {"verdict": {"margins": {"accuracy": 0.1}}}, {}, allow_override=False)


def test_a_flag_restating_the_protocol_replaces_a_contradicting_file_value(tmp_path: Path,
                                                                          shipped: dict[str, Protocol]) -> None:
    # the flag replaces the file's value, so the audit runs the protocol's: no contradiction, conformant
    path = tmp_path / "site.yaml"
    path.write_text("audit:\n  seed: 3\n")
    for allow in (False, True):
        run, overrides = resolve_protocol(shipped, "mri-v1", read_config_file(path), {"audit.seed": 0},
                                          allow_override=allow, source=str(path))
        assert run.conformant and load_config(path, overrides).audit.seed == 0


def test_override_keeps_the_users_value_and_records_it(tmp_path: Path, shipped: dict[str, Protocol]) -> None:
    run, overrides = resolve_protocol(shipped, "mri-v1", {}, {"audit.seed": 3, "audit.device": "cpu"},
                                      allow_override=True)
    assert overrides["audit.seed"] == 3 and overrides["audit.device"] == "cpu"
    assert overrides["audit.bootstrap"] == 1000  # what was not contradicted stays pinned
    assert run.record() == {"name": "mri-v1", "version": 1, "sha256": SHIPPED["mri-v1"], "conformant": False,
                            "overrides": ["audit.seed"]}
    # a contradicting file key: the file's value is kept (the override does not set it)
    path = tmp_path / "site.yaml"
    path.write_text("audit:\n  bootstrap: 10\n")
    run, overrides = resolve_protocol(shipped, "mri-v1", read_config_file(path), {}, allow_override=True,
                                      source=str(path))
    assert run.overrides == ["audit.bootstrap"] and "audit.bootstrap" not in overrides
    assert load_config(path, overrides).audit.bootstrap == 10


def test_an_unknown_protocol_lists_the_available_ones(shipped: dict[str, Protocol]) -> None:
    with pytest.raises(ConfigError, match=r"unknown protocol 'mri-v9'; `medaudit protocols` lists them: "
                                          r"ct-v1, generic-v1, mri-v1, xray-v1"):
        resolve_protocol(shipped, "mri-v9", {}, {}, allow_override=False)


def test_check_metrics(shipped: dict[str, Protocol]) -> None:
    run = ProtocolRun(shipped["mri-v1"])
    check_metrics(run, "multiclass", lambda key: True)
    with pytest.raises(ConfigError, match=r"covers task types .* not 'regression'"):
        check_metrics(run, "regression", lambda key: True)
    with pytest.raises(ConfigError, match=r"compares metrics \['nsd', 'hd95'\] for task 'segmentation'"):
        check_metrics(run, "segmentation", lambda key: key not in ("nsd", "hd95"))


# ---------------------------------------------------------------------------------------------
# check_plan: the installed perturbations are the protocol's
# ---------------------------------------------------------------------------------------------


class Glare(Perturbation):
    """A third-party perturbation that joins the built-in mri suite."""

    name = "mri.glare"
    suite = "mri"
    summary = "Adds a constant."
    severities = {s: {"amount": 0.05 * s} for s in range(1, 6)}

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"amount": self.draw(rng, severity, "amount")}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return finish(x.float() + per_sample(params["amount"], x.float()), x)


def planned(pm: Any, protocols: Mapping[str, Protocol], name: str, dims: int) -> tuple[ProtocolRun, dict[str, Any]]:
    """A run under protocol ``name`` resolved and planned as ``medaudit run`` does: its record and
    the catalogue entries of the planned perturbations."""
    run, overrides = resolve_protocol(protocols, name, {}, {}, allow_override=False)
    catalogue = pm.perturbations()
    _, perturbations = plan_scenarios(load_config(None, {**overrides, "input.dims": dims}), catalogue)
    return run, {n: cls.describe() for n, (_p, cls) in catalogue.items() if n in perturbations}


def test_a_plugin_joining_a_protocol_suite_is_not_the_protocol(shipped: dict[str, Protocol]) -> None:
    pm = quiet_pm(("thirdparty", plugin_module("thirdparty", perturbations=[Glare])))
    run, chosen = planned(pm, shipped, "mri-v1", 2)
    assert "mri.glare" in chosen
    with pytest.raises(ConfigError, match=r"the installed perturbations are not protocol mri-v1's: not in the protocol "
                                          r"\(a plugin joined its suites\): mri.glare\. Install the plugin "
                                          r"versions .* or pass --protocol-override"):
        check_plan(run, chosen, 2, allow_override=False)
    checked = check_plan(run, chosen, 2, allow_override=True)
    assert not checked.conformant
    assert checked.record()["overrides"] == [
        "perturbations: not in the protocol (a plugin joined its suites): mri.glare"]


def test_changed_parameters_name_the_perturbation_and_severity(monkeypatch: pytest.MonkeyPatch,
                                                                shipped: dict[str, Protocol]) -> None:
    pm = quiet_pm()
    motion = pm.perturbations()["mri.motion"][1]
    # a plugin upgrade that strengthens severity 3
    monkeypatch.setattr(motion, "severities", {**motion.severities, 3: {**motion.severities[3], "degrees": (4.0, 6.0)}})
    run, chosen = planned(pm, shipped, "mri-v1", 2)
    with pytest.raises(ConfigError) as err:
        check_plan(run, chosen, 2, allow_override=False)
    assert ("mri.motion has other parameters at severity 3 than the protocol pins (installed: "
            '{"3": {"degrees": [4.0, 6.0], ') in str(err.value)
    assert 'protocol: {"3": {"degrees": [3.0, 5.0], ' in str(err.value)
    assert "severity 1" not in str(err.value) and "severity 3, " not in str(err.value)
    assert not check_plan(run, chosen, 2, allow_override=True).conformant


def test_a_missing_perturbation_is_named(shipped: dict[str, Protocol]) -> None:
    run, chosen = planned(quiet_pm(), shipped, "mri-v1", 2)
    del chosen["mri.spike"]
    with pytest.raises(ConfigError, match=r"not installed: mri.spike"):
        check_plan(run, chosen, 2, allow_override=False)


def test_only_the_perturbations_of_the_audits_dims_are_required(shipped: dict[str, Protocol]) -> None:
    pm = quiet_pm()
    assert shipped["ct-v1"].perturbations["ct.slice_thickness"].dims == [3]
    run, chosen2 = planned(pm, shipped, "ct-v1", 2)
    assert "ct.slice_thickness" not in chosen2
    assert check_plan(run, chosen2, 2, allow_override=False).conformant  # a 2D audit does not require it
    run, chosen3 = planned(pm, shipped, "ct-v1", 3)
    assert set(chosen3) - set(chosen2) == {"ct.slice_thickness"}
    assert check_plan(run, chosen3, 3, allow_override=False).conformant
    with pytest.raises(ConfigError, match=r"not installed: ct.slice_thickness"):
        check_plan(run, chosen2, 3, allow_override=False)  # a 3D audit does


def test_a_user_chosen_plan_was_already_recorded(shipped: dict[str, Protocol]) -> None:
    run, _ = resolve_protocol(shipped, "mri-v1", {}, {"audit.perturbations": ["mri.motion"]}, allow_override=True)
    assert check_plan(run, {"mri.motion": {}}, 2, allow_override=False) is run
    assert run.overrides == ["audit.perturbations"]


def test_an_excluded_perturbation_is_recorded_as_excluded_not_missing(shipped: dict[str, Protocol]) -> None:
    pm = quiet_pm()
    file_data = {"audit": {"exclude": ["mri.motion"]}}
    run, overrides = resolve_protocol(shipped, "mri-v1", file_data, {}, allow_override=True)
    catalogue = pm.perturbations()
    _, perturbations = plan_scenarios(load_config(None, {**overrides, **{"audit.exclude": ["mri.motion"]},
                                                         "input.dims": 2}), catalogue)
    assert "mri.motion" not in perturbations
    checked = check_plan(run, {n: cls.describe() for n, (_p, cls) in catalogue.items() if n in perturbations}, 2,
                         allow_override=True)
    assert checked.overrides == ["audit.exclude"]  # not also "perturbations: not installed: mri.motion"


# ---------------------------------------------------------------------------------------------
# Publishing a protocol from a plugin (the medaudit_protocols hook)
# ---------------------------------------------------------------------------------------------


class Darken(Perturbation):
    name = "prototest.darken"
    suite = "prototest"
    summary = "Multiplies intensities by (1 - amount)."
    severities = {s: {"amount": 0.1 * s} for s in range(1, 6)}

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"amount": self.draw(rng, severity, "amount")}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return finish(x.float() * (1 - per_sample(params["amount"], x.float())), x)


#: The tiny protocol of the end-to-end audits: one perturbation at severities 1 and 3, 20 resamples, msp.
TINY = Protocol(
    name="prototest-v1", version=1, description="One darkening perturbation (tests).", modality="mri",
    suites=["prototest"],
    perturbations={"prototest.darken": {"suite": "prototest", "dims": [2, 3],
                                        "severities": Darken.describe()["severities"]}},
    severities=[1, 3], seed=0, bootstrap=20, confidence=0.95, detectors=["msp"],
    metrics={"multiclass": ["accuracy", "balanced_accuracy", "ece"]}, margins={"*": 0.05})
PROTOTEST = ("prototest", plugin_module("medaudit_prototest", protocols=[TINY], perturbations=[Darken]))


def test_hook_medaudit_protocols(conformant: Path) -> None:
    consortium = Protocol.model_validate({**TINY.content(), "name": "consortium-v2", "version": 2})
    plugin = plugin_module("medaudit_consortium", protocols=[consortium])
    pm = quiet_pm(("consortium", plugin))
    found = pm.protocols()
    assert found["consortium-v2"] == ("consortium", consortium)
    assert {name: p.sha256 for name, (owner, p) in found.items() if owner == "protocols"} == SHIPPED
    contributions = pm.contributions(resolve_settings(Config(), pm))
    assert contributions["consortium"] == {"protocols": ["consortium-v2"]}
    assert contributions["protocols"] == {"protocols": sorted(SHIPPED)}
    # `medaudit protocols` lists it with the plugin publishing it
    result = invoke(["protocols"], ("consortium", plugin))
    assert result.exit_code == 0, result.output
    assert f"consortium-v2  sha256 {consortium.sha256}  [plugin consortium]" in result.stdout
    # and `medaudit run --protocol` runs under one a plugin publishes (the module-scoped audit below)
    assert read(conformant)["protocol"]["sha256"] == TINY.sha256


def test_two_plugins_publishing_one_name_are_refused() -> None:
    a = plugin_module("medaudit_a", protocols=[TINY])
    b = plugin_module("medaudit_b", protocols=[TINY])
    with pytest.raises(PluginError, match=r'protocol "prototest-v1" is provided by two plugins: "site_a" and "site_b"; '
                                          r"uninstall one or rename its protocol"):
        quiet_pm(("site_a", a), ("site_b", b)).protocols()
    # nor may a plugin take over a built-in's name
    impostor = Protocol.model_validate({**TINY.content(), "name": "mri-v1"})
    with pytest.raises(PluginError, match=r'protocol "mri-v1" is provided by two plugins: "protocols" and "impostor"'):
        quiet_pm(("impostor", plugin_module("medaudit_impostor", protocols=[impostor]))).protocols()


def test_a_plugin_must_return_protocol_objects() -> None:
    bad = plugin_module("medaudit_bad", protocols=[TINY.content()])  # type: ignore[list-item]
    with pytest.raises(PluginError, match=r'plugin "bad" returned .* from medaudit_protocols; expected '
                                          r"medaudit.protocols.Protocol objects"):
        quiet_pm(("bad", bad)).protocols()


# ---------------------------------------------------------------------------------------------
# End to end: medaudit run --protocol / --protocol-override / --baseline
# ---------------------------------------------------------------------------------------------

#: The example's input and task, without settings the tiny protocol pins differently (the example
#: sets bootstrap 1000); it sets the protocol's own seed, which is no contradiction.
CONFIG_BASE = """\
input: {modality: mri, dims: 2, channels: 1, intensity: {scaling: fixed, max_value: 255}, mean: [0.5], std: [0.25]}
task: {type: multiclass, classes: [csf_other, grey_matter, white_matter]}
"""
CONFIG_YAML = CONFIG_BASE + "audit: {batch_size: 200, seed: 0}\n"
NONINFERIOR = ["prototest.darken@1.drop.accuracy > 0.5 noninferior", "prototest.darken@*.drop.accuracy > 0.9 noninferior"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("protocols")
    (root / "tiny.yaml").write_text(CONFIG_YAML)
    return root


def audit(workdir: Path, out: Path, *args: Any, data: Path = DATA) -> Result:
    return invoke(["run", MODEL, "--data", data, "--config", workdir / "tiny.yaml", "--out", out, "--quiet",
                   "--threads", "1", *args], PROTOTEST)


def read(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def conformant(workdir: Path) -> Path:
    """An audit under the tiny protocol, with two non-inferiority gates."""
    out = workdir / "conformant"
    result = audit(workdir, out, "--protocol", "prototest-v1", *[a for c in NONINFERIOR for a in ("--fail-on", c)])
    assert result.exit_code == 0, result.output
    assert f"protocol: prototest-v1 (sha256 {TINY.sha256[:12]}) conformant" in result.stdout
    return out


def test_results_record_the_protocol(conformant: Path) -> None:
    results = read(conformant)
    assert results["protocol"] == {"name": "prototest-v1", "version": 1, "sha256": TINY.sha256, "conformant": True,
                                   "overrides": []}
    jsonschema.validate(results, json.loads(SCHEMA_PATH.read_text()))
    assert [s["id"] for s in results["scenarios"]] == ["clean", "prototest.darken@1", "prototest.darken@3"]
    cfg = results["config"]
    assert (cfg["protocol"], cfg["audit"]["bootstrap"], cfg["audit"]["severities"], cfg["audit"]["detectors"]) == (
        "prototest-v1", 20, [1, 3], ["msp"])
    assert "protocol-not-conformant" not in {w["code"] for w in results["warning_records"]}
    report = html.unescape((conformant / "report.html").read_text(encoding="utf-8"))
    assert "prototest-v1" in report and TINY.sha256 in report
    assert not re.search(r"not (protocol-)?conformant", report, re.IGNORECASE)


def test_noninferiority_gates_in_a_real_audit(conformant: Path) -> None:
    results = read(conformant)
    drops = {s["id"]: s["drop"]["accuracy"] for s in results["scenarios"] if s["perturbation"]}
    one, wild = results["checks"]
    assert one["noninferior"] and one["scenario"] == "prototest.darken@1" and one["passed"]
    assert (one["value"], one["upper_bound"]) == (drops["prototest.darken@1"]["value"], drops["prototest.darken@1"]["ci_high"])
    # the wildcard is decided by the scenario with the highest upper bound
    top = max(drops, key=lambda sid: drops[sid]["ci_high"])
    assert wild["scenario"] == top and wild["upper_bound"] == drops[top]["ci_high"]
    for check in (one, wild):
        # (1 + k) / (1 + R) with R = 20 resamples and 0 <= k <= R
        k = check["p_value"] * 21 - 1
        assert k == pytest.approx(round(k), abs=1e-9) and 0 <= round(k) <= 20
        assert check["upper_bound"] < check["threshold"] and check["passed"]


def test_scores_without_a_baseline_are_null_with_the_reason(conformant: Path) -> None:
    robustness = read(conformant)["robustness"]
    for score in ("mce_vs_baseline", "relative_mce_vs_baseline", "be", "rbe"):
        assert robustness[score]["value"] is None
        assert "--baseline" in robustness[score]["reason"], robustness[score]["reason"]


def test_rood_degradation_is_the_papers_formula_on_the_stored_drops(conformant: Path) -> None:
    results = read(conformant)
    rood = results["robustness"]["rood_degradation"]
    clean = results["scenarios"][0]["metrics"]
    headline = {k for k, info in results["metric_info"].items()
                if info.get("headline") and k in results["metric_directions"] and k in clean}
    assert set(rood) == headline and {"accuracy", "ece"} <= headline
    alpha = 2 / 3
    for key, entry in rood.items():
        per: dict[str, list[tuple[int, float]]] = {}
        for s in results["scenarios"]:
            if s["perturbation"]:
                per.setdefault(s["perturbation"], []).append((s["severity"], s["drop"][key]["value"]))
        by_perturbation = [sum(alpha ** s * d for s, d in sd) / sum(alpha ** s for s, _ in sd) for sd in per.values()]
        assert entry["value"] == pytest.approx(float(np.mean(by_perturbation)), rel=1e-12, abs=1e-15), key
        assert entry["alpha"] == alpha and entry["perturbations"]["prototest.darken"]["severities"] == [1, 3]


def test_the_same_audit_as_its_own_baseline_scores_one(workdir: Path, conformant: Path) -> None:
    out = workdir / "self-baseline"
    result = audit(workdir, out, "--protocol", "prototest-v1", "--baseline", conformant / "results.json")
    assert result.exit_code == 0, result.output
    results = read(out)
    for score in ("mce_vs_baseline", "relative_mce_vs_baseline", "be", "rbe"):
        assert results["robustness"][score]["value"] == 1.0, (score, results["robustness"][score])
        assert results["robustness"][score]["left_out"] == []
    assert "baseline-data" not in {w["code"] for w in results["warning_records"]}


def test_a_baseline_on_other_data_is_warned_about(workdir: Path, conformant: Path) -> None:
    with np.load(DATA) as d:
        half = {k: d[k][::2] for k in d.files}
    data = workdir / "half.npz"
    np.savez(data, **half)
    out = workdir / "other-data"
    result = audit(workdir, out, "--protocol", "prototest-v1", "--baseline", conformant / "results.json", data=data)
    assert result.exit_code == 0, result.output
    results = read(out)
    (warning,) = [w for w in results["warning_records"] if w["code"] == "baseline-data"]
    assert read(conformant)["dataset"]["sha256"][:12] in warning["message"]
    assert results["robustness"]["mce_vs_baseline"]["value"] is not None


def test_an_override_is_recorded_as_not_conformant(workdir: Path) -> None:
    out = workdir / "override"
    result = audit(workdir, out, "--protocol", "prototest-v1", "--protocol-override", "--bootstrap", "10")
    assert result.exit_code == 0, result.output
    assert "NOT conformant: overridden audit.bootstrap" in result.stdout
    results = read(out)
    assert results["protocol"] == {"name": "prototest-v1", "version": 1, "sha256": TINY.sha256, "conformant": False,
                                   "overrides": ["audit.bootstrap"]}
    assert results["config"]["audit"]["bootstrap"] == 10
    (warning,) = [w for w in results["warning_records"] if w["code"] == "protocol-not-conformant"]
    assert warning["subject"] == "prototest-v1" and "overridden audit.bootstrap" in warning["message"]
    report = html.unescape((out / "report.html").read_text(encoding="utf-8"))
    assert re.search(r"not (protocol-)?conformant", report, re.IGNORECASE) and "audit.bootstrap" in report


@pytest.mark.parametrize(("args", "config", "message"), [
    (["--protocol", "mri-v1", "--seed", "3"], "audit: {seed: 0}\n", "--seed = 3 (protocol: 0)"),
    (["--protocol", "prototest-v1", "--severities", "1,5"], "", "--severities = [1, 5] (protocol: [1, 3])"),
    (["--protocol", "mri-v1"], "audit: {bootstrap: 10}\n", "audit.bootstrap in {config} = 10 (protocol: 1000)"),
    ([], "protocol: mri-v1\naudit: {seed: 3}\n", "audit.seed in {config} = 3 (protocol: 0)"),
    (["--protocol", "nope-v1"], "", "unknown protocol 'nope-v1'; `medaudit protocols` lists them: ct-v1, generic-v1, "
                                    "mri-v1, prototest-v1, xray-v1"),
])
def test_a_contradiction_exits_2_and_writes_nothing(tmp_path: Path, args: list[str], config: str, message: str) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(CONFIG_BASE + config)
    out = tmp_path / "out"
    result = invoke(["run", MODEL, "--data", DATA, "--config", path, "--out", out, "--quiet", *args], PROTOTEST)
    assert result.exit_code == 2, result.output
    assert message.format(config=path) in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def _with_protocol(folder: Path, name: str, results_path: Path, protocol: dict[str, Any] | None) -> Path:
    """A copy of ``results_path`` recording ``protocol``."""
    data = json.loads(results_path.read_text(encoding="utf-8"))
    data["protocol"] = protocol
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_a_baseline_under_another_protocol_is_refused(tmp_path: Path, workdir: Path, conformant: Path,
                                                      shipped: dict[str, Protocol]) -> None:
    tiny = f"protocol prototest-v1 (sha256 {TINY.sha256[:12]})"
    mri = f"protocol mri-v1 (sha256 {SHIPPED['mri-v1'][:12]})"
    base = conformant / "results.json"
    cases = [
        # a protocol baseline, no protocol here
        ([], base, f"was audited under {tiny}, this audit under no protocol"),
        # no protocol there, one here
        (["--protocol", "prototest-v1"], _with_protocol(tmp_path, "none", base, None),
         f"was audited under no protocol, this audit under {tiny}"),
        # another protocol
        (["--protocol", "prototest-v1"],
         _with_protocol(tmp_path, "mri", base, {**shipped["mri-v1"].identity(), "conformant": True, "overrides": []}),
         f"was audited under {mri}, this audit under {tiny}"),
        # the same protocol, but overridden there
        (["--protocol", "prototest-v1"],
         _with_protocol(tmp_path, "overridden", base,
                        {**TINY.identity(), "conformant": False, "overrides": ["audit.bootstrap"]}),
         f"was audited under protocol prototest-v1 (sha256 {TINY.sha256[:12]}, not conformant: audit.bootstrap), this audit under {tiny}"),
    ]
    for args, baseline, message in cases:
        out = tmp_path / "out"
        result = audit(workdir, out, *args, "--baseline", baseline)
        assert result.exit_code == 2, result.output
        assert (f"--baseline {baseline} {message}: scores normalised by it would divide by errors measured under "
                "other shifts") in result.stderr, result.stderr
        assert not out.exists()
