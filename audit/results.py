"""results.json: the schema-versioned, machine-readable result of an audit.

The pydantic models below are the single definition: ``medaudit/schemas/results.schema.json``
is generated from them (``python -m medaudit.results`` rewrites it; a test checks it is current),
and every results.json medaudit writes or reads is validated against them.

Keys that differ between two runs of the same audit (``created_at``, ``command``, ``timing``,
``environment.device_name``) are listed in :data:`VOLATILE_KEYS`; everything else is a function of
the model, the data, the config and the seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import MedauditError

SCHEMA_VERSION = "1.0"
VOLATILE_KEYS = ("created_at", "command", "timing", "environment")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Estimate(_Model):
    """A point estimate with its percentile-bootstrap confidence interval (None: undefined)."""

    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None


class Drop(Estimate):
    """Change from clean (``clean - perturbed`` for higher-is-better metrics, so positive = worse)."""

    relative: float | None = None
    significant: bool = False


class ParamSummary(_Model):
    min: float
    mean: float
    max: float


class ScenarioResult(_Model):
    id: str
    suite: str | None
    perturbation: str | None
    severity: int
    n_samples: int
    metrics: dict[str, Estimate]
    drop: dict[str, Drop] = Field(default_factory=dict)
    ood: dict[str, dict[str, Estimate]] = Field(default_factory=dict)
    failure_detection: dict[str, Estimate] = Field(default_factory=dict)
    params: dict[str, ParamSummary] = Field(default_factory=dict)
    curves: dict[str, Any] = Field(default_factory=dict)
    throughput: float | None = Field(None, description="samples per second of this scenario's forward passes")


class ModelInfo(_Model):
    path: str
    sha256: str
    format: str
    num_parameters: int
    task: str
    classes: list[str]
    dtype: str = ""
    summary: str = ""
    output_kind: str = ""
    name: str | None = None
    description: str | None = None
    intended_use: str | None = None


class DatasetInfo(_Model):
    path: str
    sha256: str
    n_samples: int
    class_counts: dict[str, int]
    metadata_columns: list[str]
    format: str = ""
    metadata_summary: dict[str, dict[str, int]] = Field(default_factory=dict)


class Environment(_Model):
    python: str
    torch: str
    device: str
    plugins: dict[str, str]
    platform: str = ""
    device_name: str = ""
    precision: str = "fp32"
    memory_format: str = Field("contiguous", description="memory format of the forward passes: contiguous or channels_last")
    threads: int | None = Field(None, description="CPU threads torch used (torch.get_num_threads())")


class Check(_Model):
    expr: str
    value: float | None
    passed: bool
    threshold: float | None = None
    error: str | None = None


class SubgroupResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    scenario: str
    attribute: str
    group: str
    n: int
    metrics: dict[str, Estimate] = Field(default_factory=dict)


class Timing(_Model):
    total_seconds: float = Field(description="from the start of the run to the finished results (report rendering excluded)")
    forward_seconds: float
    samples_per_second: float
    phases: dict[str, float] = Field(
        default_factory=dict,
        description="wall seconds of the run's phases, in order: startup (process start to the audit: interpreter, "
                    "imports, arguments; Linux only), prepare (loading, dry run), forward (perturbing "
                    "and the model, detector embeddings), external (--reference / --ood-data: forward and scoring), preview (the "
                    "example grid), detectors, metrics (with bootstrap), analyses (subgroups and other analysis "
                    "plugins), calibration (temperature scaling), and, in results.json only, report (rendering the report)")


class Results(_Model):
    schema_version: str = SCHEMA_VERSION
    medaudit_version: str
    created_at: str
    command: str
    seed: int
    model: ModelInfo
    dataset: DatasetInfo
    environment: Environment
    scenarios: list[ScenarioResult]
    subgroups: list[SubgroupResult] = Field(default_factory=list)
    checks: list[Check] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    metric_directions: dict[str, bool] = Field(default_factory=dict, description="metric key -> higher is better")
    perturbation_catalogue: list[dict[str, Any]] = Field(default_factory=list)
    robustness: dict[str, Any] = Field(default_factory=dict)
    calibration: dict[str, Any] = Field(default_factory=dict)
    analyses: dict[str, Any] = Field(default_factory=dict, description="results of analysis plugins by key")
    warnings: list[str] = Field(default_factory=list)
    timing: Timing | None = None
    assets: dict[str, str] = Field(default_factory=dict, description="base64 images the report embeds")


def clean_floats(obj: Any) -> Any:
    """Replace NaN/Inf by None and tensors/numpy scalars by plain floats, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_floats(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return clean_floats(obj.item())
    return obj


def dumps(results: Results) -> str:
    return json.dumps(clean_floats(results.model_dump(mode="json")), indent=2, ensure_ascii=False) + "\n"


def load_results(path: Path) -> Results:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedauditError(f"{path}: no such results file") from None
    except json.JSONDecodeError as exc:
        raise MedauditError(f"{path}: not valid JSON ({exc})") from None
    try:
        return Results.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise MedauditError(f"{path}: not a medaudit results file ({loc}: {first['msg']}; {exc.error_count()} problem(s))") from None


def json_schema() -> dict[str, Any]:
    schema = Results.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://medaudit.dev/schemas/results-{SCHEMA_VERSION}.json"
    return schema


SCHEMA_PATH = Path(__file__).parent / "schemas" / "results.schema.json"

if __name__ == "__main__":
    SCHEMA_PATH.write_text(json.dumps(json_schema(), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}")
