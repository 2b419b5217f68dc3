"""Probing the model once before the forward passes: does it run on the input spec, what does it
output, which memory format, and does it take a short last chunk.

What the probe decides is recorded in a :class:`ModelProbe` and carried by every unit of work
(:class:`~medaudit.runner.plan.WorkUnit`), so a unit run in another process computes the same
numerics without probing again. Every decision depends on the model, the first samples and the
device only, never on a timing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import Config
from ..errors import ModelError, ModelOutputError, OutputWidthError
from ..model import LoadedModel, check_model_output
from ..features import Extractor
from ..task import check_reduced, task_of
from .batches import device_targets
from .device import autocast

# The forward passes' memory format by its name in a unit of work (and in results.json, where
# both channels-last formats are "channels_last").
MEMORY_FORMATS: dict[str, torch.memory_format | None] = {
    "contiguous": None, "channels_last": torch.channels_last, "channels_last_3d": torch.channels_last_3d,
}


@dataclass(frozen=True)
class ModelProbe:
    """What the probe decided, fixed for the whole audit."""

    output_kind: str  # "logits" or "probabilities"
    memory_format: str  # a key of MEMORY_FORMATS
    pad_last: bool  # zero-pad a short last chunk (a model with a fixed batch size)


def memory_format_name(fmt: torch.memory_format | None) -> str:
    return next(name for name, f in MEMORY_FORMATS.items() if f == fmt)


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


def dry_run(model: LoadedModel, extract: Extractor, x: Tensor, config: Config, mean: Tensor, std: Tensor,
            targets: dict[str, Tensor] | None = None) -> str:
    """Run one clean batch to validate the model against the input spec; returns the output kind.
    ``targets``: the batch's label maps, for a task that reduces outputs against them."""
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
    task = task_of(config.task)
    kind = config.model.output if config.model.output != "auto" else task.detect_output_kind(out)
    try:
        reduced = (task.reduce(out, kind, config.task) if targets is None
                   else task.reduce(out, kind, config.task, targets))
    except OutputWidthError as exc:  # keeps its type: the audit can name the labels behind the class count
        raise OutputWidthError(f"model {model.path}: {exc}", exc.width, exc.n_classes) from None
    except ModelOutputError as exc:
        raise ModelError(f"model {model.path}: {exc}") from None
    check_reduced(task, reduced, config.task, x.shape[0])
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


def probe_model(model: LoadedModel, extract: Extractor, first_x: Tensor, n: int, config: Config,
                device: torch.device, mean: Tensor, std: Tensor, first_extras: dict[str, Tensor] | None = None,
                memory_format: str | None = None) -> ModelProbe:
    """Dry run, short-chunk check and memory format on ``first_x`` (the first model chunk of the
    ``n`` samples, with its ``first_extras``: label maps for a segmentation task); converts the
    model to the chosen memory format. ``memory_format`` (a name the audit's own probe chose) is
    kept instead of choosing again: an extra data set's passes (``--reference``, ``--ood-data``)
    run the model as the audit's did."""
    chunk = config.audit.model_batch_size
    with torch.inference_mode():
        targets = device_targets(task_of(config.task), first_extras or {}, device)
        output_kind = dry_run(model, extract, first_x.to(device), config, mean, std, targets)
        # The short last chunk at its own size: one small call now instead of a padded full
        # chunk in every scenario (up to 17 % more model work where the chunk is large).
        rest = n % chunk
        pad_last = n > chunk and rest > 0 and not accepts_batch(extract, first_x[:rest].to(device), mean, std)
    if memory_format is not None:  # the model is already in it
        return ModelProbe(output_kind, memory_format, pad_last)
    # A few samples show whether the model runs in channels-last (a fixed-batch model needs the chunk).
    sample = first_x if pad_last else first_x[:4]
    fmt = choose_memory_format(model, extract, sample.to(device), config, device, mean, std)
    return ModelProbe(output_kind, memory_format_name(fmt), pad_last)


def chunk_calls(extract: Extractor, first_x: Tensor, n: int, config: Config, device: torch.device, mean: Tensor,
                std: Tensor, probe: ModelProbe) -> list[Callable[[], object]]:
    """The model calls of the forward passes on the dry-run samples, as the shard loop makes them
    (memory format, precision): a full chunk and, where the data end in a shorter chunk that is
    not padded, one of that size. :func:`~medaudit.runner.device.choose_threads` times and
    compares them."""
    chunk = config.audit.model_batch_size
    fmt = MEMORY_FORMATS[probe.memory_format]
    xn = (first_x.to(device) - mean) / std
    if fmt is not None:
        xn = xn.contiguous(memory_format=fmt)
    sizes = [len(xn)] + ([n % chunk] if n > chunk and n % chunk and not probe.pad_last else [])

    def call(size: int) -> object:
        with torch.inference_mode(), autocast(config.audit.precision, device):
            return extract(xn[:size])

    return [lambda size=size: call(size) for size in sizes]
