"""The audit configuration: one pydantic model, read from YAML or TOML, overridden by CLI flags.

Every section forbids unknown keys, so a typo is an error that names the field instead of a
setting silently ignored.

Plugins own their settings: ``plugins.<entry-point name>`` holds a section per plugin, validated
against the model the plugin declares (:mod:`medaudit.settings`) once plugins are loaded. A few
core keys (``audit.n_bins``, ``audit.energy_temperature``, ``audit.knn_k``, the ``subgroups``
section) were plugin settings before plugins had sections; they stay accepted as aliases that a
plugin's settings model claims, and after resolution they mirror the value in use, so code and
results.json that read them keep working.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import ConfigError

Modality = Literal["mri", "ct", "xray", "dermoscopy", "pathology", "generic"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


#: Marks a core key kept only as the alias of a plugin setting (see :mod:`medaudit.settings`):
#: the core validates nothing in it, the plugin whose settings model names it as a
#: ``legacy_key`` does, and only such keys may be claimed.
PLUGIN_ALIAS: dict[str, Any] = {"plugin_alias": True}
_ALIAS_READER = ("read by the plugin setting that names it as its legacy_key (`medaudit config-schema`, under "
                 "plugins); after loading it holds the value in use")
_ALIAS_HELP = "alias kept for existing config files, " + _ALIAS_READER


class IntensityConfig(_Section):
    """How raw pixel values become the ``[0, 1]`` range perturbations work in.

    ``minmax``: per image, min → 0 and max → 1. ``percentile``: per image, the ``low``/``high``
    percentiles → 0/1, clipped. ``window``: CT window (``level``, ``width`` in HU) → 0/1,
    clipped. ``fixed``: divide by ``max_value`` (e.g. 255). ``none``: data already in [0, 1].
    """

    scaling: Literal["minmax", "percentile", "window", "fixed", "none"] = "minmax"
    low: float = Field(0.5, ge=0, le=100, description="lower percentile for 'percentile'")
    high: float = Field(99.5, ge=0, le=100, description="upper percentile for 'percentile'")
    level: float = Field(40.0, description="window level (HU) for 'window'")
    width: float = Field(400.0, gt=0, description="window width (HU) for 'window'")
    max_value: float = Field(255.0, gt=0, description="divisor for 'fixed'")

    @model_validator(mode="after")
    def _order(self) -> "IntensityConfig":
        if self.scaling == "percentile" and self.low >= self.high:
            raise ValueError(f"intensity.low ({self.low}) must be below intensity.high ({self.high})")
        return self


#: ``input.preset``: what pretrained vision backbones expect, so nobody copies normalisation
#: constants by hand. ImageNet statistics: torchvision's reference models (and DINOv2, trained with
#: them: facebookresearch/dinov2 ``data/transforms.py``); CLIP: OpenAI CLIP's preprocessing
#: (``clip/clip.py``). Every preset takes 3 channels at 224², the resolution these models were
#: trained at; a grey image is replicated to the three channels after it is perturbed
#: (:mod:`medaudit.data`).
INPUT_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {"channels": 3, "spatial_size": [224, 224], "dims": 2,
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "clip": {"channels": 3, "spatial_size": [224, 224], "dims": 2,
             "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    "dinov2": {"channels": 3, "spatial_size": [224, 224], "dims": 2,
               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
}


class InputConfig(_Section):
    """The model's input spec."""

    preset: Literal["imagenet", "clip", "dinov2"] | None = Field(
        None, description="input spec of a pretrained backbone: 3 channels at 224x224 with ImageNet (imagenet, dinov2) "
                          "or CLIP (clip) normalisation; input.channels, spatial_size, dims, mean and std set beside it "
                          "override the preset's values")
    modality: Modality = "generic"
    dims: Literal[2, 3, "auto"] = Field(
        "auto", description="spatial dimensions of one image: 2, 3, or auto (inferred from the data when it is opened: "
                            "a NIfTI volume or DICOM series is 3-D, a PNG 2-D, an array by its shape; results.json "
                            "records the number used)")
    channels: int = Field(1, ge=1, le=16)
    spatial_size: list[int] | None = Field(
        None, description="H, W (2D) or D, H, W (3D); images are resized to it. None keeps the data's size."
    )
    intensity: IntensityConfig = Field(default_factory=IntensityConfig)
    mean: list[float] = Field(default_factory=lambda: [0.0], description="normalisation mean per channel (or one value)")
    std: list[float] = Field(default_factory=lambda: [1.0], description="normalisation std per channel (or one value)")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        # the preset fills what the user did not write; anything written wins
        if isinstance(data, dict) and data.get("preset") in INPUT_PRESETS:
            return {**INPUT_PRESETS[data["preset"]], **data}
        return data

    @field_validator("modality", mode="before")
    @classmethod
    def _modality_case(cls, v: Any) -> Any:
        # "MRI", "CT", "X-ray" in DICOM headers and in people's configs: the names are case-insensitive
        return v.strip().lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _shapes(self) -> "InputConfig":
        if self.spatial_size is not None:
            if self.dims == "auto":
                if len(self.spatial_size) not in (2, 3):
                    raise ValueError(f"input.spatial_size needs 2 (H, W) or 3 (D, H, W) values, got {len(self.spatial_size)}")
            elif len(self.spatial_size) != self.dims:
                raise ValueError(f"input.spatial_size has {len(self.spatial_size)} values but input.dims is {self.dims}")
            if any(s < 1 for s in self.spatial_size):
                raise ValueError(f"input.spatial_size must be positive, got {self.spatial_size}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                raise ValueError(f"input.{name} needs 1 or {self.channels} values (input.channels), got {len(values)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"input.std must be positive, got {self.std}")
        return self


class TokensConfig(_Section):
    """How a transformer layer's token output ``[B, T, C]`` is read (:mod:`medaudit.tokens`)."""

    prefix: int | None = Field(None, ge=0, description="leading tokens that are not patches (CLS + registers); null: "
                                                       "from the model's parameters (cls_token, register_tokens), else "
                                                       "inferred from the token count and the input size")
    cls: bool | None = Field(None, description="whether the first token is a CLS token (with prefix; default: prefix >= 1)")
    pooling: Literal["auto", "cls", "mean"] = Field(
        "auto", description="the vector feature detectors and representation measures read from a token layer: the CLS "
                            "token, or the mean of the patch tokens (registers never); auto: cls when the model has one")


class ModelConfig(_Section):
    format: Literal["auto", "torchscript", "export", "state_dict", "onnx", "pickle"] = "auto"
    output: Literal["auto", "logits", "probabilities"] = "auto"
    arch: str | None = Field(None, description="'module:factory' building the network for a state dict")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    output_key: str | int | None = Field(
        None, description="which element of a model's output is audited when forward returns a tuple (an index), a "
                          "dict or a model-output object (a key, e.g. logits or pooler_output); null: the output must "
                          "be a tensor")
    tokens: TokensConfig = Field(default_factory=TokensConfig)
    feature_layer: str | None = Field(
        "auto", description="named submodule whose output feature-based detectors use; 'auto' (the default) finds "
                            "the layer feeding the linear classification head; null turns feature detectors off")
    feature_layers: list[str] | Literal["auto"] | None = Field(
        "auto", description="the layers multi-layer detectors (spectral, mahalanobis_ensemble) read, shallow to deep; "
                            "'auto' (the default) picks the last layer at each resolution of the network's main stages; "
                            "null: the feature layer alone. A list also sets the feature layer (its last entry), so "
                            "feature_layer must not be set beside it", min_length=1)
    name: str | None = None
    description: str | None = None
    intended_use: str | None = None
    # How the layer was chosen (medaudit.features.FeatureChoice), set by the audit once it resolved "auto".
    _feature_choice: Any = PrivateAttr(default=None)

    def captured_layers(self) -> list[str]:
        """The layers the forward pass captures once ``auto`` is resolved: the feature layer and
        the stages (each once)."""
        stages = self.feature_layers if isinstance(self.feature_layers, list) else []
        named = [self.feature_layer, *stages] if self.feature_layer not in (None, "auto") else stages
        return list(dict.fromkeys(named))


class TaskConfig(_Section):
    type: str = Field(
        "multiclass", description="the task type: binary | multiclass | multilabel | segmentation | embedding (built-in), or a task a plugin "
                                  "registers (`medaudit plugins` lists them); checked once plugins are loaded")
    classes: list[str] = Field(default_factory=list, description="class names in model-output order")
    threshold: float = Field(0.5, gt=0, lt=1, description="decision threshold for binary and multilabel tasks")
    target_specificity: float = Field(0.9, gt=0, lt=1)
    # Segmentation settings (task.type: segmentation); the classification tasks ignore them.
    background: int | None = Field(0, ge=0, description="segmentation: the class index of the background, left out of "
                                                        "the mean over foreground classes (null: every class counts)")
    activation: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="segmentation: softmax (one class per voxel) or sigmoid (independent, possibly "
                               "overlapping structures); model.output says whether it was already applied")
    ignore_empty: bool = Field(True, description="segmentation: a class absent from the reference mask gives no Dice/IoU "
                                                 "for that image (MONAI's ignore_empty); false: 1 if also absent from "
                                                 "the prediction, else 0")
    nsd_tolerance_mm: float = Field(1.0, gt=0, description="segmentation: tolerance of the normalised surface Dice, "
                                                           "in the voxel spacing's units (mm)")
    boundary_width: int = Field(2, ge=1, description="segmentation: width in voxels of the band around predicted "
                                                     "boundaries where boundary_ece is measured")
    failure_dice: float | None = Field(None, gt=0, le=1, description="segmentation: an image whose Dice falls below this "
                                                                     "is a failure for failure detection (null: 0.8 × "
                                                                     "the clean median Dice)")
    # Encoder settings (task.type: embedding): the probes fitted on the --reference embeddings.
    probe_c: float = Field(1.0, gt=0, description="embedding: inverse regularisation strength C of the linear probe "
                                                  "(scikit-learn LogisticRegression on standardised embeddings), fixed "
                                                  "and recorded: the audit has no validation split to search it on")
    probe_k: int = Field(20, ge=1, description="embedding: neighbours of the k-NN probe (cosine similarity, uniform votes)")
    # The task object of `type`, attached by medaudit.task.bind_task once plugins are loaded.
    _task: Any = PrivateAttr(default=None)

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dupes = sorted({c for c in v if v.count(c) > 1})
        if dupes:
            raise ValueError(f"task.classes must be unique, duplicated: {dupes}")
        return v


