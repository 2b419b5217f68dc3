"""One unit of work in this process: every scenario of a shard, batch by batch.

:func:`run_shard` is pure: it maps (scenarios, a contiguous shard of sample indices) to per-sample
outputs (:class:`UnitOutputs`), whatever ran before it in the process. Each batch of the shard is
read and decoded once and reused for every scenario (perturbed on the device).

Outputs do not depend on the batch size, the shard size or the order in which shards run:

* randomness is keyed by (seed, perturbation, severity, sample index) through :mod:`medaudit.rng`;
* the model is called on fixed-size chunks of ``audit.model_batch_size`` samples aligned to the
  sample index, because convolution kernels pick different algorithms — and round
  differently — for different batch shapes. Sample ``i`` is therefore always computed at
  position ``i % M`` of a chunk holding the same neighbours, and its outputs are bit-identical
  whatever ``--batch-size`` (which only sets how many samples are loaded and perturbed at once,
  rounded up to a multiple of the chunk). Only the dataset's last chunk can be shorter; it
  always holds the same samples, so it runs at its own size, and is zero-padded to the full
  size only for a model that accepts no other batch size (found by the probe).

Every perturbation's output is checked against its contract (:mod:`medaudit.runner.guard`); a
perturbation that breaks it, or raises, loses its scenarios, not the audit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..detector import Detector
from ..errors import ModelError, ModelOutputError
from ..features import Captured, Extractor, feature_vector, pool
from ..outputs import Scenario
from ..perturbation import Perturbation
from ..config import TaskConfig
from ..rng import SampleRNG, sample_keys, stream_key
from ..task import OUTPUT_FEATURES, Task
from .batches import device_targets
from .device import autocast
from .guard import ValueGuard, metadata_problem
from .probe import exception_line


@dataclass
class UnitOutputs:
    """Per-sample outputs of one unit of work (a shard): ``outputs[quantity][scenario]`` is
    ``[n, *shape]`` for every quantity the task declares; ``embeddings[scenario][detector]`` ``[n, D]``."""

    start: int
    stop: int
    outputs: dict[str, dict[str, Tensor]]
    embeddings: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    params: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # Predicted label maps [n, *spatial] uint8 of the scenarios ForwardSpec.save_maps names.
    maps: dict[str, Tensor] = field(default_factory=dict)
    # Plugin failures: scenario id -> message (a perturbation raised), detector -> message (embed raised).
    failed: dict[str, str] = field(default_factory=dict)
    failed_detectors: dict[str, str] = field(default_factory=dict)

    def held(self) -> set[str]:
        """The scenarios whose outputs this unit holds: the ones it ran, less those that failed in it."""
        return set(next(iter(self.outputs.values()), {}))


@dataclass
class ForwardSpec:
    """Everything :func:`run_shard` needs besides the data: fixed for the whole audit."""

    extract: Extractor
    task: Task
    task_config: TaskConfig
    output_kind: str
    mean: Tensor
    std: Tensor
    seed: int
    device: torch.device
    precision: str = "fp32"
    detectors: Sequence[Detector] = ()
    model_batch_size: int = 32
    owners: dict[object, str] = field(default_factory=dict)
    model_path: str = "the model"
    memory_format: torch.memory_format | None = None
    pad_last: bool = False  # zero-pad a short last chunk (a model with a fixed batch size)
    save_maps: frozenset[str] = frozenset()  # scenarios whose predicted label maps are kept (Task.prediction_map)
    feature_layer: str | None = None  # the captured layer "features" detectors read
    stages: tuple[str, ...] = ()  # the captured layers "stages" detectors read, shallow to deep
    token_pooling: str = "auto"  # model.tokens.pooling: the vector a token feature layer gives (features.feature_vector)
    # keep each sample's pooled feature vector per scenario (audit.representation), under REPRESENTATION
    representation: bool = False


#: The key of the per-sample representation vectors among a unit's embeddings (detectors may not take it).
REPRESENTATION = "representation"


def perturb_batch(x: Tensor, indices: Tensor, scenario: Scenario, perturbation: Perturbation | None,
                  seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Apply a scenario's perturbation to a ``[0, 1]`` batch with per-sample keyed randomness."""
    if perturbation is None:
        return x, {}
    keys = sample_keys(stream_key(seed, scenario.perturbation, scenario.severity), indices)
    return perturbation(x, scenario.severity, SampleRNG(keys))


