"""results.json: the schema-versioned, machine-readable result of an audit.

The pydantic models below are the single definition: ``medaudit/schemas/results.schema.json``
is generated from them (``python -m medaudit.results`` rewrites it; a test checks it is current),
and every results.json medaudit writes or reads is validated against them.

Keys that differ between two runs of the same audit (``created_at``, ``command``, ``timing``,
``environment.device_name``, ``integrity``) are listed in :data:`VOLATILE_KEYS`; everything else is a function of
the model, the data, the config and the seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import MedauditError

if TYPE_CHECKING:
    from .metric import Metric

SCHEMA_VERSION = "1.0"
VOLATILE_KEYS = ("created_at", "command", "timing", "environment", "integrity")
#: What describes how an audit ran rather than the model: besides :data:`VOLATILE_KEYS`, the report's
#: images (a throughput figure), each scenario's throughput and these config settings (dotted) — the
#: executor, the shard layout, and where the outputs and the shard cache go.
RUN_KEYS = (*VOLATILE_KEYS, "assets")
RUN_CONFIG_KEYS = ("audit.executor", "audit.ray", "audit.shard_size", "output.dir", "output.cache_dir")


def audit_content(results: dict[str, Any]) -> dict[str, Any]:
    """A results.json (as loaded from JSON) without :data:`RUN_KEYS`, scenario throughputs and
    :data:`RUN_CONFIG_KEYS`: what two audits of the same model, data, config and seed share whatever
    executor, number of Ray workers or shard size ran them (docs/scale-out.md). The input is not changed."""
    out = {k: v for k, v in results.items() if k not in RUN_KEYS}
    config = out["config"] = {section: dict(values) if isinstance(values, dict) else values
                              for section, values in results.get("config", {}).items()}
    for dotted in RUN_CONFIG_KEYS:
        section, _, key = dotted.partition(".")
        if isinstance(config.get(section), dict):
            config[section].pop(key, None)
    out["scenarios"] = [{k: v for k, v in s.items() if k != "throughput"} for s in results.get("scenarios", [])]
    return out


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
    flagged_errors: dict[str, Estimate] = Field(
        default_factory=dict, description="per detector: the share of this scenario's wrong predictions it flags at "
                                          "the threshold that lets 95% of clean inputs through")
    epd: dict[str, Estimate] = Field(
        default_factory=dict, description="per detector: the performance drop (accuracy, or Dice, points) that "
                                          "referring its flagged inputs to a human would prevent at the threshold that "
                                          "lets 95% of clean inputs through (after Vasiliuk et al. 2023; docs/ood.md)")
    representation: dict[str, Estimate] = Field(
        default_factory=dict, description="representation robustness of a perturbed scenario against clean "
                                          "(medaudit.representation): cosine (median per-sample cosine similarity of "
                                          "perturbed to clean embeddings), cka (linear CKA of the two embedding sets), "
                                          "knn_consistency (share of samples whose k nearest clean-reference neighbours "
                                          "vote the same class before and after); empty when not measured")
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
    task_capabilities: list[str] | None = Field(
        None, description="what the task declares applies (medaudit.task capabilities, e.g. calibration, "
                          "subgroups); report sections consult it; None in results written before tasks declared them")
    dtype: str = ""
    summary: str = ""
    output_kind: str = ""
    name: str | None = None
    description: str | None = None
    intended_use: str | None = None
    feature_layer: str | None = Field(None, description="the layer feature-based detectors read (model.feature_layer, "
                                                        "'auto' resolved), or null")
    feature_layer_source: str | None = Field(None, description="config (named by the user), auto (chosen by medaudit) "
                                                               "or none")
    feature_layer_note: str | None = Field(None, description="how the layer was chosen, or why none was")
    head: str | None = Field(None, description="the linear classification head verified on the feature layer (its "
                                               "module name), which head-based detectors recompute logits with")
    feature_layers: list[str] | None = Field(None, description="the layers multi-layer detectors (spectral, "
                                                               "mahalanobis_ensemble) read, shallow to deep, or null")
    feature_layers_source: str | None = Field(None, description="config, auto (the last layer at each of the main "
                                                                "resolutions), layer (the feature layer alone) or none")
    feature_layers_note: str | None = Field(None, description="how the stages were chosen, or why none were")
    output_key: str | int | None = Field(None, description="model.output_key: the element of a tuple, dict or "
                                                           "model-output object that was audited, or null (a tensor)")
    tokens: dict[str, dict[str, Any]] | None = Field(
        None, description="per captured token layer ([B, T, C] output of a transformer block): prefix (CLS + register "
                          "tokens), cls, registers, how the layout was found (source) and the pooling feature detectors "
                          "read; null when no token layer was captured")
    probe: dict[str, Any] | None = Field(
        None, description="task.type embedding: the probes fitted on the --reference embeddings (kind, the linear "
                          "probe's C, scaling, solver and convergence, the k-NN probe's k and metric, the reference's "
                          "size and SHA-256); null for other tasks")
    representation: dict[str, Any] | None = Field(
        None, description="what the representation measures read (source: the feature layer's pooled output or the "
                          "encoder's embeddings; dim), the k of the k-NN consistency and its reference; null when not measured")


class DatasetInfo(_Model):
    path: str
    sha256: str
    n_samples: int
    class_counts: dict[str, int]
    metadata_columns: list[str]
    format: str = ""
    metadata_summary: dict[str, dict[str, int]] = Field(default_factory=dict)
    metadata_numeric: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="numeric metadata columns (more than 10 distinct values): n, missing, mean, "
                                          "min, q1, median, q3, max; absent from older results files")


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
    threads_reason: str | None = Field(None, description="why that many: audit.threads, torch's default, or what "
                                                         "audit.threads: auto measured in the dry run")
    executor: dict[str, Any] | None = Field(
        None, description="who ran the units of work: executor (local | ray); for ray the cluster's nodes, workers, "
                          "CPUs and GPUs used, the worker processes, units re-run after a worker died and each unit's "
                          "seconds and forward passes per second (medaudit.runner.ray_executor)")


class Check(_Model):
    expr: str
    value: float | None
    passed: bool
    threshold: float | None = None
    error: str | None = None
    scenario: str | None = Field(None, description="the scenario whose value decided the check (for a wildcard check "
                                                   "the worst one, or the first where the value is undefined); None "
                                                   "for subgroup and perturbation-ran checks")
    noninferior: bool = Field(False, description="a non-inferiority check (suffix noninferior): decided by the upper "
                                                 "bound of the drop's interval, not its point estimate")
    upper_bound: float | None = Field(None, description="non-inferiority: the upper end of the paired drop's interval "
                                                        "in the deciding scenario (the highest over a wildcard)")
    p_value: float | None = Field(None, description="non-inferiority: one-sided bootstrap p-value of H0 'drop >= "
                                                    "margin', (1 + #{resampled drops >= margin}) / (1 + R)")


class SubgroupResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    scenario: str
    attribute: str
    group: str
    n: int
    metrics: dict[str, Estimate] = Field(default_factory=dict)


class WarningRecord(_Model):
    """One warning of the run, as data: the report groups and counts these, never parses ``message``.

    ``message`` is the exact string also listed in ``Results.warnings`` (kept for readers of
    older results files and for humans).
    """

    code: str = Field(description="stable kebab-case kind, e.g. detector-skipped, plugin-load-failed, small-sample")
    message: str
    plugin: str | None = Field(None, description="the plugin the warning is about or came from; None: medaudit itself")
    scenario: str | None = Field(None, description="the scenario it concerns, if one")
    subject: str | None = Field(None, description="what it concerns by name: a detector, metric, perturbation, "
                                                  "plugin or metadata column")
    alert: bool = Field(False, description="the warning may invalidate the evidence (e.g. a model near chance): shown "
                                           "as a banner above the report's summary and printed on the console")
    impact: str | None = Field(None, description="what the warning means for the evidence, in one sentence (the report's "
                                                 "Limitations show it; medaudit supplies it for its own codes)")


class MetricInfo(_Model):
    """How one metric key is shown: declared by its :class:`~medaudit.metric.Metric` family."""

    family: str = Field(description="name of the Metric family that emits the key")
    plugin: str = Field(description="the plugin that provides the family")
    higher_is_better: bool
    headline: bool = Field(False, description="shown in the report's standard tables")
    order: int | None = Field(None, description="rank among the headline keys (0 = primary metric); None if not headline")
    lead: bool = Field(False, description="the family's first headline key: drawn in the degradation curves and mCE table")
    digits: int = Field(3, description="decimal digits shown")
    percent: bool = Field(False, description="shown multiplied by 100 with a % sign")
    definition: str | None = Field(None, description="plain-text definition the family declares for the key (or its "
                                                     "prefix before '/'); listed in the report's appendix")


def metric_info(families: dict[str, Metric], owners: dict[int, str]) -> dict[str, MetricInfo]:
    """The display declaration of every key in ``families`` (key -> the Metric that emits it).

    Headline keys are ranked by their family's ``headline_order``, then by the order of the
    families, then by their place in the family's ``headline``; keys a family declares but did
    not emit are skipped, so the primary metric (rank 0) is always one the results hold.
    ``owners`` maps ``id(metric)`` to the plugin that provides it.
    """
    order = list(dict.fromkeys(families.values()))  # families in the order they first emitted
    ranked = sorted((m.headline_order, order.index(m), m.headline.index(key), key)
                    for key, m in families.items() if key in m.headline)
    rank = {key: n for n, (*_, key) in enumerate(ranked)}
    leads: dict[Metric, str] = {}
    for *_, key in ranked:  # a family's first ranked key is its lead
        leads.setdefault(families[key], key)
    return {key: MetricInfo(family=m.name, plugin=owners.get(id(m), type(m).__module__),
                            higher_is_better=m.higher_is_better, headline=key in rank, order=rank.get(key),
                            lead=leads.get(m) == key, digits=m.digits, percent=m.percent,
                            definition=m.definitions.get(key, m.definitions.get(key.split("/")[0])))
            for key, m in families.items()}


class Timing(_Model):
    total_seconds: float = Field(description="from the start of the run to the finished results (report rendering excluded)")
    forward_seconds: float
    samples_per_second: float
    phases: dict[str, float] = Field(
        default_factory=dict,
        description="wall seconds of the run's phases, in order: startup (process start to the audit: interpreter, "
                    "imports, arguments; Linux only), prepare (loading, dry run), forward (perturbing "
                    "and the model, detector embeddings), external (--reference / --ood-data: forward and scoring), preview (the "
                    "example grid, and the overlays of a segmentation audit), detectors, metrics (with bootstrap), analyses (subgroups and other analysis "
                    "plugins), calibration (temperature scaling), and, in results.json only, report (rendering the report)")


class Results(_Model):
    schema_version: str = SCHEMA_VERSION
    medaudit_version: str
    created_at: str
    command: str
    config_path: str | None = Field(None, description="the config file the audit read (given with --config, or "
                                                      "./medaudit.yaml / ./medaudit.toml found); None: defaults and "
                                                      "command-line options only")
    seed: int
    protocol: dict[str, Any] | None = Field(
        None, description="the frozen audit protocol the audit ran under (--protocol): name, version, sha256 of its "
                          "content, conformant (false with --protocol-override, listing the overridden keys in "
                          "overrides); null: no protocol")
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
    warning_records: list[WarningRecord] = Field(
        default_factory=list, description="the warnings as records (code, plugin, scenario, subject, message), in the "
                                          "order of warnings; absent from older results files")
    metric_info: dict[str, MetricInfo] = Field(
        default_factory=dict, description="metric key -> how it is shown (headline, order, format, direction, plugin); "
                                          "absent from older results files")
    ood_recommendation: dict[str, Any] | None = Field(
        None, description="the detector to deploy and its threshold (the clean score below which 95% of clean inputs "
                          "fall), ranked by the share of errors it flags under realistic perturbations (else by epd), "
                          "with the ranking and per-scenario evidence (medaudit.referral); null when no detector has "
                          "harm statistics")
    verdict: dict[str, Any] = Field(
        default_factory=dict, description="status (alert | fail | concerns | pass | no-checks), headline, check counts "
                                          "and the perturbations that break a headline metric (medaudit.verdict); "
                                          "absent from older results files")
    timing: Timing | None = None
    assets: dict[str, str] = Field(default_factory=dict, description="base64 images the report embeds (`<name>_png`), "
                                   "with the alt text of an overlay (`overlay_<position>_alt`)")
    integrity: dict[str, Any] | None = Field(
        None, description="the seal of the output folder (medaudit.integrity; checked by `medaudit verify`): algorithm "
                          "(sha256), results_sha256 (of this object without integrity, as JSON with sorted keys, no "
                          "white space, UTF-8) and files (path relative to the folder -> SHA-256 of every other file "
                          "the audit wrote); never shown in the report; null: not sealed")


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