class RayConfig(_Section):
    """Where and how ``audit.executor: ray`` runs the units of work (docs/scale-out.md)."""

    address: str = Field("local", description="local (a private cluster on this machine), auto (the cluster this "
                                              "machine belongs to, as `ray start` set up) or HOST:PORT of its head")
    workers: int | None = Field(None, ge=1, description="actors that run units; None: the cluster's GPUs / "
                                                        "gpus_per_worker when that is above 0 (one per GPU at 1, two "
                                                        "at 0.5), else its CPUs / cpus_per_worker")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per actor; fractions share a GPU between "
                                                                  "actors; None: 1 when the audit runs on a GPU "
                                                                  "(one actor per GPU), else 0")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per actor (also its torch thread count)")


class AuditConfig(_Section):
    suites: list[str] | None = Field(None, description="suites to run; None picks the modality's defaults")
    perturbations: list[str] = Field(default_factory=list, description="extra perturbations by name")
    exclude: list[str] = Field(default_factory=list, description="perturbations to leave out")
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5])
    seed: int = Field(0, ge=0)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    batch_size: int = Field(64, ge=1, description="samples loaded and perturbed at once (rounded up to a multiple of model_batch_size)")
    model_batch_size: int = Field(
        32, ge=1, description="samples per model call; results are bit-identical for any batch_size at a fixed model_batch_size")
    num_workers: int | None = Field(
        None, ge=0, description="DataLoader worker processes; None: up to 4 for file-based data sets, 0 for in-memory arrays")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for confidence intervals (0: none)")
    confidence: float = Field(0.95, gt=0, lt=1)
    n_bins: Any = Field(None, description=_ALIAS_HELP, json_schema_extra=PLUGIN_ALIAS)
    detectors: list[str] | None = Field(None, description="OOD detectors to run; None runs all that apply")
    energy_temperature: Any = Field(None, description=_ALIAS_HELP, json_schema_extra=PLUGIN_ALIAS)
    knn_k: Any = Field(None, description=_ALIAS_HELP, json_schema_extra=PLUGIN_ALIAS)
    representation: bool = Field(
        True, description="representation robustness per scenario (cosine to clean, linear CKA, k-NN label "
                          "consistency of the feature layer's pooled output, or of an encoder's embeddings); keeps "
                          "one embedding per sample and scenario in memory")
    representation_k: int = Field(10, ge=1, description="neighbours of the k-NN label consistency")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    threads: int | Literal["auto"] | None = Field(
        "auto", description="CPU threads torch uses for the model and the statistics (torch.set_num_threads). auto: "
                            "the dry run times the model at 1 thread and at one per core and keeps the faster (kept at "
                            "one per core where the model's outputs differ between the two, so results never depend "
                            "on it); the choice and its reason are in results.json environment. None: torch's default, "
                            "one per core. With more threads than free cores every parallel operation waits for a "
                            "descheduled thread (one busy process on 2 cores made a 2-thread audit 6-21x slower, a "
                            "1-thread one was unaffected)")
    executor: Literal["local", "ray"] = Field(
        "local", description="who runs the units of work: local (this process) or ray (actors on a Ray cluster; "
                             "pip install 'medaudit[ray]'); results.json is the same either way")
    ray: RayConfig = Field(default_factory=RayConfig)
    shard_size: int = Field(2048, ge=1, description="samples per unit of work (rounded up to a multiple of "
                                                    "model_batch_size); results do not depend on it")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="channels-last memory format for model and inputs: true, false, or auto (on a CPU when "
                            "the model runs in it with the same outputs; its convolutions are faster there)")

    @field_validator("severities")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if s not in (1, 2, 3, 4, 5)]
        if bad or not v:
            raise ValueError(f"audit.severities must be a non-empty list of 1..5, got {v}")
        return sorted(set(v))

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> Any:
        # one message for the union (pydantic would list why each member failed); "2" from a flag is 2
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"audit.threads must be auto or a number of threads (1 or more), got {v!r}")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"audit.device must be auto, cpu, cuda or cuda:N, got {v!r}")


