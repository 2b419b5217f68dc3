"""Detector checks: embedding shape, the score contract, an obvious shift, state and determinism.

A detector that declares ``needs_head`` is checked as the audit hands it over: with the linear
head of a toy classifier (:func:`toy_head`) and data whose logits that head produces
(:func:`head_batch`); the others on :func:`synthetic_batch`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..detector import Detector, LinearHead
from ..features import pool
from .records import Check, Subject

def detector_checks(sub: Subject) -> Iterator[Check]:
    yield Check(check_detector_declaration)
    kw = {"feature_shape": sub.feature_shape, "device": sub.device}
    yield Check(check_detector_embed_shape, **kw)
    yield Check(check_detector_score_contract, **kw)
    yield Check(check_detector_detects_obvious_shift, **kw)
    yield Check(check_detector_score_keeps_state, **kw)
    yield Check(check_detector_deterministic, **kw)


def synthetic_batch(n: int, shifted: bool, feature_shape: tuple[int, ...] = (8, 2, 2), k: int = 3, seed: int = 0,
                    device: str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """``(logits [N, K], features [N, *feature_shape], labels [N])`` of a toy classifier.

    In distribution: confident logits and features clustered around one mean per class. Shifted
    (the obvious case every detector must see): near-uniform logits and features far from every
    class mean.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    f = int(np.prod(feature_shape))
    means = 2.0 * torch.randn(k, f, generator=torch.Generator().manual_seed(1234))
    if shifted:
        logits = 0.1 * torch.randn(n, k, generator=gen)
        feats = means.mean(0) + 12.0 + 3.0 * torch.randn(n, f, generator=gen)
    else:
        logits = 5.0 * torch.nn.functional.one_hot(labels, k).float() + 0.5 * torch.randn(n, k, generator=gen)
        feats = means[labels] + 0.5 * torch.randn(n, f, generator=gen)
    return logits.to(device), feats.reshape(n, *feature_shape).to(device), labels.to(device)


def toy_head(feature_shape: tuple[int, ...] = (8, 2, 2), k: int = 3, device: str = "cpu") -> LinearHead:
    """The linear head of :func:`head_batch`'s toy classifier: row ``c`` is class ``c``'s pooled
    pattern minus the mean pattern, so each class's own pattern scores highest and a map without
    class structure scores all classes alike."""
    patterns = _patterns(feature_shape, k)
    pooled = patterns.reshape(k, feature_shape[0], -1).mean(dim=2)
    weight = pooled - pooled.mean(dim=0, keepdim=True)
    return LinearHead(weight.to(device), torch.zeros(k, device=device))


def _patterns(feature_shape: tuple[int, ...], k: int) -> Tensor:
    f = int(np.prod(feature_shape))
    return 3.0 * torch.randn(k, f, generator=torch.Generator().manual_seed(4321)).abs()


