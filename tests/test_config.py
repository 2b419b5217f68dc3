"""Config validation: errors name the field and the allowed values; files and overrides merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medaudit.config import STARTER_CONFIG, Config, load_config
from medaudit.errors import ConfigError


def test_defaults_are_valid() -> None:
    cfg = Config()
    assert cfg.audit.severities == [1, 2, 3, 4, 5]
    assert cfg.audit.bootstrap == 1000


def test_starter_config_is_valid_yaml_and_config(tmp_path: Path) -> None:
    path = tmp_path / "medaudit.yaml"
    path.write_text(STARTER_CONFIG)
    cfg = load_config(path)
    assert cfg.input.modality == "mri"
    assert yaml.safe_load(STARTER_CONFIG)["task"]["type"] == "multiclass"


def test_unknown_field_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("audit:\n  sead: 3\n")
    with pytest.raises(ConfigError, match=r"audit\.sead: unknown field"):
        load_config(path)


def test_bad_literal_lists_allowed_values(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  output: scores\n")
    with pytest.raises(ConfigError, match=r"model\.output: .*'auto', 'logits' or 'probabilities'"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("audit:\n  severities: [0, 6]\n", r"audit\.severities.*1\.\.5"),
        ("audit:\n  device: gpu\n", r"audit\.device.*auto, cpu, cuda or cuda:N"),
        ("input:\n  dims: 2\n  spatial_size: [8, 8, 8]\n", r"spatial_size has 3 values but input\.dims is 2"),
        ("input:\n  channels: 3\n  mean: [0.1, 0.2]\n", r"input\.mean needs 1 or 3 values"),
        ("task:\n  classes: [a, a]\n", r"task\.classes must be unique"),
        ("input:\n  intensity:\n    scaling: percentile\n    low: 90\n    high: 10\n", r"intensity\.low \(90\.0\) must be below"),
    ],
)
def test_invalid_values(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        load_config(path)


def test_toml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[audit]\nseed = 3\nbatch_size = 8\n[task]\nclasses = ["x", "y"]\n')
    cfg = load_config(path, {"audit.seed": 7, "audit.batch_size": None, "output.dir": "elsewhere"})
    assert cfg.audit.seed == 7  # flag wins
    assert cfg.audit.batch_size == 8  # None leaves the file's value
    assert str(cfg.output.dir) == "elsewhere"
    assert cfg.task.classes == ["x", "y"]


def test_malformed_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("audit: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml is not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"nope\.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_schema_lists_sections() -> None:
    schema = Config.model_json_schema()
    assert set(schema["properties"]) >= {"model", "input", "task", "audit", "subgroups", "checks", "output"}
    json.dumps(schema)


def test_a_key_given_twice_in_yaml_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("audit:\n  seed: 1\ninput:\n  dims: 2\naudit:\n  bootstrap: 10\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml.*key 'audit' appears twice.*first on line 1"):
        load_config(path)
    nested = tmp_path / "nested.yaml"
    nested.write_text("audit:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"key 'seed' appears twice"):
        load_config(nested)


@pytest.mark.parametrize("written", ["MRI", "Mri", " ct ", "XRay"])
def test_modality_names_are_case_insensitive(tmp_path: Path, written: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(f"input:\n  modality: '{written}'\n")
    assert load_config(path).input.modality == written.strip().lower()


def test_input_dims_auto_is_the_default_and_checks_spatial_size(tmp_path: Path) -> None:
    assert Config().input.dims == "auto"
    assert yaml.safe_load(STARTER_CONFIG)["input"]["dims"] == "auto"
    path = tmp_path / "c.yaml"
    path.write_text("input:\n  spatial_size: [8, 8, 8]\n")
    assert load_config(path).input.spatial_size == [8, 8, 8]  # auto: 3-D data will have to match it
    path.write_text("input:\n  spatial_size: [8, 8, 8, 8]\n")
    with pytest.raises(ConfigError, match=r"input: .*spatial_size needs 2 \(H, W\) or 3 \(D, H, W\) values, got 4"):
        load_config(path)
    path.write_text("input:\n  dims: 4\n")
    with pytest.raises(ConfigError, match=r"input\.dims: .*2, 3 or 'auto'"):
        load_config(path)
    assert load_config(path, {"input.dims": 3}).input.dims == 3