#: The margin of every headline metric that ``verdict.margins`` does not name, in the metric's units.
DEFAULT_MARGIN = 0.05


class VerdictConfig(_Section):
    """How the summary's robustness overview judges drops (see docs/report.md, "The verdict")."""

    margins: dict[str, float] = Field(
        default_factory=lambda: {"*": DEFAULT_MARGIN},
        description="metric key -> the drop (in the metric's units, positive = worse) that counts as breaking; "
                    "'*' is every other headline metric (default 0.05). A perturbation's breaking point is the "
                    "lowest severity whose paired drop significantly exceeds the margin (the lower end of the drop's "
                    "interval is above it).")

    @field_validator("margins")
    @classmethod
    def _margins(cls, v: dict[str, float]) -> dict[str, float]:
        negative = {k: m for k, m in v.items() if not m >= 0}
        if negative:
            raise ValueError(f"verdict.margins must be >= 0, got {negative}")
        # naming some metrics keeps the default for the others
        return {"*": DEFAULT_MARGIN, **v}


class OutputConfig(_Section):
    dir: Path = Path("medaudit-out")
    save_predictions: bool = False
    save_labelmaps: list[str] = Field(default_factory=list, description="segmentation, with save_predictions: scenarios "
                                                                      "whose predicted label maps are saved besides clean")
    report: bool = True
    cache_dir: Path | None = Field(
        None, description="where completed units of work are kept for --resume (--cache-dir; default "
                          "DIR/.medaudit-cache); a folder per audit fingerprint, so audits may share it, e.g. on "
                          "storage every machine that may drive the audit can reach")
    model_card: Path | None = Field(
        None, description="also write the audit as a Model Card Toolkit (schema 0.0.2) JSON document at this path "
                          "(--model-card); the report links it and results.json's integrity covers it")


