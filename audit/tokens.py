"""Token layouts of vision transformers: CLS, register and patch tokens.

A CNN layer outputs a feature map ``[B, C, *spatial]``; feature detectors global-average-pool
it (:func:`medaudit.features.pool`) and the ``spectral`` detector reads it as a channel × spatial
matrix. A vision-transformer block outputs a **token sequence** ``[B, T, C]``, batch first (the
convention of Hugging Face ``transformers``, timm and MONAI alike). Its T tokens are, in order:

1. an optional **CLS token** (``cls_token`` in HF ViT/DINOv2, timm and MONAI; HF CLIP calls it
   ``class_embedding``), the token a classification head reads;
2. optional further prefix tokens: **register tokens** (DINOv2 with registers, timm
   ``reg_token``) and, in distilled DeiT models, a distillation token;
3. the **patch tokens**, one per image patch in raster order (``T - prefix = g_h · g_w`` for a
   2-D input, ``g_d · g_h · g_w`` for a 3-D one).

This module decides that layout (:func:`find_layout`) and converts tokens into what the
detectors expect:

* the **pooled** vector a feature detector reads (:func:`pooled_tokens`): the CLS token, or the
  mean of the patch tokens. Registers are excluded from every reduction: Darcet et al.,
  "Vision Transformers Need Registers" (ICLR 2024), show that they carry global, artefact-like
  information the network parks outside the image content, so averaging them in would mix
  that into the patch statistics;
* the **patch-token map** ``[B, C, T_patch]`` (:func:`patch_map`), the transpose of the
  ``T_patch × C`` patch-token matrix: the transformer's analogue of a CNN's channel × spatial
  feature map, which the spectral signature reads.

Some transformers have no CLS token at all (e.g. an MAE fine-tune or a timm model built with
``class_token=False, global_pool='avg'``; MONAI's ``ViT`` with ``classification=False``). Their
layout has ``cls=False``; pooling ``"auto"`` then falls back to the patch mean, and pooling
``"cls"`` is an error rather than silently reading a patch token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

__all__ = ["TokenLayout", "find_layout", "is_token_sequence", "pooled_tokens", "patch_map"]

#: The largest prefix the token-count inference tries (CLS + up to 15 registers/other tokens);
#: beyond it a match would be a coincidence of divisors rather than evidence.
MAX_INFERRED_PREFIX = 16

#: Parameter-name suffixes that mark a CLS token (HF ViT/DINOv2 ``embeddings.cls_token``, MONAI
#: and timm ``cls_token``, HF CLIP ``embeddings.class_embedding``).
_CLS_NAMES = ("cls_token", "class_embedding")
#: Register tokens ``[1, R, C]`` (HF Dinov2WithRegisters ``embeddings.register_tokens``, timm ``reg_token``).
_REGISTER_NAMES = ("register_tokens", "reg_token")
#: A distillation token (timm DeiT ``dist_token``, HF DeiT ``embeddings.distillation_token``): a
#: prefix token that is neither CLS nor a register, but must be skipped like them.
_DIST_NAMES = ("dist_token", "distillation_token")

_POOLINGS = ("auto", "cls", "mean")


@dataclass(frozen=True)
class TokenLayout:
    """Where the patch tokens start in a ``[B, T, C]`` token sequence.

    Attributes
    ----------
    prefix : int
        Leading tokens that are not patches (CLS + registers + any distillation token); the
        patch tokens are ``tokens[:, prefix:]``.
    cls : bool
        The first token is a CLS token.
    registers : int
        Register tokens after the CLS token.
    source : str
        How the layout was determined, in words (written to results.json), e.g.
        ``"model parameters 'embeddings.cls_token', 'embeddings.register_tokens'"``.
    """

    prefix: int
    cls: bool
    registers: int
    source: str


def _plural(n: int, word: str) -> str:
    return f"{word}{'' if n == 1 else 's'}"


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _tensor_names(module: object) -> list[tuple[str, Tensor | None]]:
    """``(name, tensor)`` of the module's parameters and buffers; empty for a non-module.

    Parameter names are the one trace of the architecture that survives every format medaudit
    loads: eager modules, TorchScript (traced or scripted, saved and loaded) and flat
    torch.export GraphModules all keep ``embeddings.cls_token`` under that name.
    """
    out: list[tuple[str, Tensor | None]] = []
    for method in ("named_parameters", "named_buffers"):
        fn = getattr(module, method, None)
        if callable(fn):
            try:
                out.extend(fn())
            except Exception:  # a foreign object with a same-named method; it is only a hint
                continue
    return out


def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _from_prefix_attribute(module: object) -> TokenLayout | None:
    """timm's ``num_prefix_tokens`` on the module or (for a wrapped backbone) a submodule.

    timm records the count itself, so it is preferred over counting parameters: it already
    includes distillation tokens and registers as the model's forward prepends them.
    """
    candidates: list[tuple[str, object]] = [("", module)]
    named = getattr(module, "named_modules", None)
    if callable(named):
        try:
            candidates += [(n, m) for n, m in named() if n]
        except Exception:  # not an nn.Module after all: the module itself is the only candidate
            pass
    for name, owner in candidates:
        n = getattr(owner, "num_prefix_tokens", None)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            continue
        where = f"{name}." if name else ""
        cls = n >= 1 and getattr(owner, "cls_token", None) is not None
        regs = getattr(owner, "num_reg_tokens", None)
        if not isinstance(regs, int) or isinstance(regs, bool) or not 0 <= regs <= n - int(cls):
            regs = n - int(cls)  # no separate count: every non-CLS prefix token is a register
        source = f"model attribute '{where}num_prefix_tokens' = {n}"
        if cls:
            source += f", parameter '{where}cls_token'"
        return TokenLayout(prefix=n, cls=cls, registers=regs, source=source)
    return None


def _from_parameters(module: object) -> TokenLayout | None:
    """CLS/register/distillation tokens from the names (and, for registers, shapes) of parameters."""
    cls_names: list[str] = []
    dist_names: list[str] = []
    reg_counts: dict[str, int] = {}
    for name, tensor in _tensor_names(module):
        last = _last(name)
        if last.endswith(_CLS_NAMES):
            cls_names.append(name)
        elif last.endswith(_DIST_NAMES):
            dist_names.append(name)
        elif last.endswith(_REGISTER_NAMES) and tensor is not None:
            # [1, R, C] in HF and timm: the register count is the token axis, second to last
            # (also right for an unbatched [R, C]).
            reg_counts[name] = int(tensor.shape[-2]) if tensor.ndim >= 2 else 1
    if not (cls_names or dist_names or reg_counts):
        return None
    if len(set(reg_counts.values())) > 1:
        return None  # two backbones with different register counts: which one is hooked is unknown
    registers = next(iter(reg_counts.values()), 0)
    cls = bool(cls_names)
    dist = 1 if dist_names else 0
    names = cls_names + dist_names + list(reg_counts)
    source = f"model {_plural(len(names), 'parameter')} {_quoted(names)}"
    return TokenLayout(prefix=int(cls) + dist + registers, cls=cls, registers=registers, source=source)


def _patch_grid(n: int, size: Sequence[int]) -> int | None:
    """The isotropic patch size ``s`` that tiles ``size`` into exactly ``n`` patches, if any.

    ``s`` must divide every spatial dimension (a ViT's patch embedding is a convolution with
    kernel = stride = s, so the grid is ``size // s`` per axis).
    """
    if n < 1:
        return None
    g = 0
    for d in size:
        g = math.gcd(g, d)
    for s in range(1, g + 1):
        if g % s == 0 and math.prod(d // s for d in size) == n:
            return s
    return None


def _size_text(size: Sequence[int]) -> str:
    if len(set(size)) == 1:
        return f"{size[0]}{'²' if len(size) == 2 else '³' if len(size) == 3 else f'^{len(size)}'}"
    return "×".join(str(d) for d in size)


def _infer(n_tokens: int, size: Sequence[int]) -> TokenLayout | None:
    """The smallest prefix whose remaining tokens form a patch grid of the input size."""
    for p in range(0, min(MAX_INFERRED_PREFIX, n_tokens - 1) + 1):
        s = _patch_grid(n_tokens - p, size)
        if s is None:
            continue
        grid = "×".join(str(d // s) for d in size)
        count = f"{p} + {grid}" if p else grid
        return TokenLayout(prefix=p, cls=p >= 1, registers=max(p - 1, 0),
                           source=f"inferred from the token count (T = {count} at {_size_text(size)})")
    return None


def find_layout(module: object, n_tokens: int, spatial_size: Sequence[int] | None = None,
                prefix: int | None = None, cls: bool | None = None) -> TokenLayout:
    """Decide the token layout of a vision transformer's ``[B, n_tokens, C]`` block outputs.

    The rules, first match wins:

    1. **Configured** (``model.tokens``): ``prefix`` given → it is used, with ``cls`` (default:
       ``prefix >= 1``); the remaining non-CLS prefix tokens count as registers.
    2. **From the model**: timm's ``num_prefix_tokens`` attribute on the module or a submodule
       (``cls`` when that module's ``cls_token`` is not ``None``); else the names of parameters
       and buffers: one ending with ``cls_token`` or ``class_embedding`` means a CLS token, one
       ending with ``register_tokens`` or ``reg_token`` (shape ``[1, R, C]``) means R
       registers, one ending with ``dist_token``/``distillation_token`` (DeiT) one more prefix
       token. Parameter names survive TorchScript tracing/scripting and torch.export, so this
       works for every loadable format that has parameters.
    3. **From the token count**: the smallest ``p`` in ``0..16`` such that ``n_tokens - p``
       patches tile ``spatial_size`` with an integer patch size dividing every dimension
       (2-D: ``n_tokens - p = (H/s)·(W/s)``; 3-D: ``(D/s)·(H/s)·(W/s)``); ``cls = p >= 1``,
       ``registers = p - 1``. Choosing the smallest ``p`` makes e.g. 17 tokens at 32² a CLS +
       4×4 patches, not 8 prefix tokens + 3×3 (a patch size of 32/3 is impossible).

    If ``cls`` is given without ``prefix``, the layout is found by rules 2/3 and only the CLS
    flag is overridden.

    Parameters
    ----------
    module : object
        The model (eager ``nn.Module``, TorchScript module, torch.export ``GraphModule``, or any
        callable, which then has no parameters to read).
    n_tokens : int
        T, the token count of the captured layer's output.
    spatial_size : sequence of int, optional
        The model input's spatial size (``(H, W)`` or ``(D, H, W)``), for rule 3.
    prefix : int, optional
        Configured number of leading non-patch tokens (``model.tokens.prefix``).
    cls : bool, optional
        Configured: whether the first token is a CLS token (``model.tokens.cls``).

    Returns
    -------
    TokenLayout

    Raises
    ------
    ValueError
        When a configured or found prefix is not in ``0 <= prefix < n_tokens``, when ``cls`` is
        true with no prefix token, or when no rule determines the layout (the message says to
        set ``model.tokens.prefix``).
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive integer, got {n_tokens!r}")

    if prefix is not None:
        if isinstance(prefix, bool) or not isinstance(prefix, int) or not 0 <= prefix < n_tokens:
            raise ValueError(f"model.tokens.prefix = {prefix!r} is out of range: the layer output has {n_tokens} "
                             f"tokens, so the prefix must be in 0..{n_tokens - 1} (at least one patch token)")
        has_cls = prefix >= 1 if cls is None else bool(cls)
        if has_cls and prefix < 1:
            raise ValueError("model.tokens.cls is true but model.tokens.prefix = 0: a CLS token is a prefix token")
        return TokenLayout(prefix=prefix, cls=has_cls, registers=prefix - int(has_cls),
                           source="configured (model.tokens)")

    layout = _from_prefix_attribute(module) or _from_parameters(module)
    if layout is not None and layout.prefix >= n_tokens:
        raise ValueError(f"the model's {layout.source} give {layout.prefix} prefix tokens, but the layer output has "
                         f"only {n_tokens} tokens; set model.tokens.prefix for this layer")
    if layout is None and spatial_size is not None:
        size = tuple(int(d) for d in spatial_size)
        if size and all(d >= 1 for d in size):
            layout = _infer(n_tokens, size)
    if layout is None:
        where = f" at input size {tuple(spatial_size)}" if spatial_size is not None else " (input size unknown)"
        raise ValueError(f"the token layout could not be found for {n_tokens} tokens{where}: the model has no "
                         "CLS/register parameters and the count is not a prefix plus a patch grid; set "
                         "model.tokens.prefix (the number of tokens before the patch tokens: 1 for a CLS token, "
                         "plus any register tokens)")
    if cls is not None and bool(cls) != layout.cls:
        if cls and layout.prefix < 1:
            raise ValueError(f"model.tokens.cls is true but the layout ({layout.source}) has no prefix token; "
                             "set model.tokens.prefix as well")
        layout = TokenLayout(prefix=layout.prefix, cls=bool(cls), registers=layout.prefix - int(bool(cls)),
                             source=f"{layout.source}; CLS configured (model.tokens.cls)")
    return layout


def is_token_sequence(t: Tensor, input_dims: int) -> bool:
    """Whether a captured layer output is a token sequence ``[B, T, C]``.

    A model whose input images have ``input_dims`` (2 or 3) spatial dimensions has CNN feature
    maps of 4 or 5 dimensions; a 3-D output of such a model is a token sequence. For 1-D inputs a
    3-D output is a CNN's ``[B, C, L]`` map, so the answer is ``False``.

    Parameters
    ----------
    t : Tensor
        The captured layer output.
    input_dims : int
        Spatial dimensions of the model's input images.

    Returns
    -------
    bool
    """
    return input_dims in (2, 3) and t.ndim == 3


def _check(tokens: Tensor, layout: TokenLayout) -> None:
    if tokens.ndim != 3:
        raise ValueError(f"expected a token sequence [B, T, C], got shape {tuple(tokens.shape)}")
    if not 0 <= layout.prefix < tokens.shape[1]:
        raise ValueError(f"the token layout has {layout.prefix} prefix tokens but the sequence has only "
                         f"{tokens.shape[1]} tokens; set model.tokens.prefix for this layer")


def pooled_tokens(tokens: Tensor, layout: TokenLayout, pooling: str) -> Tensor:
    """The vector a feature detector reads: ``[B, T, C] -> [B, C]``.

    Parameters
    ----------
    tokens : Tensor
        ``[B, T, C]`` token sequence.
    layout : TokenLayout
        From :func:`find_layout`.
    pooling : {"auto", "cls", "mean"}
        ``"cls"``: the CLS token (what the classification head reads); ``"mean"``: the mean of
        the patch tokens ``tokens[:, prefix:]``, never the registers; ``"auto"``: ``"cls"`` when
        the model has a CLS token, else ``"mean"``.

    Returns
    -------
    Tensor
        ``[B, C]``.

    Raises
    ------
    ValueError
        For ``"cls"`` on a layout without a CLS token, an unknown pooling, or a sequence that
        does not fit the layout.
    """
    if pooling not in _POOLINGS:
        raise ValueError(f"unknown token pooling {pooling!r}; choose one of {', '.join(_POOLINGS)}")
    _check(tokens, layout)
    if pooling == "auto":
        pooling = "cls" if layout.cls else "mean"
    if pooling == "cls":
        if not layout.cls:
            raise ValueError(f"this model has no CLS token; use pooling mean (token layout {layout.source})")
        return tokens[:, 0]
    # Patch tokens only: registers (and a distillation token) hold global, non-local content.
    return tokens[:, layout.prefix:].mean(dim=1)


def patch_map(tokens: Tensor, layout: TokenLayout) -> Tensor:
    """The patch tokens, channels first: ``[B, T, C] -> [B, C, T - prefix]``, contiguous.

    The transformer's analogue of a CNN's ``[B, C, H·W]`` feature map, for the spectral
    signature; contiguous because the consumer flattens and multiplies it.

    Parameters
    ----------
    tokens : Tensor
        ``[B, T, C]`` token sequence.
    layout : TokenLayout
        From :func:`find_layout`.

    Returns
    -------
    Tensor
        ``[B, C, T - prefix]``.
    """
    _check(tokens, layout)
    return tokens[:, layout.prefix:].transpose(1, 2).contiguous()
