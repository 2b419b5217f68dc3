"""The forward passes: every scenario (clean, perturbation × severity) over the dataset.

The unit of work is pure: :func:`run_shard` maps (scenarios, a contiguous shard of sample
indices) to per-sample outputs, and shards merge by concatenation in index order. Each batch of
a shard is read and decoded once and reused for every scenario (perturbed on the device).

Outputs do not depend on the batch size, the shard size or the order in which shards run:

* randomness is keyed by (seed, perturbation, severity, sample index) through :mod:`medaudit.rng`;
* the model is called on fixed-size chunks of ``audit.model_batch_size`` samples aligned to the
  sample index, because convolution kernels pick different algorithms — and round
  differently — for different batch shapes. Sample ``i`` is therefore always computed at
  position ``i % M`` of a chunk holding the same neighbours, and its outputs are bit-identical
  whatever ``--batch-size`` (which only sets how many samples are loaded and perturbed at once,
  rounded up to a multiple of the chunk). Only the dataset's last chunk can be shorter; it
  always holds the same samples, so it runs at its own size, and is zero-padded to the full
  size only for a model that accepts no other batch size (found by the dry run).

A completed shard can be cached and reused by ``--resume`` without changing the results.
No report or results I/O happens here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from .config import Config
from .data import AuditDataset
from .detector import Detector
from .errors import ConfigError, MedauditError, ModelError, ModelOutputError
from .memory import release_free_memory
from .model import LoadedModel, check_model_output, detect_output_kind, outputs_to_probs
from .outputs import Scenario
from .perturbation import Perturbation
from .rng import SampleRNG, sample_keys, stream_key

# How a model is called: normalised batch -> (raw outputs, features of the configured layer or None).
Extractor = Callable[[Tensor], tuple[Tensor, Tensor | None]]


def select_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"audit.device is {spec!r} but CUDA is not available on this machine; use --device cpu or auto")
    return device


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` CPU threads for torch's operators (None: leave them as they
    are), and restore the previous number afterwards: the setting is process-wide."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def plan_scenarios(config: Config, catalogue: dict[str, tuple[str, type[Perturbation]]]) -> tuple[list[Scenario], dict[str, Perturbation]]:
    """Choose perturbations from the config and expand them to scenarios (clean first).

    ``audit.suites`` selects whole suites; when it is unset, a perturbation is included when its
    ``modalities`` hold ``input.modality`` or ``"any"``. ``audit.perturbations`` adds single
    perturbations, ``audit.exclude`` removes some. Perturbations that do not support
    ``input.dims`` are left out of suites and are an error when named explicitly.
    """
    dims = config.input.dims
    suites = {cls.suite for _, cls in catalogue.values()}
    chosen: dict[str, type[Perturbation]] = {}
    if config.audit.suites is None:
        for name, (_, cls) in catalogue.items():
            if (config.input.modality in cls.modalities or "any" in cls.modalities) and dims in cls.dims:
                chosen[name] = cls
    else:
        unknown = sorted(set(config.audit.suites) - suites)
        if unknown:
            raise ConfigError(f"audit.suites: unknown suite(s) {unknown}; available: {sorted(suites)}")
        for name, (_, cls) in catalogue.items():
            if cls.suite in config.audit.suites and dims in cls.dims:
                chosen[name] = cls
    for name in config.audit.perturbations + config.audit.exclude:
        if name not in catalogue:
            raise ConfigError(f"unknown perturbation {name!r}; `medaudit perturbations` lists them: {sorted(catalogue)}")
    for name in config.audit.perturbations:
        cls = catalogue[name][1]
        if dims not in cls.dims:
            raise ConfigError(f"perturbation {name!r} supports {list(cls.dims)}D images, input.dims is {dims}")
        chosen[name] = cls
    for name in config.audit.exclude:
        chosen.pop(name, None)
    scenarios = [Scenario.clean()]
    for name in sorted(chosen):
        for severity in config.audit.severities:
            scenarios.append(Scenario.perturbed(name, chosen[name].suite, severity))
    return scenarios, {name: cls() for name, cls in sorted(chosen.items())}


@dataclass
class ShardOutputs:
    """Per-sample outputs of one shard: ``probs[scenario]`` is ``[n, K]``; ``embeddings[scenario][detector]`` ``[n, D]``."""

    start: int
    stop: int
    probs: dict[str, Tensor]
    embeddings: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    params: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # Plugin failures: scenario id -> message (a perturbation raised), detector -> message (embed raised).
    failed: dict[str, str] = field(default_factory=dict)
    failed_detectors: dict[str, str] = field(default_factory=dict)


@dataclass
class ForwardSpec:
    """Everything :func:`run_shard` needs besides the data: fixed for the whole audit."""

    extract: Extractor
    task: str
    n_classes: int
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


def _autocast(spec: ForwardSpec) -> contextlib.AbstractContextManager:
    if spec.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float16
    return torch.autocast(device_type=spec.device.type, dtype=dtype)


def perturb_batch(x: Tensor, indices: Tensor, scenario: Scenario, perturbation: Perturbation | None,
                  seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Apply a scenario's perturbation to a ``[0, 1]`` batch with per-sample keyed randomness."""
    if perturbation is None:
        return x, {}
    keys = sample_keys(stream_key(seed, scenario.perturbation, scenario.severity), indices)
    return perturbation(x, scenario.severity, SampleRNG(keys))