class Config(_Section):
    """The complete description of an audit."""

    protocol: str | None = Field(
        None, description="a frozen audit protocol (`medaudit protocols` lists them, e.g. mri-v1): it pins the modality, "
                          "perturbations and their parameters, severities, seed, bootstrap, confidence, detectors and "
                          "margins; a key here or a flag that contradicts it is an error (see protocol_override)")
    protocol_override: bool = Field(
        False, description="keep settings that contradict the protocol; the audit is then recorded as not "
                           "protocol-conformant, with the overridden keys, in results.json and the report")
    model: ModelConfig = Field(default_factory=ModelConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    subgroups: dict[str, Any] | None = Field(
        None, description="aliases kept for existing config files, each key " + _ALIAS_READER, json_schema_extra=PLUGIN_ALIAS)
    checks: list[str] = Field(default_factory=list, description="--fail-on expressions")
    verdict: VerdictConfig = Field(default_factory=VerdictConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    plugins: dict[str, dict[str, Any] | None] = Field(
        default_factory=dict, description="each plugin's own settings, keyed by its entry-point name "
                                          "(e.g. plugins.ood.knn_k); after loading, every section in use with its defaults")

    #: The validated settings of every plugin that declares some, set by
    #: :func:`medaudit.settings.resolve_settings`; read through :meth:`plugin_settings`.
    _plugin_settings: dict[str, BaseModel] | None = PrivateAttr(None)
    #: Where the config came from, for error messages raised after loading (plugin sections).
    _source: str = PrivateAttr("the configuration")

    def plugin_settings(self, name: str) -> BaseModel:
        """The validated settings of plugin ``name`` (its entry-point name), defaults where unset.

        The one way a hook reads its plugin's settings, e.g. ``config.plugin_settings("ood").knn_k``.
        Available once :func:`medaudit.settings.resolve_settings` has run, which ``medaudit run``
        and :func:`medaudit.audit.prepare` do before any hook sees the config.
        """
        if self._plugin_settings is None:
            raise ConfigError(
                f'plugin settings are not resolved yet, so plugin "{name}" cannot read them; call '
                "medaudit.settings.resolve_settings(config, plugin_manager) first (medaudit run and prepare() do)")
        if name not in self._plugin_settings:
            raise ConfigError(f'plugin "{name}" declares no settings (plugins with settings: '
                              f'{", ".join(sorted(self._plugin_settings)) or "none"})')
        return self._plugin_settings[name]


UNKNOWN_FIELD = "unknown field (check the spelling; `medaudit config-schema` lists every field)"


def validation_error_lines(err: ValidationError, locate: Callable[[tuple[Any, ...]], str] | None = None) -> list[str]:
    """One ``  <dotted key>: <message>`` line per error.

    ``locate`` turns an error's location into the dotted key the user wrote (a plugin section's
    keys sit under ``plugins.<name>``, or under the alias the value came from).
    """
    lines = []
    for e in err.errors():
        loc = locate(e["loc"]) if locate else ".".join(str(p) for p in e["loc"])
        lines.append(f"  {loc or '(top level)'}: {UNKNOWN_FIELD if e['type'] == 'extra_forbidden' else e['msg']}")
    return lines


def format_validation_error(err: ValidationError, source: str) -> str:
    return "\n".join([f"invalid configuration in {source}:", *validation_error_lines(err)])


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key that appears twice in one mapping.

    Plain YAML keeps the last value silently, so a config with two ``audit:`` sections would run
    with half of the user's settings dropped; TOML already refuses duplicates.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first on line {seen[key] + 1}); "
                                "remove one, the later value would silently replace the earlier", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a YAML or TOML file into a dict (no validation)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _deep_set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build a :class:`Config` from an optional file and dotted-key overrides (CLI flags win)."""
    data = read_config_file(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _deep_set(data, key, value)
    source = str(path) if path is not None else "command-line options"
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    if isinstance(model.get("feature_layers"), list) and "feature_layer" in model:
        raise ConfigError(f"invalid configuration in {source}: model.feature_layer ({model['feature_layer']!r}) and "
                          f"model.feature_layers ({model['feature_layers']!r}) are both set; a list of feature_layers "
                          "already names the feature layer (its last, deepest entry): remove model.feature_layer")
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    config._source = source
    return config


STARTER_CONFIG = """\
# medaudit configuration. Every field is optional; CLI flags override what is set here.
# `medaudit config-schema` prints the JSON Schema with every field and its allowed values.

model:
  format: auto            # auto | torchscript | export | state_dict | onnx | pickle
  output: auto            # auto | logits | probabilities
  # feature_layer: auto     # the layer feeding the classification head; or a named submodule; null: none
  # feature_layers: auto    # stages for multi-layer detectors; or [stage1, stage2, ...] (then no feature_layer)
  # intended_use: "Triage of ... in adults; not for ..."

input:
  modality: mri           # mri | ct | xray | dermoscopy | pathology | generic (picks default suites)
  dims: auto              # 2, 3 or auto (from the data: NIfTI volume -> 3, PNG -> 2)
  channels: 1
  # spatial_size: [64, 64] # resize to the model's input size (H, W) or (D, H, W)
  intensity:
    scaling: minmax       # minmax | percentile | window | fixed | none  -> [0, 1]
  mean: [0.5]             # normalisation applied after perturbation, just before the model
  std: [0.25]

task:
  type: multiclass        # binary | multiclass | multilabel
  classes: [negative, positive]
  threshold: 0.5

audit:
  # suites: [intensity, mri] # default: the modality's suites
  severities: [1, 2, 3, 4, 5]
  seed: 0
  device: auto            # auto | cpu | cuda | cuda:N
  # threads: auto         # CPU threads for torch: auto (timed in the dry run), or a number
  batch_size: 32
  bootstrap: 1000         # resamples for 95% confidence intervals

checks: []                # e.g. ["clean.accuracy<0.8", "mri.motion@3.ece>0.1"]

verdict:
  margins:                # a drop beyond its margin, significantly, is a breaking point
    "*": 0.05             # every headline metric not named here
    # ece: 0.02

output:
  dir: medaudit-out
  save_predictions: false
"""
