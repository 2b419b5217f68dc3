"""Sanity before evidence: does the model work on the audit data under the configured input spec?

A model given inputs scaled or normalised otherwise than in training (min-max instead of /255,
mean 0 / std 1 instead of the training statistics) scores near chance, and every later number
(no significant drop, a flat calibration curve) describes a model that does not work. Before the
forward passes, :func:`preprocessing_probe` runs a few dozen labelled samples spread over the
data set under the configured spec; when the model is near chance on them
(:func:`medaudit.scoring.near_chance`), it runs them again under the other intensity scalings
and normalisations and names the one under which the model does far better, as an ``alert``
warning record (code ``preprocessing-suspect``): printed on the console and shown as the
report's banner. The audit still runs as configured (it may be auditing a broken model on
purpose). Single-label classification tasks are scored by the balanced accuracy of their arg-max
predictions; tasks whose outputs are label maps (segmentation) by the voxel balanced accuracy of
their predicted maps against the reference maps (every probe voxel a sample: a constant map, or
one that ignores the image, also scores 1/K); other tasks are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .config import Config, IntensityConfig
from .data import AuditDataset, preprocess, preprocess_label_map
from .features import Extractor
from .results import WarningRecord
from .runner.device import autocast
from .scoring import NEAR_CHANCE_MARGIN, balanced_accuracy, near_chance
from .task import CLASS_PROBABILITIES, SINGLE_LABEL, TARGET_LABEL_MAP, task_of

#: Probe samples, evenly spaced over the data set (so sorted data still give every class), by
#: ``input.dims``: a few dozen images cost well under a second; volumes are read and resized too.
PROBE_SAMPLES = {2: 64, 3: 16}

#: How much better than as configured an alternative must score to be named (balanced accuracy),
#: besides being clear of chance itself: far more than 64 samples' noise.
FAR_BETTER = 2 * NEAR_CHANCE_MARGIN

#: Normalisations commonly trained with, besides the configured one, none and the data's own.
_HALF = ([0.5], [0.5], "")
_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], " (ImageNet's)")


@dataclass(frozen=True)
class _Spec:
    intensity: IntensityConfig
    mean: list[float]
    std: list[float]
    note: str = ""  # where the mean/std come from, for the message


def probe_indices(n: int, dims: int) -> list[int]:
    """Evenly spaced sample indices, at most :data:`PROBE_SAMPLES` for ``dims``."""
    k = min(n, PROBE_SAMPLES[dims])
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, k)})


def _scalings(config: Config, raw_within_unit: bool) -> list[IntensityConfig]:
    """Every ``input.intensity.scaling`` with the configured parameters; ``window`` only for CT
    (its level and width are Hounsfield units), ``none`` only for data already in [0, 1]."""
    current = config.input.intensity
    names = ["minmax", "percentile", "fixed"] + (["window"] if config.input.modality == "ct" else [])
    names += ["none"] if raw_within_unit else []
    return [current.model_copy(update={"scaling": name}) for name in names]


def _normalisations(config: Config, x: Tensor) -> list[tuple[list[float], list[float], str]]:
    channels = config.input.channels
    dims = tuple(d for d in range(x.ndim) if d != 1)
    own = ([round(float(v), 3) for v in x.mean(dim=dims)], [round(max(float(v), 1e-3), 3) for v in x.std(dim=dims)],
           " (the probe samples' own)")
    return [(list(config.input.mean), list(config.input.std), ""), ([0.0], [1.0], ""), _HALF,
            *([_IMAGENET] if channels == 3 else []), own]


def _describe(spec: _Spec, config: Config) -> str:
    """The settings of ``spec`` that differ from the configured ones, as the user would write them."""
    parts = []
    i, current = spec.intensity, config.input.intensity
    if i.scaling != current.scaling:
        detail = {"fixed": f" (max_value {i.max_value:g})", "percentile": f" (low {i.low:g}, high {i.high:g})",
                  "window": f" (level {i.level:g}, width {i.width:g})"}.get(i.scaling, "")
        parts.append(f"`input.intensity.scaling: {i.scaling}`{detail}")
    if (spec.mean, spec.std) != (list(config.input.mean), list(config.input.std)):
        parts.append(f"`input.mean: [{', '.join(f'{v:g}' for v in spec.mean)}]`, "
                     f"`input.std: [{', '.join(f'{v:g}' for v in spec.std)}]`{spec.note}")
    return " and ".join(parts)


def preprocessing_probe(extract: Extractor, dataset: AuditDataset, config: Config,
                        device: torch.device) -> WarningRecord | None:
    """The ``preprocessing-suspect`` alert, or None (model not near chance as configured, no
    spec far better, a task without arg-max predictions or label maps, or a model that fails on
    the probe samples, which the dry run that follows reports)."""
    task = task_of(config.task)
    maps = task.targets == TARGET_LABEL_MAP
    if not maps and not {CLASS_PROBABILITIES, SINGLE_LABEL} <= task.capabilities:
        return None
    indices = probe_indices(len(dataset), config.input.dims)
    raws = [dataset.read(i) for i in indices]
    where = [dataset.describe_sample(i) for i in indices]
    try:
        labels = (torch.cat([preprocess_label_map(dataset.read_label_map(i), r.shape[1:], dataset.spacing(i),
                                                  config.input, w)[0].flatten() for i, r, w in zip(indices, raws, where)])
                  if maps else torch.as_tensor(dataset.labels[indices]))
    except Exception:  # a bad mask is the data set's error, raised by the forward passes with its row
        return None
    chunk = config.audit.model_batch_size
    measure = "a voxel balanced accuracy" if maps else "a balanced accuracy"

    def predict(out: Tensor, kind: str) -> Tensor:
        """Arg-max classes: per voxel of the predicted map, or per sample."""
        if maps:
            pred = task.prediction_map(out, kind, config.task)  # type: ignore[arg-type]
            if pred is None:
                raise ValueError(f"task {task.name!r} gives no prediction map")
            return pred.flatten().long()
        return task.reduce(out, kind, config.task)["probs"].float().argmax(dim=1)  # type: ignore[arg-type]
    k = len(config.task.classes)

    def scaled(intensity: IntensityConfig) -> Tensor:
        cfg = config.input.model_copy(update={"intensity": intensity})
        return torch.stack([preprocess(r, cfg, w) for r, w in zip(raws, where)])

    def score(x: Tensor, mean: list[float], std: list[float]) -> float:
        shape = (1, config.input.channels) + (1,) * config.input.dims
        m = torch.tensor(mean, dtype=torch.float32).expand(config.input.channels).reshape(shape)
        s = torch.tensor(std, dtype=torch.float32).expand(config.input.channels).reshape(shape)
        predicted = []
        with torch.inference_mode(), autocast(config.audit.precision, device):
            for start in range(0, len(x), chunk):
                out, _ = extract(((x[start:start + chunk] - m) / s).to(device))
                kind = config.model.output if config.model.output != "auto" else task.detect_output_kind(out)
                predicted.append(predict(out, kind).cpu())
        return balanced_accuracy(torch.cat(predicted), labels)

    configured_spec = _Spec(config.input.intensity, list(config.input.mean), list(config.input.std))
    try:
        configured = score(scaled(config.input.intensity), configured_spec.mean, configured_spec.std)
        if not near_chance(configured, k):
            return None
        within_unit = all(float(np.min(r)) >= 0 and float(np.max(r)) <= 1 for r in raws)
        best: tuple[float, _Spec] | None = None
        for intensity in _scalings(config, within_unit):
            x = scaled(intensity)
            for mean, std, note in _normalisations(config, x):
                spec = _Spec(intensity, mean, std, note)
                if (spec.intensity, spec.mean, spec.std) == (configured_spec.intensity, configured_spec.mean,
                                                              configured_spec.std):
                    continue
                value = score(x, mean, std)
                if best is None or value > best[0]:  # the first of equals: the simpler spec
                    best = (value, spec)
    except Exception:  # the probe only advises; the dry run names what the model cannot take
        return None
    if best is None or near_chance(best[0], k) or best[0] < configured + FAR_BETTER:
        return None
    value, spec = best
    return WarningRecord(
        code="preprocessing-suspect", scenario="clean", subject="input", alert=True,
        message=(f"with {_describe(spec, config)} the model scores {measure} of {value:.2f} on "
                 f"{len(indices)} probe samples ({configured:.2f} as configured): check your input spec against how "
                 "the model was trained"))