def move_labels(perturbation: Perturbation, labels: Tensor, params: dict[str, Tensor], image_ndim: int) -> Tensor:
    """Reference maps ``[B, *S]`` (class indices) or ``[B, K, *S]`` (a map per structure) moved by a
    perturbation that moves the anatomy, with the parameters it drew for the images ``[B, C, *S]``
    (``image_ndim`` axes): the same grid, the nearest voxel's label."""
    if labels.ndim == image_ndim:
        return perturbation.apply_to_labels(labels, params).long()
    return perturbation.apply_to_labels(labels[:, None], params)[:, 0].long()


def chunked_forward(extract: Extractor, x: Tensor, chunk: int, pad_last: bool = False) -> tuple[Tensor, Captured | None]:
    """Call the model on chunks of ``chunk`` samples of ``x`` and concatenate (outputs, and each
    captured layer present in every chunk); a shorter last chunk runs at its own size, or
    zero-padded to ``chunk`` with ``pad_last``."""
    n = x.shape[0]
    pad = (-n) % chunk
    if pad and pad_last:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    outs: list[Tensor] = []
    feats: list[Captured] = []
    for i in range(0, x.shape[0], chunk):
        out, f = extract(x[i:i + chunk])
        outs.append(out)
        feats.append(f or {})
    layers = set(feats[0]).intersection(*feats[1:])
    return torch.cat(outs)[:n], ({k: torch.cat([f[k] for f in feats])[:n] for k in feats[0] if k in layers}
                                 if layers else None)


class _ScenarioClock:
    """Per-scenario compute time: CUDA events on a GPU (no synchronisation inside the loop), wall time on a CPU."""

    def __init__(self, device: torch.device, ids: Sequence[str]) -> None:
        self.cuda = device.type == "cuda"
        self.total = dict.fromkeys(ids, 0.0)
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._t0 = 0.0
        self._begin: torch.cuda.Event | None = None

    def start(self, sid: str) -> None:
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self, sid: str) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            assert self._begin is not None
            self.events.append((sid, self._begin, end))
        else:
            self.total[sid] += time.perf_counter() - self._t0

    def seconds(self) -> dict[str, float]:
        if self.events:
            torch.cuda.synchronize()
            for sid, begin, end in self.events:
                self.total[sid] += begin.elapsed_time(end) / 1000.0
        return self.total