def chunked_forward(extract: Extractor, x: Tensor, chunk: int, pad_last: bool = False) -> tuple[Tensor, Tensor | None]:
    """Call the model on chunks of ``chunk`` samples of ``x`` and concatenate; a shorter last
    chunk runs at its own size, or zero-padded to ``chunk`` with ``pad_last``."""
    n = x.shape[0]
    pad = (-n) % chunk
    if pad and pad_last:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    outs, feats = [], []
    for i in range(0, x.shape[0], chunk):
        out, f = extract(x[i:i + chunk])
        outs.append(out)
        if f is not None:
            feats.append(f)
    return torch.cat(outs)[:n], (torch.cat(feats)[:n] if feats else None)


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
            buf = self.rows[key] = value.new_full((self.n, *value.shape[1:]), float("nan"))
        if value.shape[1:] != buf.shape[1:]:
            raise ValueError(f"per-sample shape {tuple(value.shape[1:])} differs from the earlier batches' "
                             f"{tuple(buf.shape[1:])}")
        buf[offset : offset + value.shape[0]] = value

    def pop(self, key: tuple[str, ...]) -> Tensor:
        """The whole ``[n, ...]`` output on the CPU, dropped from here (one copy from a device)."""
        return self.rows.pop(key).cpu()


def run_shard(batches: Iterator[tuple[Tensor, Tensor]], start: int, stop: int, scenarios: Sequence[Scenario],
              perturbations: dict[str, Perturbation], spec: ForwardSpec,
              on_batch: Callable[[int], None] | None = None) -> ShardOutputs:
    """Evaluate every scenario on one shard of the data (the audit's unit of work).

    ``batches`` yields ``(images [B, C, ...] in [0, 1], dataset indices [B])`` for the samples
    ``start..stop-1`` in order.
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
    failed: dict[str, str] = {}
    failed_detectors: dict[str, str] = {}

    def detector_failed(name: str, owner: str, exc: BaseException) -> None:
        failed_detectors[name] = (f'ood: detector "{name}" of plugin "{owner}" '
                                  f"raised in embed ({type(exc).__name__}: {exc}); it is left out")

    offset = 0
    for x, idx in batches:
        x = x.to(spec.device, non_blocking=True)
        idx = idx.to(spec.device, non_blocking=True)
        for scenario in scenarios:
            if scenario.id in failed:
                continue
            clock.start(scenario.id)
            pert = perturbations.get(scenario.perturbation) if scenario.perturbation else None
            try:
                xp, p = perturb_batch(x, idx, scenario, pert, spec.seed)
            except Exception as exc:  # a broken perturbation plugin loses its scenarios, not the audit
                failed[scenario.id] = (f'perturbation "{scenario.perturbation}" of plugin '
                                       f'"{spec.owners.get(scenario.perturbation, "?")}" raised in scenario '
                                       f"{scenario.id} ({type(exc).__name__}: {exc}); the scenario is left out")
                clock.stop(scenario.id)
                continue
            xn = (xp.float() - spec.mean) / spec.std
            if spec.memory_format is not None:
                xn = xn.contiguous(memory_format=spec.memory_format)
            try:
                with _autocast(spec):
                    out, feats = chunked_forward(spec.extract, xn, spec.model_batch_size, spec.pad_last)
            except Exception as exc:  # the model's fault, not a plugin's: stop, naming where
                raise ModelError(f"model {spec.model_path} raised in scenario {scenario.id} on samples {int(idx[0])}–{int(idx[-1])} "
                                 f"({type(exc).__name__}: {exception_line(exc)}); the dry run on the first batch "
                                 "passed, so check what differs in these samples (e.g. intensities the perturbation "
                                 "produced)") from exc
            out = out.float()
            finite[scenario.id] &= torch.isfinite(out).all()
            rows.put(("probs", scenario.id), offset,
                     outputs_to_probs(out, spec.task, spec.n_classes, spec.output_kind))  # type: ignore[arg-type]
            for d in spec.detectors:
                if (d.needs == "features" and feats is None) or d.name in failed_detectors:
                    continue
                try:
                    emb = d.embed(out, feats.float() if feats is not None else None)
                    if isinstance(emb, Future):
                        pending.setdefault((scenario.id, d.name), []).append((offset, emb))
                    else:
                        rows.put(("embeddings", scenario.id, d.name), offset, emb.float())
                except Exception as exc:  # a broken detector plugin is dropped; the rest are kept
                    detector_failed(d.name, spec.owners.get(id(d), "?"), exc)
            for k, v in p.items():
                # Scalar per-sample parameters are kept for the results; keys and vectors are not.
                if v.ndim == 1 and not k.endswith("key"):
                    param_keys[scenario.id][k] = None
                    rows.put(("params", scenario.id, k), offset, v.float())
            clock.stop(scenario.id)
        offset += x.shape[0]
        if on_batch is not None:
            on_batch(x.shape[0])
    for sid, ok in finite.items():
        if not bool(ok):
            raise ModelOutputError(f"the model produced NaN or Inf outputs in scenario {sid}")
    seconds = clock.seconds()
    for (sid, name), items in pending.items():
        if name in failed_detectors:
            continue
        try:
            for at, fut in items:
                rows.put(("embeddings", sid, name), at, fut.result().float())
        except Exception as exc:  # a failure off the critical path is the detector's, as one in embed
            owner = next((spec.owners.get(id(d), "?") for d in spec.detectors if d.name == name), "?")
            detector_failed(name, owner, exc)
    kept = [s.id for s in scenarios if s.id not in failed]
    detector_names = [d.name for d in spec.detectors if d.name not in failed_detectors]
    return ShardOutputs(
        start, stop,
        probs={sid: rows.pop(("probs", sid)) for sid in kept},
        embeddings={sid: {name: rows.pop(key) for name in detector_names if (key := ("embeddings", sid, name)) in rows.rows}
                    for sid in kept},
        params={sid: {k: rows.pop(("params", sid, k)) for k in param_keys[sid]} for sid in kept},
        seconds=seconds, failed=failed, failed_detectors=failed_detectors,
    )


def auto_workers(dataset: AuditDataset) -> int:
    """Decode files in worker processes; arrays already in memory (npz) are read in-process
    (on an accelerator by a prefetching thread, see :func:`prefetched`)."""
    if dataset.format == "npz" or len(dataset) < 256:
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def prefetched(batches: Iterator[tuple[Tensor, Tensor]], depth: int = 2) -> Iterator[tuple[Tensor, Tensor]]:
    """``batches``, produced up to ``depth`` ahead by a background thread.

    On an accelerator the main thread only queues work, so preprocessing a batch on it (about
    1 ms per 224² image, even from memory) delays the next launch; on a thread it overlaps the
    queued work. (Worker processes did the same but cost seconds to fork and join around every
    shard.) Errors are re-raised in the consumer, in order.
    """
    slots: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(message: tuple[str, object]) -> bool:
        """Put unless the consumer has gone (then the queue may stay full for ever)."""
        while not stop.is_set():
            try:
                slots.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in batches:
                if not offer(("item", item)):
                    return
            offer(("end", None))
        except BaseException as exc:  # handed to the consumer, which raises it
            offer(("error", exc))

    thread = threading.Thread(target=produce, name="medaudit-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "end":
                return
            if kind == "error":
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()


def iterate_batches(dataset: AuditDataset, start: int, stop: int, batch_size: int, num_workers: int,
                    pin_memory: bool) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of ``dataset[start:stop]`` in order, decoded by DataLoader workers."""
    loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=pin_memory,
                        persistent_workers=False)
    try:
        for x, idx in loader:
            yield x, idx.to(torch.int64)
    except MedauditError as exc:
        # A worker process re-raises our error with its whole traceback folded into the message;
        # the user gets the one-line message the loader wrote (the traceback is for --debug).
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        last = text.strip().splitlines()[-1]
        raise type(exc)(last.split(": ", 1)[1] if ": " in last else last) from exc


