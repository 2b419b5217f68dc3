"""Models as the runner sees them: a callable and its identity (what its outputs mean is the task's, :mod:`medaudit.task`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

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
    #: ``model.output_key``: which element of a tuple, dict or model-output object forward returns
    #: is the output (set by the audit from the config; None: forward returns a tensor).
    output_key: str | int | None = None
    #: ``model.tokens`` (a :class:`medaudit.config.TokensConfig`): how token layers are read.
    tokens: Any = None

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


def _describe_output(out: Any) -> str:
    """What a non-tensor output holds, for the error that asks for ``model.output_key``."""
    if isinstance(out, Mapping):
        keys = [f"{k!r} {_shape(v)}" for k, v in out.items()]
        return f"a {type(out).__name__} with keys {', '.join(keys)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}: " + ", ".join(f"[{i}] {_shape(v)}" for i, v in enumerate(out))
    return f"a {type(out).__name__}"


def _shape(v: Any) -> str:
    return f"tensor {list(v.shape)}" if isinstance(v, Tensor) else type(v).__name__


def select_output(out: Any, key: str | int | None, path: Path | str) -> Tensor:
    """The tensor ``model.output_key`` names in a model's output (the output itself when it is a tensor).

    Hugging Face models return a model-output object (a dict that also has attributes), MONAI's
    ViT a tuple ``(x, hidden_states)``, a traced model a dict or tuple: the key says which element
    is audited. Guessing (e.g. "the first tensor") would silently audit the wrong array.

    :raises ModelOutputError: naming the model, what it returned and what to set.
    """
    if key is None:
        if isinstance(out, Tensor):
            return out
        raise ModelOutputError(f"model {path} returns {_describe_output(out)}, not a tensor; set model.output_key to the "
                               "element that holds the outputs (a key, or an index of a tuple)")
    value: Any = None
    if isinstance(out, Mapping):
        value = out.get(key) if isinstance(key, str) else None
    elif isinstance(out, (tuple, list)):
        index = int(key) if isinstance(key, int) or (isinstance(key, str) and key.lstrip("-").isdigit()) else None
        value = out[index] if index is not None and -len(out) <= index < len(out) else None
    if value is None and isinstance(key, str) and not isinstance(out, (Mapping, tuple, list, Tensor)):
        value = getattr(out, key, None)
    if not isinstance(value, Tensor):
        what = "is a tensor" if isinstance(out, Tensor) else f"returns {_describe_output(out)}"
        raise ModelOutputError(f"model.output_key {key!r} names no tensor in the output of model {path}: it {what}"
                               + ("; remove model.output_key" if isinstance(out, Tensor) else ""))
    return value
