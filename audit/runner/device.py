"""Where and how the forward passes run: the device, torch's CPU threads, autocast, normalisation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from ..config import Config
from ..errors import ConfigError


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


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of ``audit.precision`` (none for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def normalisation(config: Config, device: torch.device) -> tuple[Tensor, Tensor]:
    """``input.mean`` and ``input.std`` as ``[1, C, 1, ...]`` tensors on ``device``."""
    channels = config.input.channels
    shape = (1, channels) + (1,) * config.input.dims
    mean = torch.tensor(config.input.mean, dtype=torch.float32).expand(channels).reshape(shape).to(device)
    std = torch.tensor(config.input.std, dtype=torch.float32).expand(channels).reshape(shape).to(device)
    return mean, std