def head_batch(n: int, shifted: bool, feature_shape: tuple[int, ...] = (8, 2, 2), k: int = 3, seed: int = 0,
               device: str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """:func:`synthetic_batch` for detectors that recompute logits with the head (``needs_head``):
    non-negative maps (as after a ReLU) and logits that *are* :func:`toy_head` of the pooled maps.
    In distribution: each class's non-negative pattern plus a little activation noise. Shifted
    (the obvious case): weak activations with no class pattern, so the logits are near uniform."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    f = int(np.prod(feature_shape))
    noise = torch.randn(n, f, generator=gen).abs()
    feats = 0.3 * noise if shifted else _patterns(feature_shape, k)[labels] + 0.1 * noise
    maps = feats.reshape(n, *feature_shape)
    logits = toy_head(feature_shape, k)(maps.reshape(n, feature_shape[0], -1).mean(dim=2))
    return logits.to(device), maps.to(device), labels.to(device)


def _batch(det: Detector, n: int, shifted: bool, feature_shape: tuple[int, ...], seed: int,
           device: str) -> tuple[Tensor, Tensor, Tensor]:
    return (head_batch if det.needs_head else synthetic_batch)(n, shifted, feature_shape, seed=seed, device=device)


def _with_head(det: Detector, feature_shape: tuple[int, ...], device: str) -> Detector:
    """``det`` as the audit hands it over: a detector that needs the head gets the toy one, a
    ``"stages"`` detector two stages (the toy maps doubled in size, and the maps), and one
    that needs the model the toy classifier of the images :func:`_embed` makes."""
    if (det.needs_head and det.head is None) or (det.needs == "stages" and not det.stages) or (
            det.needs_model and det.model is None):
        det = copy.deepcopy(det)
        head = toy_head(feature_shape, device=device)
        if det.needs_head and det.head is None:
            det.head = head
        if det.needs == "stages" and not det.stages:
            det.stages = tuple((f"stage{i}", tuple(f.shape[1:])) for i, f in
                               enumerate(_stages(torch.zeros(1, *feature_shape))))
        if det.needs_model and det.model is None:
            # inverts _embed's squashing of the maps, pools, classifies: differentiable in the images
            det.model = lambda x: head(pool(4.0 * torch.logit(x.clamp(1e-6, 1 - 1e-6))))
    return det


def _stages(feats: Tensor) -> list[Tensor]:
    """Two stages: a shallower, finer one (the toy maps doubled in size, nearest) and the maps."""
    fine = F.interpolate(feats, scale_factor=2, mode="nearest") if feats.ndim == 4 else feats
    return [fine, feats]


def _embed(det: Detector, logits: Tensor, feats: Tensor) -> Tensor:
    if det.needs == "inputs":  # images in [0, 1]: the toy maps squashed, shift included
        return det.embed(logits, torch.sigmoid(feats / 4.0))
    if det.needs == "stages":
        return det.embed(logits, _stages(feats))
    return det.embed(logits, feats if det.needs == "features" else None)


def _fitted(det: Detector, feature_shape: tuple[int, ...], device: str) -> Detector:
    fresh = copy.deepcopy(_with_head(det, feature_shape, device))
    logits, feats, labels = _batch(fresh, 120, False, feature_shape, 0, device)
    fresh.fit(_embed(fresh, logits, feats), labels)
    return fresh


def _state(obj: Any) -> dict[str, Any]:
    """A deep copy of an object's attributes, for before/after comparison."""
    return copy.deepcopy(dict(vars(obj)))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is type(b) and isinstance(a, Detector):  # fitted sub-detectors (an ensemble's): their state
        return _same(vars(a), vars(b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable ==: compare their attributes
        return hasattr(a, "__dict__") and hasattr(b, "__dict__") and _same(vars(a), vars(b))


def check_detector_declaration(det: Detector) -> None:
    """A non-empty ``name`` usable as a results key and ``needs`` of ``"logits"``, ``"features"``,
    ``"stages"`` or ``"inputs"``."""
    assert isinstance(det, Detector), f"{det!r} is not a medaudit.detector.Detector instance"
    assert isinstance(det.name, str) and det.name.strip() and " " not in det.name, f"name {det.name!r} must be a non-empty str without spaces"
    assert det.needs in ("logits", "features", "stages", "inputs"), (
        f"needs must be 'logits', 'features', 'stages' or 'inputs', got {det.needs!r}")


def check_detector_embed_shape(det: Detector, feature_shape: tuple[int, ...] = (8, 2, 2), device: str = "cpu") -> None:
    """``embed`` returns ``[B, D]`` on the batch's device, each row depending only on its sample."""
    det = _with_head(det, feature_shape, device)
    logits, feats, _ = _batch(det, 6, False, feature_shape, 0, device)
    emb = _embed(det, logits, feats)
    assert isinstance(emb, Tensor) and emb.ndim == 2 and emb.shape[0] == 6, (
        f"embed() returned shape {tuple(getattr(emb, 'shape', ()))}; expected [B, D] with B = 6")
    assert emb.device == logits.device, f"embed() returned a tensor on {emb.device}, the batch is on {logits.device}"
    split = torch.cat([_embed(det, logits[:2], feats[:2]), _embed(det, logits[2:], feats[2:])])
    assert torch.allclose(emb.float(), split.float(), atol=1e-5), "embed() of a batch differs from embed() of its parts"


def check_detector_score_contract(det: Detector, feature_shape: tuple[int, ...] = (8, 2, 2), device: str = "cpu") -> None:
    """After ``fit``, ``score`` returns finite floats ``[N]``, one per embedding."""
    fitted = _fitted(det, feature_shape, device)
    for shifted in (False, True):
        logits, feats, _ = _batch(fitted, 30, shifted, feature_shape, 11, device)
        s = fitted.score(_embed(fitted, logits, feats))
        assert isinstance(s, Tensor) and s.shape == (30,), f"score() returned shape {tuple(getattr(s, 'shape', ()))}; expected [N] = (30,)"
        assert torch.is_floating_point(s), f"score() returned dtype {s.dtype}; expected floating point"
        assert bool(torch.isfinite(s).all()), f"score() returned non-finite values ({'shifted' if shifted else 'in-distribution'} data)"


def check_detector_detects_obvious_shift(det: Detector, feature_shape: tuple[int, ...] = (8, 2, 2), device: str = "cpu") -> None:
    """Scores are higher for obviously shifted data than for in-distribution data (AUROC > 0.9)."""
    fitted = _fitted(det, feature_shape, device)
    li, fi, _ = _batch(fitted, 40, False, feature_shape, 12, device)
    lo, fo, _ = _batch(fitted, 40, True, feature_shape, 13, device)
    s_in = fitted.score(_embed(fitted, li, fi)).double().cpu()
    s_out = fitted.score(_embed(fitted, lo, fo)).double().cpu()
    # AUROC of "shifted" vs "in-distribution" by pairwise comparison (ties count one half)
    auroc = float(((s_out[:, None] > s_in[None, :]).double() + 0.5 * (s_out[:, None] == s_in[None, :]).double()).mean())
    assert auroc > 0.9, (f"shifted data does not score higher (AUROC {auroc:.3f}; mean in-distribution "
                         f"{float(s_in.mean()):.4g}, shifted {float(s_out.mean()):.4g}); higher must mean more shifted")


def check_detector_score_keeps_state(det: Detector, feature_shape: tuple[int, ...] = (8, 2, 2), device: str = "cpu") -> None:
    """``score`` does not modify the fitted state (the same detector scores every scenario)."""
    fitted = _fitted(det, feature_shape, device)
    before = _state(fitted)
    li, fi, _ = _batch(fitted, 20, False, feature_shape, 14, device)
    lo, fo, _ = _batch(fitted, 20, True, feature_shape, 15, device)
    first = fitted.score(_embed(fitted, li, fi))
    fitted.score(_embed(fitted, lo, fo))
    again = fitted.score(_embed(fitted, li, fi))
    changed = [k for k in set(before) | set(vars(fitted)) if not _same(before.get(k), vars(fitted).get(k))]
    assert not changed, f"score() modified fitted state: {sorted(changed)}"
    assert torch.equal(first, again), "scoring the same data after other data gives different scores"


def check_detector_deterministic(det: Detector, feature_shape: tuple[int, ...] = (8, 2, 2), device: str = "cpu") -> None:
    """Two detectors fitted on the same data give identical scores, whatever the global RNG state."""
    with torch.random.fork_rng(devices=[] if device == "cpu" else [torch.device(device)]):
        torch.manual_seed(1)
        a = _fitted(det, feature_shape, device)
        torch.manual_seed(2)
        b = _fitted(det, feature_shape, device)
    logits, feats, _ = _batch(a, 20, True, feature_shape, 16, device)
    sa, sb = a.score(_embed(a, logits, feats)), b.score(_embed(b, logits, feats))
    assert torch.equal(sa, sb), "two fits on the same data give different scores; do not use global RNGs"
