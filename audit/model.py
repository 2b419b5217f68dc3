"""Models as the runner sees them: a callable and its identity (what its outputs mean is the task's, :mod:`medaudit.task`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .errors import ModelError, ModelOutputError


@dataclass
class LoadedModel:
    """What a model-loader plugin returns.

    ``module`` maps a normalised input batch to outputs ``[B, K]``, ``[B, 1]`` or ``[B]``.
    ``feature_modules`` maps layer names to submodules whose outputs can be captured by forward
    hooks (empty when the format does not expose them).
    """

    module: nn.Module | Callable[[Tensor], Tensor]
    path: Path
    format: str
    sha256: str
    num_parameters: int
    dtype: str
    summary: str
    feature_modules: dict[str, nn.Module] = field(default_factory=dict)

    def to(self, device: torch.device) -> "LoadedModel":
        if isinstance(self.module, nn.Module):
            self.module = self.module.to(device)
        return self


def describe_module(module: nn.Module) -> tuple[int, str, str]:
    """``(parameter count, dtype, one-paragraph architecture summary)``."""
    params = list(module.parameters())
    n = sum(p.numel() for p in params)
    dtype = str(params[0].dtype).replace("torch.", "") if params else "n/a"
    children = [f"{name}: {type(m).__name__}" for name, m in module.named_children()]
    original = getattr(module, "original_name", type(module).__name__)
    summary = f"{original} ({len(children)} top-level blocks: {', '.join(children[:12])}{', …' if len(children) > 12 else ''})"
    return n, dtype, summary


def check_model_output(out: Tensor, where: str) -> None:
    if not torch.isfinite(out).all():
        raise ModelOutputError(f"the model produced NaN or Inf outputs in scenario {where}")


def fail_to_load(path: Path, reason: str) -> ModelError:
    return ModelError(f"cannot load model {path}: {reason}")
