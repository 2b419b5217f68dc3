"""Models as the runner sees them: a callable, its identity, and how its outputs become probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from .errors import ModelError, ModelOutputError
from .metric import Task

OutputKind = Literal["logits", "probabilities"]


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


def outputs_to_probs(out: Tensor, task: Task, n_classes: int, kind: OutputKind) -> Tensor:
    """Turn raw model outputs into probabilities ``[B, K]`` (``K = 2`` for binary).

    Binary models may emit ``[B]``, ``[B, 1]`` (score of the positive class) or ``[B, 2]``.
    """
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2:
        raise ModelOutputError(f"model output has shape {tuple(out.shape)}; expected [B, K], [B, 1] or [B]")
    out = out.float()
    if task == "binary":
        if out.shape[1] == 1:
            p1 = torch.sigmoid(out[:, 0]) if kind == "logits" else out[:, 0]
            return torch.stack([1 - p1, p1], dim=1)
        if out.shape[1] != 2:
            raise ModelOutputError(f"binary task but the model outputs {out.shape[1]} values per sample (expected 1 or 2)")
        return torch.softmax(out, dim=1) if kind == "logits" else out
    if out.shape[1] != n_classes:
        raise ModelOutputError(
            f"the model outputs {out.shape[1]} values per sample but task.classes names {n_classes} classes"
        )
    if task == "multilabel":
        return torch.sigmoid(out) if kind == "logits" else out
    return torch.softmax(out, dim=1) if kind == "logits" else out


def detect_output_kind(out: Tensor, task: Task) -> OutputKind:
    """Guess whether outputs are probabilities: all in [0, 1] and, unless multilabel, rows sum to 1."""
    o = out.float()
    if o.ndim == 1:
        o = o[:, None]
    in_unit = bool(((o >= 0) & (o <= 1)).all())
    if not in_unit:
        return "logits"
    if task == "multilabel" or o.shape[1] == 1:
        return "probabilities"
    return "probabilities" if torch.allclose(o.sum(dim=1), torch.ones(o.shape[0]), atol=1e-3) else "logits"


def check_model_output(out: Tensor, where: str) -> None:
    if not torch.isfinite(out).all():
        raise ModelOutputError(f"the model produced NaN or Inf outputs in scenario {where}")


def fail_to_load(path: Path, reason: str) -> ModelError:
    return ModelError(f"cannot load model {path}: {reason}")
