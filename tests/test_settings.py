"""Plugin-owned settings: sections, aliases of the older core keys, schema, init, third-party use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml
from click.testing import CliRunner
from pydantic import BaseModel, Field
from torch import Tensor

from medaudit.audit import run_audit
from medaudit.cli import cli
from medaudit.config import Config, load_config
from medaudit.errors import ConfigError, PluginError
from medaudit.hookspecs import hookimpl
from medaudit.metric import Metric, MetricContext
from medaudit.plugin_manager import PluginManager, get_plugin_manager
from medaudit.settings import PluginSettings, legacy_key, resolve_settings

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "model.pt"
DATA = ROOT / "examples" / "mni-patches" / "test.npz"
EXAMPLE = ROOT / "examples" / "mni-patches.yaml"

# old key → (new key, a value other than the default, a third value); the table docs/plugins.md promises
ALIASES = {
    "audit.n_bins": ("plugins.calibration.n_bins", 7, 8),
    "audit.energy_temperature": ("plugins.ood.energy_temperature", 2.5, 0.5),
    "audit.knn_k": ("plugins.ood.knn_k", 9, 10),
    "subgroups.attributes": ("plugins.subgroups.attributes", ["sex"], ["site"]),
    "subgroups.intersections": ("plugins.subgroups.intersections", [["sex", "site"]], []),
    "subgroups.bins": ("plugins.subgroups.bins", {"age": [0.0, 50.0, 100.0]}, {"age": [0.0, 1.0]}),
    "subgroups.min_group_size": ("plugins.subgroups.min_group_size", 5, 6),
    "subgroups.permutations": ("plugins.subgroups.permutations", 99, 0),
    "subgroups.holm_family": ("plugins.subgroups.holm_family", "scenario", "audit"),
}


@pytest.fixture(scope="module")
def pm() -> PluginManager:
    return get_plugin_manager(warn=lambda m: None)


def nested(dotted: str, value: Any) -> dict[str, Any]:
    *parents, leaf = dotted.split(".")
    out: dict[str, Any] = {leaf: value}
    for p in reversed(parents):
        out = {p: out}
    return out


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def setting(config: Config, dotted: str) -> Any:
    _, plugin, field = dotted.split(".")
    return getattr(config.plugin_settings(plugin), field)


def test_defaults_without_sections(pm: PluginManager) -> None:
    config = resolve_settings(Config(), pm)
    assert config.plugin_settings("calibration").n_bins == 15
    assert (config.plugin_settings("ood").energy_temperature, config.plugin_settings("ood").knn_k) == (1.0, 50)
    sub = config.plugin_settings("subgroups")
    assert (sub.attributes, sub.min_group_size, sub.permutations) == ([], 30, "auto")
    # results.json config: the resolved sections, and the old keys mirroring the values in use
    dump = config.model_dump(mode="json")
    assert dump["plugins"]["ood"] == {"energy_temperature": 1.0, "knn_k": 50, "auroc_ci": "bootstrap", "odin": False,
                                      "odin_temperature": 1000.0, "odin_epsilon": 0.0014}
    assert dump["audit"]["n_bins"] == 15 and dump["subgroups"]["permutations"] == "auto"


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_each_alias_sets_the_new_setting(old: str, pm: PluginManager, tmp_path: Path) -> None:
    new, value, _ = ALIASES[old]
    config = resolve_settings(load_config(write(tmp_path, nested(old, value))), pm)
    assert setting(config, new) == value
    dump = config.model_dump(mode="json")
    section, field = old.split(".")
    assert dump["plugins"][new.split(".")[1]][field] == value
    assert dump[section][field] == value  # the alias mirrors it


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_the_new_key_sets_the_setting_and_its_alias(old: str, pm: PluginManager, tmp_path: Path) -> None:
    new, value, _ = ALIASES[old]
    config = resolve_settings(load_config(write(tmp_path, nested(new, value))), pm)
    assert setting(config, new) == value
    section, field = old.split(".")
    assert config.model_dump(mode="json")[section][field] == value


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_alias_and_new_key_with_different_values_fail_naming_both(old: str, pm: PluginManager,
                                                                 tmp_path: Path) -> None:
    new, value, other = ALIASES[old]
    data = nested(new, value)
    data.update(nested(old, other))
    with pytest.raises(ConfigError) as err:
        resolve_settings(load_config(write(tmp_path, data)), pm)
    assert f"  {old}: set to {other!r}, but its new place {new} is set to {value!r}; remove one of them" in str(err.value)


def test_alias_and_new_key_with_the_same_value_agree(pm: PluginManager, tmp_path: Path) -> None:
    path = write(tmp_path, {"audit": {"knn_k": 9}, "plugins": {"ood": {"knn_k": 9}}})
    assert resolve_settings(load_config(path), pm).plugin_settings("ood").knn_k == 9


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"plugins": {"ood": {"knn": 3}}}, r"plugins\.ood\.knn: unknown field"),
        ({"plugins": {"subgroups": {"min_group": 3}}}, r"plugins\.subgroups\.min_group: unknown field"),
        ({"subgroups": {"atributes": ["sex"]}}, r"subgroups\.atributes: unknown field"),
        ({"plugins": {"retina": {"x": 1}}},
         r'plugins\.retina: plugin "retina" is not installed \(plugins with settings: calibration, ood, subgroups\)'),
        ({"plugins": {"mri": {}}}, r'plugins\.mri: plugin "mri" is installed but declares no settings'),
        ({"plugins": {"calibration": {"n_bins": 1}}}, r"plugins\.calibration\.n_bins: Input should be greater than or equal to 2"),
        ({"audit": {"n_bins": 1}}, r"audit\.n_bins: Input should be greater than or equal to 2"),  # the key the user wrote
        ({"subgroups": {"bins": {"age": ["x"]}}}, r"subgroups\.bins\.age\.0: Input should be a valid number"),
        ({"subgroups": {"permutations": "many"}},
         r"subgroups\.permutations: Value error, permutations must be auto or a number of permutations"),
        ({"plugins": {"subgroups": {"permutations": -1}}},
         r"plugins\.subgroups\.permutations: Value error, permutations must be auto or a number of permutations"),
        ({"plugins": {"ood": None}, "audit": {"knn_k": 0}}, r"audit\.knn_k: Input should be greater than or equal to 1"),
    ],
)
def test_invalid_plugin_settings_name_the_key(data: dict[str, Any], pattern: str, pm: PluginManager,
                                              tmp_path: Path) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=pattern) as err:
        resolve_settings(load_config(path), pm)
    assert str(err.value).startswith(f"invalid configuration in {path}:")


def test_every_error_is_reported_at_once(pm: PluginManager, tmp_path: Path) -> None:
    path = write(tmp_path, {"plugins": {"ood": {"knn": 3}, "calibration": {"bins": 3}}, "subgroups": {"atributes": []}})
    with pytest.raises(ConfigError) as err:
        resolve_settings(load_config(path), pm)
    assert len(str(err.value).splitlines()) == 4


def test_alias_without_a_plugin_reading_it_is_an_error(tmp_path: Path) -> None:
    from medaudit.plugins import ood

    only_ood = get_plugin_manager(autoload=False, extra=[("ood", ood)])
    with pytest.raises(ConfigError, match=r"audit\.n_bins: no installed plugin reads this alias .*plugins with settings: ood"):
        resolve_settings(load_config(write(tmp_path, {"audit": {"n_bins": 10}})), only_ood)
    # unset, it stays unset, and the core falls back to MetricContext's default bin count
    assert resolve_settings(Config(), only_ood).audit.n_bins is None


def test_unresolved_config_says_what_to_call() -> None:
    with pytest.raises(ConfigError, match=r"resolve_settings\(config, plugin_manager\)"):
        Config().plugin_settings("ood")


def test_resolving_twice_changes_nothing(pm: PluginManager) -> None:
    config = resolve_settings(load_config(EXAMPLE), pm)
    first = config.model_dump(mode="json")
    assert resolve_settings(config, pm).model_dump(mode="json") == first
    assert first["plugins"]["subgroups"]["attributes"] == ["hemisphere", "level"]  # from the example's `subgroups:`
    # a config rebuilt from its dump (results.json, or shipped to another process) resolves to the same
    rebuilt = resolve_settings(Config.model_validate(first), pm)
    assert rebuilt.model_dump(mode="json") == first
    assert rebuilt.plugin_settings("subgroups") == config.plugin_settings("subgroups")


# ---------------------------------------------------------------------------------------------
# Declarations a plugin gets wrong are named
# ---------------------------------------------------------------------------------------------


class _Returns:
    def __init__(self, model: Any) -> None:
        self.model = model

    @hookimpl
    def medaudit_settings(self) -> Any:
        return self.model


class _ClaimsSeed(PluginSettings):
    seed: int = Field(0, json_schema_extra=legacy_key("audit.seed"))


class _ClaimsKnn(PluginSettings):
    k: int = Field(5, json_schema_extra=legacy_key("audit.knn_k"))


@pytest.mark.parametrize(
    ("model", "pattern"),
    [
        (dict, r'plugin "bad" returned .*dict.* from medaudit_settings; expected a pydantic model class'),
        (_ClaimsSeed, r"plugin \"bad\" declares its setting 'seed' as the alias of 'audit\.seed', which is not a key"),
        (_ClaimsKnn, r'plugins "ood" and "bad" both declare a setting with the alias \'audit\.knn_k\''),
    ],
)
def test_bad_declarations_name_the_plugin(model: Any, pattern: str) -> None:
    from medaudit.plugins import ood

    pm = get_plugin_manager(autoload=False, extra=[("ood", ood), ("bad", _Returns(model))])
    with pytest.raises(PluginError, match=pattern):
        resolve_settings(Config(), pm)


# ---------------------------------------------------------------------------------------------
# A third-party plugin declares settings and reads them in its metric
# ---------------------------------------------------------------------------------------------


class ScaleSettings(BaseModel):  # any pydantic model works; unknown keys are still rejected
    scale: float = 1.0
    label: str = "x"


class ScaledAccuracy(Metric):
    name: ClassVar[str] = "scaled_accuracy"
    tasks: ClassVar[tuple[str, ...]] = ("multiclass",)

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        hit = (probs.argmax(dim=1) == labels.to(probs.device)).double()
        w = weights.to(probs.device, torch.float64)
        return {"scaled_accuracy": self.scale * (w @ hit) / w.sum(dim=1)}


class ScalePlugin:
    @hookimpl
    def medaudit_settings(self) -> type[BaseModel]:
        return ScaleSettings

    @hookimpl
    def medaudit_metrics(self, config: Config) -> list[Metric]:
        return [ScaledAccuracy(config.plugin_settings("scaler").scale)]


def test_hook_medaudit_settings(tmp_path: Path) -> None:
    pm = get_plugin_manager(extra=[("scaler", ScalePlugin())], warn=lambda m: None)
    overrides = {"output.dir": str(tmp_path / "out"), "audit.suites": [], "audit.bootstrap": 0,
                 "output.report": False}
    path = write(tmp_path, {**yaml.safe_load(EXAMPLE.read_text()), "plugins": {"scaler": {"scale": 2.0}}})
    results = run_audit(pm, MODEL, DATA, load_config(path, overrides), command="x").model_dump(mode="json")
    clean = results["scenarios"][0]["metrics"]
    assert clean["scaled_accuracy"]["value"] == pytest.approx(2 * clean["accuracy"]["value"], abs=1e-12)
    assert results["config"]["plugins"]["scaler"] == {"scale": 2.0, "label": "x"}

    bad = write(tmp_path, {"plugins": {"scaler": {"scael": 2.0}}})
    with pytest.raises(ConfigError, match=r"plugins\.scaler\.scael: unknown field"):
        resolve_settings(load_config(bad), pm)


# ---------------------------------------------------------------------------------------------
# Command line: run, config-schema, init
# ---------------------------------------------------------------------------------------------


def test_run_rejects_a_bad_plugin_section_before_any_output(tmp_path: Path) -> None:
    config = write(tmp_path, {"plugins": {"ood": {"knn": 3}}})
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(MODEL), "--data", str(DATA), "--config", str(config),
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "plugins.ood.knn: unknown field" in result.output
    assert not out.exists()


@pytest.mark.parametrize("where", ["alias", "new", "none"])
def test_subgroup_flag_extends_the_attributes_where_the_file_sets_them(where: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import medaudit.audit

    seen: list[Config] = []

    def fake_run_audit(pm: Any, model: Any, data: Any, config: Config, **kwargs: Any) -> Any:
        seen.append(config)
        raise ConfigError("stop")

    monkeypatch.setattr(medaudit.audit, "run_audit", fake_run_audit)
    data = {"alias": {"subgroups": {"attributes": ["site"]}},
            "new": {"plugins": {"subgroups": {"attributes": ["site"]}}}, "none": {}}[where]
    config = write(tmp_path, data)
    result = CliRunner().invoke(cli, ["run", str(MODEL), "--data", str(DATA), "--config", str(config),
                                      "--subgroup", "sex", "--subgroup", "site"])
    assert result.exit_code == 2 and "stop" in result.output, result.output
    expected = ["sex", "site"] if where == "none" else ["site", "sex"]
    assert seen[0].plugin_settings("subgroups").attributes == expected


def test_config_schema_includes_plugin_settings() -> None:
    result = CliRunner().invoke(cli, ["config-schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    assert set(schema["properties"]) >= {"model", "input", "task", "audit", "checks", "output", "plugins"}
    plugins = schema["$defs"][schema["properties"]["plugins"]["$ref"].rsplit("/", 1)[1]]
    assert plugins["additionalProperties"] is False
    assert set(plugins["properties"]) >= {"calibration", "ood", "subgroups"}
    ood = schema["$defs"][plugins["properties"]["ood"]["$ref"].rsplit("/", 1)[1]]
    assert ood["properties"]["knn_k"]["default"] == 50
    assert ood["properties"]["knn_k"]["legacy_key"] == "audit.knn_k"


def test_init_writes_every_builtin_setting_and_loads(pm: PluginManager, tmp_path: Path) -> None:
    path = tmp_path / "medaudit.yaml"
    result = CliRunner().invoke(cli, ["init", str(path)])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load(path.read_text())
    assert written["plugins"] == {
        "calibration": {"n_bins": 15},
        "ood": {"energy_temperature": 1.0, "knn_k": 50, "auroc_ci": "bootstrap", "odin": False,
                "odin_temperature": 1000.0, "odin_epsilon": 0.0014},
        "subgroups": {"attributes": [], "intersections": [], "bins": {}, "min_group_size": 30, "permutations": "auto",
                      "holm_family": "audit"},
    }
    assert "# bins of the calibration metrics; alias: audit.n_bins" in path.read_text()
    config = resolve_settings(load_config(path), pm)
    assert config.model_dump(mode="json")["plugins"] == written["plugins"]
    # an edited value is read from its new place
    path.write_text(path.read_text().replace("knn_k: 50", "knn_k: 7"))
    assert resolve_settings(load_config(path), pm).plugin_settings("ood").knn_k == 7