class _ShardRows:
    """Per-sample outputs of one shard, written batch by batch into tensors of ``n`` rows.

    Each output gets one ``[n, ...]`` tensor, allocated when its first batch arrives (NaN until
    written). Appending a small tensor per batch and concatenating at the end of the shard made
    glibc's heap grow by hundreds of MB: the long-lived pieces sat between the model's large
    transient activations, which then no longer fit the holes they left (a 2,200-sample shard of
    the example audit grew the process by 840 MB and held 19 MB of outputs).
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.rows: dict[tuple[str, ...], Tensor] = {}

    def put(self, key: tuple[str, ...], offset: int, value: Tensor) -> None:
        """Write ``value`` ``[B, ...]`` at rows ``offset..offset+B``; ValueError if its shape changed."""
        buf = self.rows.get(key)
        if buf is None:
            fill = float("nan") if value.is_floating_point() else 0
            buf = self.rows[key] = value.new_full((self.n, *value.shape[1:]), fill)
        if value.shape[1:] != buf.shape[1:]:
            raise ValueError(f"per-sample shape {tuple(value.shape[1:])} differs from the earlier batches' "
                             f"{tuple(buf.shape[1:])}")
        buf[offset : offset + value.shape[0]] = value

    def pop(self, key: tuple[str, ...]) -> Tensor:
        """The whole ``[n, ...]`` output on the CPU, dropped from here (one copy from a device)."""
        return self.rows.pop(key).cpu()


def run_shard(batches: Iterator[tuple[Tensor, Tensor, dict[str, Tensor]]], start: int, stop: int, scenarios: Sequence[Scenario],
              perturbations: dict[str, Perturbation], spec: ForwardSpec,
              on_batch: Callable[[int], None] | None = None) -> UnitOutputs:
    """Evaluate every scenario on one shard of the data (the audit's unit of work).

    ``batches`` yields ``(images [B, C, ...] in [0, 1], dataset indices [B], extras)`` for the
    samples ``start..stop-1`` in order (see :data:`~medaudit.runner.batches.Batch`). For a task
    whose targets are label maps, a perturbation that moves the anatomy replays its parameters on
    the batch's label maps (:meth:`~medaudit.perturbation.Perturbation.apply_to_labels`) before
    the task reduces the outputs against them.
    """
    rows = _ShardRows(stop - start)
    # Embeddings a detector computes off the device's critical path arrive as futures, resolved at
    # the end of the shard: (scenario, detector) -> [(row offset, future)].
    pending: dict[tuple[str, str], list[tuple[int, Future[Tensor]]]] = {}
    param_keys: dict[str, dict[str, None]] = {s.id: {} for s in scenarios}  # in the order a perturbation gives them
    clock = _ScenarioClock(spec.device, [s.id for s in scenarios])
    # NaN/Inf outputs are flagged on the device and checked once per shard: a per-batch check
    # would stall the GPU queue at every scenario.
    finite = {s.id: torch.ones((), dtype=torch.bool, device=spec.device) for s in scenarios}
    values = ValueGuard()  # the perturbed images' range, read once per shard likewise
    failed: dict[str, str] = {}
    failed_detectors: dict[str, str] = {}

    def perturbation_failed(scenario: Scenario, what: str, detail: str = "") -> None:
        failed[scenario.id] = (f'perturbation "{scenario.perturbation}" of plugin '
                               f'"{spec.owners.get(scenario.perturbation, "?")}" {what} in scenario '
                               f"{scenario.id}{detail}; the scenario is left out")

    def detector_failed(name: str, owner: str, exc: BaseException) -> None:
        failed_detectors[name] = (f'ood: detector "{name}" of plugin "{owner}" '
                                  f"raised in embed ({type(exc).__name__}: {exc}); it is left out")

    offset = 0
    for x, idx, extras in batches:
        x = x.to(spec.device, non_blocking=True)
        idx = idx.to(spec.device, non_blocking=True)
        targets = device_targets(spec.task, extras, spec.device)
        for scenario in scenarios:
            if scenario.id in failed:
                continue
            clock.start(scenario.id)
            pert = perturbations.get(scenario.perturbation) if scenario.perturbation else None
            try:
                xp, p = perturb_batch(x, idx, scenario, pert, spec.seed)
            except Exception as exc:  # a broken perturbation plugin loses its scenarios, not the audit
                perturbation_failed(scenario, "raised", f" ({type(exc).__name__}: {exc})")
                clock.stop(scenario.id)
                continue
            problem = metadata_problem(x, xp, p) if pert is not None else None
            if problem is not None:  # before the model runs on it: never blamed on the model
                perturbation_failed(scenario, problem)
                clock.stop(scenario.id)
                continue
            scenario_targets = targets
            if targets is not None and pert is not None and pert.moves_anatomy:
                try:  # the reference anatomy moves with the image: same parameters, nearest label
                    moved = move_labels(pert, targets["labels"], p, x.ndim)
                except Exception as exc:
                    perturbation_failed(scenario, "raised in apply_to_labels", f" ({type(exc).__name__}: {exc})")
                    clock.stop(scenario.id)
                    continue
                scenario_targets = {**targets, "labels": moved.long()}
            if pert is not None:
                values.observe(scenario.id, xp)
            xn = (xp.float() - spec.mean) / spec.std
            if spec.memory_format is not None:
                xn = xn.contiguous(memory_format=spec.memory_format)
            try:
                with autocast(spec.precision, spec.device):
                    out, feats = chunked_forward(spec.extract, xn, spec.model_batch_size, spec.pad_last)
            except Exception as exc:
                # Images outside the contract are the perturbation's fault (this read waits for the
                # device, but only on the way to stopping); otherwise the model's: stop, naming where.
                problem = values.problems().get(scenario.id)
                if problem is not None:
                    perturbation_failed(scenario, problem)
                    clock.stop(scenario.id)
                    continue
                raise ModelError(f"model {spec.model_path} raised in scenario {scenario.id} on samples {int(idx[0])}–{int(idx[-1])} "
                                 f"({type(exc).__name__}: {exception_line(exc)}); the dry run on the first batch "
                                 "passed, so check what differs in these samples (e.g. intensities the perturbation "
                                 "produced)") from exc
            out = out.float()
            finite[scenario.id] &= torch.isfinite(out).all()
            reduced = (spec.task.reduce(out, spec.output_kind, spec.task_config)  # type: ignore[arg-type]
                       if scenario_targets is None else
                       spec.task.reduce(out, spec.output_kind, spec.task_config, scenario_targets))  # type: ignore[arg-type]
            for name, value in reduced.items():
                rows.put(("outputs", name, scenario.id), offset, value)
            if scenario.id in spec.save_maps:
                labelmap = spec.task.prediction_map(out, spec.output_kind, spec.task_config)  # type: ignore[arg-type]
                if labelmap is not None:
                    rows.put(("maps", scenario.id), offset, labelmap)
            # each input kind once per batch (float32 for the detectors, whatever autocast produced)
            layer = feature_vector(feats or {}, spec.feature_layer, spec.token_pooling) if spec.feature_layer else None
            if layer is None and OUTPUT_FEATURES in spec.task.capabilities:
                layer = out  # an encoder's outputs are its representation
            elif layer is not None and spec.representation:
                rows.put(("embeddings", scenario.id, REPRESENTATION), offset, pool(layer.float()))
            given: dict[str, Tensor | list[Tensor] | None] = {
                "logits": None, "inputs": xp.float(), "features": layer.float() if layer is not None else None,
                "stages": ([feats[n].float() for n in spec.stages]
                           if feats and spec.stages and all(n in feats for n in spec.stages) else None)}
            for d in spec.detectors:
                second = given.get(d.needs)
                if (d.needs in ("features", "stages") and second is None) or d.name in failed_detectors:
                    continue
                try:
                    emb = d.embed(out, second)
                    if isinstance(emb, Future):
                        pending.setdefault((scenario.id, d.name), []).append((offset, emb))
                    else:
                        rows.put(("embeddings", scenario.id, d.name), offset, emb.float())
                except Exception as exc:
                    # NaN or out-of-range images break detectors too (e.g. an eigendecomposition):
                    # the perturbation's fault, found by a read on this error path only. Otherwise
                    # a broken detector plugin is dropped; the rest are kept.
                    problem = values.problems().get(scenario.id) if pert is not None else None
                    if problem is not None:
                        perturbation_failed(scenario, problem)
                        break
                    detector_failed(d.name, spec.owners.get(id(d), "?"), exc)
            if scenario.id in failed:
                clock.stop(scenario.id)
                continue
            for k, v in p.items():
                # Scalar per-sample parameters are kept for the results; keys and vectors are not.
                if v.ndim == 1 and not k.endswith("key"):
                    param_keys[scenario.id][k] = None
                    rows.put(("params", scenario.id, k), offset, v.float())
            clock.stop(scenario.id)
        offset += x.shape[0]
        if on_batch is not None:
            on_batch(x.shape[0])
    for sid, problem in values.problems().items():
        if sid not in failed:
            perturbation_failed(next(s for s in scenarios if s.id == sid), problem)
    for sid, ok in finite.items():
        if sid not in failed and not bool(ok):
            raise ModelOutputError(f"the model produced NaN or Inf outputs in scenario {sid}")
    seconds = clock.seconds()
    for (sid, name), items in pending.items():
        if name in failed_detectors or sid in failed:  # a left-out scenario's failures are its perturbation's
            continue
        try:
            for at, fut in items:
                rows.put(("embeddings", sid, name), at, fut.result().float())
        except Exception as exc:  # a failure off the critical path is the detector's, as one in embed
            owner = next((spec.owners.get(id(d), "?") for d in spec.detectors if d.name == name), "?")
            detector_failed(name, owner, exc)
    kept = [s.id for s in scenarios if s.id not in failed]
    detector_names = [d.name for d in spec.detectors if d.name not in failed_detectors] + [REPRESENTATION]
    return UnitOutputs(
        start, stop,
        outputs={name: {sid: rows.pop(("outputs", name, sid)) for sid in kept}
                 for name in spec.task.quantities(spec.task_config)},
        embeddings={sid: {name: rows.pop(key) for name in detector_names if (key := ("embeddings", sid, name)) in rows.rows}
                    for sid in kept},
        params={sid: {k: rows.pop(("params", sid, k)) for k in param_keys[sid]} for sid in kept},
        maps={sid: rows.pop(key) for sid in kept if (key := ("maps", sid)) in rows.rows},
        seconds=seconds, failed=failed, failed_detectors=failed_detectors,
    )
