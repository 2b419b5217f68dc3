"""The task contract: what a model is audited *for*, contributed by plugins like perturbations are.

A :class:`Task` is the one place that knows what a sample's target is and what a model's raw
output means. The core asks it to

1. validate the ``task`` section of the config (:meth:`Task.validate_config`);
2. read raw targets into an array (:meth:`Task.read_targets`; loaders call it through
   :func:`medaudit.data.resolve_labels`);
3. say whether raw outputs are logits or probabilities (:meth:`Task.detect_output_kind`) and turn
   a batch of them into the **per-sample quantities the audit keeps**, on the device
   (:meth:`Task.reduce`), declared up front with their per-sample shapes
   (:meth:`Task.quantities`) so the runner and the shard cache store ``[S, N, *shape]`` tensors
   without knowing the task;
4. validate the merged quantities against the targets before any metric runs
   (:meth:`Task.check_outputs`);
5. declare which analyses apply (:attr:`Task.capabilities`); metrics keep declaring the task
   *names* they apply to (``Metric.tasks``).

Tasks reach the audit through the ``medaudit_tasks`` hook; ``binary``, ``multiclass`` and
``multilabel`` are contributed that way by the built-in ``tasks`` plugin. The helpers below
(:func:`read_class_labels`, :func:`check_class_probabilities`) are what a classification-like
task shares, public so that a third-party task can use them too.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, DataError, PluginError

if TYPE_CHECKING:
    from .config import Config, TaskConfig

OutputKind = Literal["logits", "probabilities"]

# ---------------------------------------------------------------------------------------------
# Capabilities: what the core and the built-in analyses consult instead of comparing task names.
# ---------------------------------------------------------------------------------------------

#: The task keeps a ``"probs"`` quantity ``[K]`` of class probabilities (``AuditOutputs.probs``),
#: and its raw outputs are class scores, so output-based OOD detectors (``needs == "outputs"``) apply.
CLASS_PROBABILITIES = "class_probabilities"
#: One true class per sample and probability rows that sum to 1 (arg-max predictions).
SINGLE_LABEL = "single_label"
#: Calibration metrics and the report's reliability views apply.
CALIBRATION = "calibration"
#: Post-hoc temperature scaling (``results["calibration"]["temperature_scaling"]``) applies.
TEMPERATURE_SCALING = "temperature_scaling"
#: OOD scores are also evaluated at separating wrong predictions from right ones.
FAILURE_DETECTION = "failure_detection"
#: The subgroup analysis (per-group metrics and gaps) applies.
SUBGROUPS = "subgroups"
#: The raw outputs are class scores per voxel (a segmentation map ``[B, K, *spatial]``): output-based
#: OOD detectors apply, each image scored by the mean of its voxels' scores.
VOXEL_CLASS_SCORES = "voxel_class_scores"

#: The raw outputs are the model's representation (an encoder's embeddings ``[B, D]``): feature-based
#: detectors and the representation measures read them when no feature layer is named.
OUTPUT_FEATURES = "output_features"

# What one sample's target is (Task.targets); loaders read label cells accordingly.
#: One class per sample (a name or an index).
TARGET_CLASS = "class"
#: A set of classes per sample, read into a multi-hot row.
TARGET_CLASS_SET = "class_set"
#: A reference label map per sample (segmentation): the data set reads it with each image
#: (:meth:`medaudit.data.AuditDataset.read_label_map`), perturbations that move the anatomy move
#: it too, and :meth:`Task.reduce` receives it with the voxel spacing as ``targets``.
TARGET_LABEL_MAP = "label_map"

#: A ``metric_input`` meaning "every declared quantity": metrics receive the mapping of the
#: task's quantities (``{name: [N, *shape]}``) instead of one tensor. A task whose per-sample
#: results are several reduced quantities (a segmentation task's Dice, distances and calibration
#: statistics) declares it.
ALL_QUANTITIES = "*"


class Task(ABC):
    """Base class of a task type; contributed as instances through ``medaudit_tasks``.

    Class attributes
    ----------------
    name : str
        The value of ``task.type`` in the config; unique across plugins.
    description : str
        One line for ``medaudit plugins`` and the docs.
    targets : str
        What one sample's target is: :data:`TARGET_CLASS` or :data:`TARGET_CLASS_SET` (a loader
        reads label cells by it), or :data:`TARGET_LABEL_MAP` (a label map per sample, passed to
        :meth:`reduce` batch by batch).
    metric_input : str
        The declared quantity passed to ``Metric.compute`` as its first argument
        (``"probs"`` for the classification tasks), or :data:`ALL_QUANTITIES`.
    capabilities : frozenset[str]
        Which analyses apply (:data:`CLASS_PROBABILITIES`, :data:`SINGLE_LABEL`,
        :data:`CALIBRATION`, :data:`TEMPERATURE_SCALING`, :data:`FAILURE_DETECTION`,
        :data:`SUBGROUPS`, or a plugin's own strings).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    targets: ClassVar[str] = TARGET_CLASS
    metric_input: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def validate_config(self, cfg: TaskConfig) -> None:
        """Raise ``ValueError`` (naming the field) when ``cfg`` does not suit the task."""

    @abstractmethod
    def read_targets(self, raw: Any, cfg: TaskConfig, where: str) -> tuple[np.ndarray, list[str]]:
        """Raw targets (as a loader read them) → ``(targets, classes)``.

        ``targets`` is an integer array with one entry (row) per sample; ``classes`` are
        ``cfg.classes``, or the ones inferred from the targets when ``cfg.classes`` is empty.
        Raise :class:`medaudit.errors.DataError` naming ``where`` (the file) and the row.
        """

    def target_counts(self, targets: np.ndarray, classes: Sequence[str]) -> dict[str, int]:
        """Samples per class for the dataset's identity (positives per class for multi-hot rows)."""
        if targets.ndim == 2:
            return {classes[k]: int(targets[:, k].sum()) for k in range(targets.shape[1])}
        counts = np.bincount(targets, minlength=len(classes))
        return {classes[k]: int(counts[k]) for k in range(len(classes))}

    def detect_output_kind(self, out: Tensor) -> OutputKind:
        """What a raw output batch looks like when ``model.output`` is ``auto``."""
        return "logits"

    @abstractmethod
    def quantities(self, cfg: TaskConfig) -> dict[str, tuple[int, ...]]:
        """Name → per-sample shape of every quantity :meth:`reduce` returns (the runner and the
        shard cache allocate ``[N, *shape]`` per scenario from this, before the first batch).
        ``-1`` stands for a size the model decides (an encoder's embedding width), the same in
        every batch."""

    #: The task's readouts are fitted on the labelled ``--reference`` set (:meth:`readout`), so an
    #: audit of it needs one.
    needs_reference: ClassVar[bool] = False
    #: The result-key prefixes of the readout heads besides the primary one (``Readout.heads``),
    #: declared so that ``--fail-on`` can name their metrics before the audit runs.
    readout_prefixes: ClassVar[tuple[str, ...]] = ()

    def metric_task(self, cfg: TaskConfig) -> str:
        """The task name the metrics evaluate this task as (``Metric.tasks``, ``MetricContext.task``):
        the task's own name, or for a task with a :meth:`readout`, the task of its probabilities."""
        return self.name

    def readout(self, reference: Mapping[str, Tensor], labels: Tensor, cfg: TaskConfig,
                reference_sha256: str) -> Readout | None:
        """Class-probability readouts fitted on the reference set's quantities (``[M, *shape]``
        each) and labels ``[M]``, for a task whose outputs are not class scores (an encoder's
        embeddings); None (the default): the task's own ``metric_input`` is evaluated.
        Raise ``ValueError`` naming the problem when the reference cannot fit them."""
        return None

    @abstractmethod
    def reduce(self, out: Tensor, kind: OutputKind, cfg: TaskConfig,
               targets: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """A batch of raw model outputs ``[B, ...]`` → the declared quantities, each ``[B, *shape]``.

        Runs on the device inside the forward loop, once per batch and scenario: keep it to
        tensor operations (no host synchronisation, no ``.item()``). A task whose raw outputs are
        large (a segmentation map) reduces them here to per-sample values. Raise
        :class:`medaudit.errors.ModelOutputError` when the output's shape does not fit the task.

        ``targets`` is None unless the task's ``targets`` is :data:`TARGET_LABEL_MAP`; then it is
        ``{"labels": [B, *spatial] int64, "spacing": [B, dims] float64}`` on the device, the
        label maps already moved by the scenario's perturbation where it moves the anatomy.
        """

    def prediction_map(self, out: Tensor, kind: OutputKind, cfg: TaskConfig) -> Tensor | None:
        """The predicted label map of each sample ``[B, *spatial]`` (uint8), for a task whose outputs
        are maps: saved for the scenarios ``output.save_labelmaps`` names (and clean) with
        ``--save-predictions``, and drawn in the report's overlays. None (the default): no maps."""
        return None

    def sample_quality(self, quantities: Mapping[str, Tensor], cfg: TaskConfig) -> Tensor | None:
        """One score per sample ``[N]`` from its reduced quantities (``[N, *shape]`` each), higher is
        better, NaN where undefined: for a task with :meth:`prediction_map`, the report's overlays
        draw the clean data's best, median and worst samples by it and label every panel with it
        (segmentation: the mean Dice over foreground classes). None (the default): no overlays."""
        return None

    def prediction_arrays(self, quantities: Mapping[str, Tensor], cfg: TaskConfig) -> dict[str, np.ndarray]:
        """The per-sample arrays ``predictions.npz`` holds for this task (``[S, N, …]`` each); by
        default every declared quantity under its own name."""
        return {name: value.numpy() for name, value in quantities.items()}

    @abstractmethod
    def check_outputs(self, outputs: Mapping[str, Tensor], targets: Tensor, weights: Tensor | None = None) -> None:
        """Validate one scenario's quantities (``[N, *shape]`` each) against the targets.

        Called once per scenario before any metric; raise ``ValueError`` naming the problem,
        how large it is and the first offending row (the audit names the scenario).
        """


@dataclass(frozen=True)
class Readout:
    """Class probabilities read out of a task's quantities by models fitted on the reference set.

    ``heads`` maps a result-key prefix to a function from one scenario's quantities
    (``{name: [N, *shape]}``) to class probabilities ``[N, K]``; the head under ``""`` gives the
    scenario's ``metrics`` (and feeds failure detection and subgroups), every other head its
    metrics under ``<prefix><metric>`` (e.g. ``knn_probe/accuracy``). The probabilities are
    evaluated as the task :attr:`metric_task` names; ``record`` is results.json ``model.probe``.
    """

    metric_task: str
    heads: Mapping[str, Callable[[Mapping[str, Tensor]], Tensor]]
    record: Mapping[str, Any]


# ---------------------------------------------------------------------------------------------
# The catalogue: which task object a config's ``task.type`` names.
# ---------------------------------------------------------------------------------------------


def check_declaration(task: object, plugin: str) -> Task:
    """``task`` if it is a well-formed :class:`Task`; PluginError naming the plugin otherwise."""
    if not isinstance(task, Task):
        raise PluginError(f'plugin "{plugin}" returned {task!r} from medaudit_tasks; expected Task instances')
    for attr in ("name", "metric_input"):
        if not isinstance(getattr(task, attr, None), str) or not getattr(task, attr):
            raise PluginError(f'task {type(task).__name__} of plugin "{plugin}" has no {attr} (a non-empty string)')
    return task


def bind_task(config: Config, tasks: Mapping[str, tuple[str, Task]]) -> Task:
    """Resolve ``config.task.type`` among the registered ``tasks`` (name → (plugin, task)),
    validate the task section with it and attach it to ``config.task`` (see :func:`task_of`).

    :raises ConfigError: for an unknown type (naming the available ones) or a task section
        the task rejects.
    """
    name = config.task.type
    if name not in tasks:
        raise ConfigError(f"task.type: unknown task {name!r}; available: {sorted(tasks)} "
                          "(`medaudit plugins` lists what each plugin provides)")
    plugin, task = tasks[name]
    try:
        task.validate_config(config.task)
    except ValueError as exc:
        raise ConfigError(f"task: {exc} (task type {name!r} of plugin \"{plugin}\")") from None
    config.task._task = task
    _KNOWN[name] = task
    return task


def task_of(cfg: TaskConfig) -> Task:
    """The task object of a task section: the one :func:`bind_task` attached (every audit binds
    its config before opening data), else the installed task of that name (a config built
    outside an audit, e.g. a loader called directly)."""
    bound = cfg._task
    return bound if bound is not None else task_named(cfg.type)


def task_named(name: str) -> Task:
    """The task of that name: the last one bound in this process, or the installed one.

    :raises ConfigError: naming the available tasks when there is none.
    """
    if name in _KNOWN:
        return _KNOWN[name]
    installed = _installed_tasks()
    if name not in installed:
        raise ConfigError(f"task.type: unknown task {name!r}; available: {sorted(installed)}")
    return installed[name]


# Tasks bound by an audit in this process, by name: a helper that receives only a name (e.g.
# check_predictions(probs, labels, ctx.task)) finds the audit's own task, a third party's included.
_KNOWN: dict[str, Task] = {}


@functools.cache
def _installed_tasks() -> dict[str, Task]:
    from .plugin_manager import get_plugin_manager  # the manager imports this module

    return {name: task for name, (_plugin, task) in get_plugin_manager(warn=lambda msg: None).tasks().items()}


# ---------------------------------------------------------------------------------------------
# Helpers of classification-like tasks.
# ---------------------------------------------------------------------------------------------


class LabelError(DataError):
    """A label that names no class of the task, at ``row`` (0-based) of the labels read at ``where``.

    The message reads ``<where>: row 17 (sample id 'x') has label 7, but …``; the task knows
    values, not samples, so :func:`medaudit.data.resolve_labels` adds the sample id.
    """

    def __init__(self, where: str, row: int, detail: str, sample_id: str | None = None) -> None:
        self.where, self.row, self.detail, self.sample_id = where, row, detail, sample_id
        sid = f" (sample id {sample_id!r})" if sample_id is not None else ""
        super().__init__(f"{where}: row {row + 1}{sid} {detail}")


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


def _shown(value: str) -> str:
    """A label as the user wrote it: an index bare (``7``), a name quoted (``'csf'``)."""
    return value if _is_int(value) else repr(value)


def class_list(classes: Sequence[str]) -> str:
    """``3 classes (0–2): a, b, c``: how a label error names the classes a label must be one of."""
    return f"{len(classes)} classes (0–{len(classes) - 1}): {', '.join(classes)}"


def _runs(ks: list[int]) -> str:
    """Sorted integers as runs: ``[3, 4, 5, 6, 9]`` → ``3–6, 9``."""
    runs: list[list[int]] = []
    for k in ks:
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in runs)


def _check_no_gap(values: list[str], n: int, where: str) -> None:
    """Refuse integer labels that skip an index when the classes are inferred from them.

    ``0..max`` is a guess at the model's classes; labels 0, 1, 2, 7 make it 8 classes of which 4
    hold no sample, which almost always means a stray label (or 1-based labels) and otherwise ends
    in an output-width error far from its cause. The row of the first label above the gap is named.
    """
    present = {int(v) for v in values}
    missing = [k for k in range(n) if k not in present]
    if not missing or present == {1}:
        return  # gap-free, or a binary set of positives only (classes 0..1 are then no guess)
    row = next(i for i, v in enumerate(values) if int(v) > missing[0])
    hint = " (are the labels 1-based?)" if missing[0] == 0 else ""
    raise LabelError(where, row, (
        f"has label {values[row]}, but no label is {_runs(missing)}{hint}; task.classes is not set, so the classes "
        f"would be inferred as 0–{n - 1} ({n} classes, {len(missing)} without a sample). Fix the label, or set "
        "task.classes to the model's classes in output order (classes without samples are fine there)"))


def read_class_labels(raw: Sequence[Any], classes: Sequence[str], where: str) -> tuple[np.ndarray, list[str]]:
    """One class per sample (names or indices) → ``(indices int64 [N], classes)``.

    When ``classes`` is empty they are inferred: the sorted unique values, or ``0..max`` (at least
    two) when every value is an integer; integer labels that skip an index are then an error
    (:func:`_check_no_gap`). A label that names no class is a :class:`LabelError`.
    """
    values = [str(v).strip() for v in raw]
    configured = bool(classes)
    classes = list(classes)
    if not classes:
        uniq = sorted(set(values), key=lambda s: (not _is_int(s), int(s) if _is_int(s) else 0, s))
        if all(_is_int(v) for v in uniq):
            n = max(int(v) for v in uniq) + 1
            if min(int(v) for v in uniq) >= 0:
                _check_no_gap(values, n, where)
            classes = [str(k) for k in range(max(n, 2))]
        else:
            classes = uniq
    index = {c: k for k, c in enumerate(classes)}
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        if v in index:
            out[i] = index[v]
        elif _is_int(v) and 0 <= int(v) < len(classes):
            out[i] = int(v)
        elif configured:
            raise LabelError(where, i, f"has label {_shown(v)}, but task.classes names {class_list(classes)}")
        else:
            raise LabelError(where, i, f"has label {_shown(v)}; an integer label is a class index, 0 or above "
                                       "(or set task.classes to name the classes)")
    return out, classes


def read_multi_hot(raw: Any, classes: Sequence[str], where: str, task_name: str) -> tuple[np.ndarray, list[str]]:
    """A set of classes per sample, given as a 0/1 ``[N, K]`` array → ``(int64 [N, K], classes)``."""
    arr = np.asarray(raw)
    if arr.ndim != 2:
        raise DataError(f"{where}: a {task_name} task needs labels of shape [N, K], got {arr.shape}")
    if not np.isin(arr, (0, 1)).all():
        raise DataError(f"{where}: {task_name} labels must be 0/1")
    classes = list(classes) or [f"label_{k}" for k in range(arr.shape[1])]
    if len(classes) != arr.shape[1]:
        raise DataError(f"{where}: labels have {arr.shape[1]} columns but task.classes names {len(classes)}")
    return arr.astype(np.int64), classes


#: Largest tolerated ``|sum_k p_k - 1|`` of an exclusive probability row. Float32 softmax rows are
#: exact to ~1e-6; 1e-3 also admits outputs rounded through bf16/fp16 logits and then soft-maxed in
#: float32, while still catching sigmoid outputs or unnormalised scores.
PROB_SUM_ATOL = 1e-3


def check_class_probabilities(probs: Tensor, labels: Tensor, *, task_name: str, exclusive: bool,
                              n_classes: int | None = None, weights: Tensor | None = None) -> None:
    """Validate class probabilities, labels and weights (see :func:`medaudit.bootstrap.check_predictions`).

    ``exclusive``: rows sum to 1 and labels are class indices ``[N]``; otherwise entries are
    independent probabilities and labels multi-hot ``[N, K]``. ``n_classes`` fixes ``K``.
    medaudit never renormalises: a row that does not sum to 1 almost always means the outputs
    are logits or independent sigmoids and the configuration is wrong, and renormalising would
    hide that and distort every calibration metric.

    :raises ValueError: naming the problem, how large it is and the first offending row.
    """
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, K], got shape {tuple(probs.shape)}")
    if not torch.is_floating_point(probs):
        raise ValueError(f"probs must be floating point, got {probs.dtype}")
    n, k = probs.shape
    finite = torch.isfinite(probs).all(dim=1)
    if not bool(finite.all()):
        rows = torch.nonzero(~finite).flatten()
        raise ValueError(
            f"probs contain NaN or Inf in {rows.numel()} of {n} rows (first: row {int(rows[0])}); "
            "the model produced non-finite outputs"
        )
    lo, hi = (float(probs.min()), float(probs.max())) if n else (0.0, 0.0)
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(
            f"probs must lie in [0, 1], found values in [{lo:.4g}, {hi:.4g}]; "
            "were logits passed instead of probabilities? (set model.output: logits)"
        )
    if exclusive:
        if n_classes is not None and k != n_classes:
            which = " (negative, positive)" if n_classes == 2 else ""
            raise ValueError(f"a {task_name} task needs probs [N, {n_classes}]{which}, got K={k}")
        if n:
            deviation = (probs.double().sum(dim=1) - 1.0).abs()
            worst = int(deviation.argmax())
            if float(deviation[worst]) > PROB_SUM_ATOL:
                n_bad = int((deviation > PROB_SUM_ATOL).sum())
                raise ValueError(
                    f"probability rows must sum to 1 for a {task_name} task: {n_bad} of {n} rows deviate by more "
                    f"than {PROB_SUM_ATOL:g} (largest |sum - 1| = {float(deviation[worst]):.4g} at row {worst}). "
                    "medaudit does not renormalise; pass softmax outputs, or set model.output: logits, "
                    "or use task.type: multilabel for independent sigmoid outputs"
                )
        if labels.shape != (n,):
            raise ValueError(f"labels must be [N] = [{n}] for a {task_name} task, got shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(f"labels must be class indices in [0, {k}), found [{int(labels.min())}, {int(labels.max())}]")
    else:
        if labels.shape != (n, k):
            raise ValueError(f"labels must be [N, K] = [{n}, {k}] for a {task_name} task, got {tuple(labels.shape)}")
        if n and not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError(f"{task_name} labels must be 0 or 1")
    if weights is not None:
        if weights.ndim != 2 or weights.shape[1] != n:
            raise ValueError(f"weights must be [R, N] with N = {n}, got {tuple(weights.shape)}")
        if weights.numel() and (not bool(torch.isfinite(weights).all()) or float(weights.min()) < 0):
            raise ValueError("weights must be finite and non-negative")


def check_reduced(task: Task, reduced: Mapping[str, Tensor], cfg: TaskConfig, batch: int) -> None:
    """That :meth:`Task.reduce` returned exactly the declared quantities, ``[batch, *shape]`` each
    (checked once, on the dry run's batch); PluginError naming the task otherwise."""
    declared = task.quantities(cfg)
    if set(reduced) != set(declared):
        raise PluginError(f"task {task.name!r}: reduce returned quantities {sorted(reduced)} but quantities() "
                          f"declares {sorted(declared)}")
    for name, shape in declared.items():
        if not name or "|" in name:  # the shard cache keys arrays by "out|<quantity>|<scenario>"
            raise PluginError(f"task {task.name!r}: quantity name {name!r} must be non-empty and hold no '|'")
        value = reduced[name]
        # -1 in a declared shape: a size the model decides (an encoder's embedding width), any value
        fits = isinstance(value, Tensor) and value.ndim == 1 + len(shape) and value.shape[0] == batch and all(
            d == -1 or d == v for d, v in zip(shape, value.shape[1:]))
        if not fits:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise PluginError(f"task {task.name!r}: quantity {name!r} of a batch of {batch} is {got}, "
                              f"declared [{batch}, *{tuple(shape)}]")