def exception_line(exc: BaseException) -> str:
    """One line that says what went wrong inside the model.

    A TorchScript error's first line is always "The following operation failed in the
    TorchScript interpreter."; the model's own message (``builtins.ValueError: …``) is the last.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[-1] if isinstance(exc, torch.jit.Error) else lines[0]


def expected_in_channels(module: object) -> int | None:
    """The input channels of the first convolution, for a helpful mismatch message."""
    if not isinstance(module, nn.Module):
        return None
    for p in module.parameters():
        if p.ndim in (4, 5):
            return int(p.shape[1])
        return None
    return None


def dry_run(model: LoadedModel, extract: Extractor, x: Tensor, config: Config, mean: Tensor, std: Tensor) -> str:
    """Run one clean batch to validate the model against the input spec; returns the output kind."""
    xn = (x - mean) / std
    try:
        out, _ = extract(xn)
    except Exception as exc:
        expected = expected_in_channels(model.module)
        if expected is not None and expected != x.shape[1]:
            raise ModelError(f"model {model.path} expects {expected} channels, data has {x.shape[1]} "
                             f"(input.channels = {config.input.channels})") from None
        raise ModelError(f"model {model.path} raised on a batch of shape {tuple(x.shape)} "
                         f"({type(exc).__name__}: {exception_line(exc)}); check input.dims, "
                         "input.channels and input.spatial_size against what the model expects") from None
    if not isinstance(out, Tensor):
        raise ModelError(f"model {model.path} returned {type(out).__name__}, expected a tensor of shape [B, K]")
    check_model_output(out, "clean (dry run)")
    kind = config.model.output if config.model.output != "auto" else detect_output_kind(out, config.task.type)
    try:
        outputs_to_probs(out, config.task.type, len(config.task.classes), kind)
    except ModelOutputError as exc:
        raise ModelError(f"model {model.path}: {exc}") from None
    return kind


def accepts_batch(extract: Extractor, x: Tensor, mean: Tensor, std: Tensor) -> bool:
    """Whether the model takes a batch of ``len(x)`` samples (after the dry run took a full
    chunk): models exported or converted with a fixed batch dimension raise or return the
    wrong number of rows, and get their last chunk zero-padded instead."""
    try:
        out, _ = extract((x - mean) / std)
    except Exception:  # whatever a fixed-shape runtime raises; the full chunk already ran
        return False
    return isinstance(out, Tensor) and out.ndim >= 1 and out.shape[0] == x.shape[0]


def choose_memory_format(model: LoadedModel, extract: Extractor, x: Tensor, config: Config, device: torch.device,
                         mean: Tensor, std: Tensor) -> torch.memory_format | None:
    """The memory format of the audit's forward passes (``audit.channels_last``); converts the model.

    ``True`` always uses channels-last (``channels_last_3d`` for 3-D inputs), ``False`` never.
    ``"auto"`` uses it on a CPU when the model is a torch module with convolution weights whose
    output on the dry-run samples agrees with the contiguous one: oneDNN's CPU convolutions
    measured 1.1-1.6x faster in that format (MONAI DenseNet121 and ResNet-18 at 32² and 224², a
    3-D ResNet-18 at 64³; equal at 64² and 128², see ``benchmarks/README.md``). A model that
    raises in it (e.g. a ``view`` that needs contiguous activations) or disagrees stays
    contiguous. GPUs stay contiguous under ``"auto"``: fp32 cuDNN convolutions there were not
    measured in this format. The choice depends on the model and device only, never on a
    timing, so the same audit always makes it.
    """
    setting = config.audit.channels_last
    module = model.module
    if setting is False or config.input.dims not in (2, 3) or not isinstance(module, nn.Module):
        return None
    fmt = torch.channels_last if config.input.dims == 2 else torch.channels_last_3d
    if setting is True:
        model.module = module.to(memory_format=fmt)
        return fmt
    # Only convolution weights ([out, in, *kernel]) have a layout to gain; a module without
    # them (e.g. an ONNX session behind the module interface) would only pay for the copies.
    if device.type != "cpu" or not any(p.ndim == config.input.dims + 2 for p in module.parameters()):
        return None
    xn = (x - mean) / std
    with torch.inference_mode():
        ref, _ = extract(xn)
    model.module = module.to(memory_format=fmt)
    try:
        with torch.inference_mode():
            out, _ = extract(xn.contiguous(memory_format=fmt))
        agrees = isinstance(out, Tensor) and out.shape == ref.shape and torch.allclose(
            out.float(), ref.float(), rtol=1e-3, atol=1e-4 * max(1.0, float(ref.float().abs().max())))
    except Exception:  # the model cannot run in this format: keep the one it was written for
        agrees = False
    if agrees:
        return fmt
    model.module = module.to(memory_format=torch.contiguous_format)
    return None


class ShardCache:
    """Completed shards on disk, so an interrupted audit can ``--resume``.

    Keyed by a fingerprint of everything that determines the outputs (model and data hashes,
    the input spec, seed, scenarios, shard layout): a cache from another configuration is never
    reused. Files are ``.npz`` (no pickle) written atomically, on a background thread: the
    write (hundreds of MB with feature embeddings) overlaps the next shard or the evaluation;
    :meth:`flush` waits for it.
    """

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.dir = root / fingerprint  # created by the first save, so a run that fails early leaves nothing
        self._writes: list[threading.Thread] = []

    @staticmethod
    def fingerprint(parts: dict[str, object]) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _path(self, start: int) -> Path:
        return self.dir / f"shard-{start:09d}.npz"

    def load(self, start: int, stop: int) -> ShardOutputs | None:
        path = self._path(start)
        if not path.exists():
            return None
        arrays: dict[str, np.ndarray] = dict(np.load(path, allow_pickle=False))
        if any(k.startswith("probs|") and len(v) != stop - start for k, v in arrays.items()):
            return None  # written with another shard layout: recompute rather than misalign
        out = ShardOutputs(start, stop, probs={}, embeddings={}, params={}, seconds={})
        for key, arr in arrays.items():
            kind, _, rest = key.partition("|")
            if kind == "probs":
                out.probs[rest] = torch.from_numpy(arr)
            elif kind == "emb":
                sid, _, det = rest.partition("|")
                out.embeddings.setdefault(sid, {})[det] = torch.from_numpy(arr)
            elif kind == "param":
                sid, _, name = rest.partition("|")
                out.params.setdefault(sid, {})[name] = torch.from_numpy(arr)
            elif kind == "sec":
                out.seconds[rest] = float(arr)
            elif kind == "fail":
                out.failed[rest] = str(arr)
            elif kind == "faildet":
                out.failed_detectors[rest] = str(arr)
        return out

    def save(self, shard: ShardOutputs) -> None:
        arrays: dict[str, np.ndarray] = {}
        for sid, t in shard.probs.items():
            arrays[f"probs|{sid}"] = t.numpy()
            arrays[f"sec|{sid}"] = np.asarray(shard.seconds.get(sid, 0.0))
        for sid, dd in shard.embeddings.items():
            for det, t in dd.items():
                arrays[f"emb|{sid}|{det}"] = t.numpy()
        for sid, pp in shard.params.items():
            for name, t in pp.items():
                arrays[f"param|{sid}|{name}"] = t.numpy()
        for sid, msg in shard.failed.items():
            arrays[f"fail|{sid}"] = np.asarray(msg)
        for det, msg in shard.failed_detectors.items():
            arrays[f"faildet|{det}"] = np.asarray(msg)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._path(shard.start).with_suffix(".tmp.npz")
        final = self._path(shard.start)

        def write() -> None:  # the arrays share memory with tensors nobody modifies any more
            np.savez(tmp, **arrays)
            tmp.replace(final)

        # not a daemon: an interpreter that exits (even on an error) finishes the write first
        thread = threading.Thread(target=write, name="medaudit-shard-cache")
        thread.start()
        self._writes.append(thread)

    def flush(self) -> None:
        """Wait until every saved shard is on disk."""
        while self._writes:
            self._writes.pop().join()


@dataclass
class ForwardResult:
    scenarios: list[Scenario]
    probs: Tensor  # [S, N, K]
    embeddings: dict[str, Tensor]  # detector -> [S, N, D]
    params: dict[str, dict[str, Tensor]]  # scenario -> param -> [N]
    seconds: dict[str, float]
    output_kind: str
    resumed_shards: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # scenario id -> why it was left out
    failed_detectors: dict[str, str] = field(default_factory=dict)
    memory_format: str = "contiguous"  # of the forward passes: "contiguous" or "channels_last"


class Progress:
    """A one-line progress display on stderr (only on a TTY and unless quiet)."""

    def __init__(self, total: int, n_scenarios: int, enabled: bool) -> None:
        self.total, self.n_scenarios, self.done = total, n_scenarios, 0
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        if self.enabled:
            rate = self.done * self.n_scenarios / max(time.perf_counter() - self.t0, 1e-9)
            sys.stderr.write(f"\r  {self.done}/{self.total} samples × {self.n_scenarios} scenarios  ({rate:,.0f} forward/s)")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _merged(shards: list[ShardOutputs], ids: list[str], take: Callable[[ShardOutputs, str], Tensor]) -> Tensor:
    """``[S, N, ...]`` from every shard's ``[n, ...]`` part of every scenario, in index order.

    The result is allocated once and ``take`` pops each part from its shard, so a part is freed as
    soon as it is copied: the merge holds the result and one part. Stacking concatenations held
    the parts, the concatenations and the result at once (at N = 20,000 on the example audit the
    merge raised the forward phase's peak by 84 MB).
    """
    out: Tensor | None = None
    for s, sid in enumerate(ids):
        for sh in shards:
            part = take(sh, sid)
            if out is None:
                out = part.new_empty((len(ids), shards[-1].stop, *part.shape[1:]))
            out[s, sh.start : sh.stop] = part
    assert out is not None  # callers pass at least one shard and one scenario
    return out


def run_forward(model: LoadedModel, extract: Extractor, dataset: AuditDataset, config: Config,
                scenarios: list[Scenario], perturbations: dict[str, Perturbation], device: torch.device,
                detectors: Sequence[Detector] = (), cache: ShardCache | None = None, shard_size: int = 2048,
                progress: bool = False, owners: dict[object, str] | None = None) -> ForwardResult:
    """Run every scenario over the whole dataset, shard by shard, and merge in index order."""
    n = len(dataset)
    channels = config.input.channels
    shape = (1, channels) + (1,) * config.input.dims
    mean = torch.tensor(config.input.mean, dtype=torch.float32).expand(channels).reshape(shape).to(device)
    std = torch.tensor(config.input.std, dtype=torch.float32).expand(channels).reshape(shape).to(device)
    pin = device.type == "cuda"
    chunk = config.audit.model_batch_size
    # Loader batches and shards are multiples of the model chunk so chunks stay aligned to sample indices.
    batch_size = -(-config.audit.batch_size // chunk) * chunk
    shard_size = -(-shard_size // chunk) * chunk
    first_x, _ = next(iterate_batches(dataset, 0, min(n, chunk), chunk, 0, False))
    with torch.inference_mode():
        output_kind = dry_run(model, extract, first_x.to(device), config, mean, std)
        # The short last chunk at its own size: one small call now instead of a padded full
        # chunk in every scenario (up to 17 % more model work where the chunk is large).
        rest = n % chunk
        pad_last = n > chunk and rest > 0 and not accepts_batch(extract, first_x[:rest].to(device), mean, std)
    # A few samples show whether the model runs in channels-last (a fixed-batch model needs the chunk).
    probe = first_x if pad_last else first_x[:4]
    memory_format = choose_memory_format(model, extract, probe.to(device), config, device, mean, std)
    workers = config.audit.num_workers if config.audit.num_workers is not None else auto_workers(dataset)
    spec = ForwardSpec(extract, config.task.type, len(config.task.classes), output_kind, mean, std,
                       config.audit.seed, device, config.audit.precision, detectors, chunk, owners or {},
                       str(model.path), memory_format, pad_last)
    shards: list[ShardOutputs] = []
    resumed = 0
    bar = Progress(n, len(scenarios), progress)
    try:
        for start in range(0, n, shard_size):
            stop = min(start + shard_size, n)
            cached = cache.load(start, stop) if cache is not None else None
            if cached is not None:
                shards.append(cached)
                resumed += 1
                bar.advance(stop - start)
                continue
            batches = iterate_batches(dataset, start, stop, batch_size, workers, pin)
            if workers == 0 and device.type != "cpu":
                batches = prefetched(batches)
            with torch.inference_mode():
                shard = run_shard(batches, start, stop, scenarios, perturbations, spec, on_batch=bar.advance)
            # The last shard is not cached: nothing after it could be resumed, and writing it (hundreds
            # of MB with feature embeddings) would only delay the end of the audit.
            if cache is not None and stop < n:
                cache.save(shard)
            shards.append(shard)
            release_free_memory()  # the shard's transients: the next shard faults in only what it needs
    except BaseException:
        if cache is not None:
            cache.flush()  # the completed shards are on disk when the error reaches the caller
        raise
    bar.close()
    failures = {sid: msg for sh in shards for sid, msg in sh.failed.items()}
    failed_detectors = {d: msg for sh in shards for d, msg in sh.failed_detectors.items()}
    scenarios = [s for s in scenarios if s.id not in failures]
    detectors = [d for d in detectors if d.name not in failed_detectors]
    ids = [s.id for s in scenarios]
    probs = _merged(shards, ids, lambda sh, sid: sh.probs.pop(sid))
    embeddings: dict[str, Tensor] = {}
    for d in detectors:
        if all(d.name in sh.embeddings.get(sid, {}) for sh in shards for sid in ids):
            embeddings[d.name] = _merged(shards, ids, lambda sh, sid, name=d.name: sh.embeddings[sid].pop(name))
    params = {sid: {k: torch.cat([sh.params[sid][k] for sh in shards]) for k in shards[0].params.get(sid, {})} for sid in ids}
    seconds = {sid: sum(sh.seconds.get(sid, 0.0) for sh in shards) for sid in ids}
    del shards
    release_free_memory()  # the shards' parts, now merged
    return ForwardResult(scenarios, probs, embeddings, params, seconds, output_kind, resumed, failures,
                         failed_detectors, "contiguous" if memory_format is None else "channels_last")
