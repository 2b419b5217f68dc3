"""Capturing an intermediate layer's output in the same forward pass as the model's outputs.

:func:`make_extractor` returns the runner's ``extract(x) -> (outputs, features | None)`` for a
loaded model and ``model.feature_layer``. How the layer is reached depends on the format:

* **eager modules** (state dict + arch, trusted pickles) and **unflattened torch.export
  programs** (what the built-in loader returns: ``torch.export.unflatten`` rebuilds the module
  hierarchy as modules that are really called): a forward hook on the named submodule.
* **flat torch.export graphs** (``ExportedProgram.module()``): the submodules are listed by
  ``named_modules()`` but never called (the graph is flat), so a hook would never fire. Every
  graph node records the module stack it was traced in (``meta["nn_module_stack"]``); the layer's
  output is the one node inside the layer whose value is used outside it. A copy of the graph gets
  a call that records that value; the parameters are shared, the user's module is not modified.
* **TorchScript**: loaded ``ScriptModule``s refuse ``register_forward_hook``. The ``forward``
  graph is copied, the ``prim::CallMethod[name="forward"]`` of the layer is located (calls of the
  enclosing submodules are inlined with ``Graph.insertGraph`` on the way down, e.g. for
  ``features.3``), and the copy returns ``(outputs, layer output)``; it is compiled with
  ``torch._C._create_function_from_graph`` and called with the module as ``self``. One forward
  pass, same weights, same numerics. This fails, with a warning, when the layer is called inside
  control flow (``if``/loop blocks), or more than once.
* **ONNX** and plain callables: no layer can be reached; a warning says so.

A layer name the model does not have is a :class:`~medaudit.errors.ConfigError` listing the
available names. A layer that exists but cannot be captured gives a warning, and the returned
extractor yields ``None`` features so feature-based detectors are skipped.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from .detector import LinearHead
from .errors import ConfigError
from .model import LoadedModel, select_output
from .tokens import TokenLayout, find_layout, is_token_sequence, patch_map, pooled_tokens

__all__ = ["FeatureExtractor", "make_extractor", "available_layers", "choose_feature_layer", "choose_stages"]

#: What an extractor captures besides the outputs: each captured layer's output, by layer name.
Captured = dict[str, Tensor]
Extractor = Callable[[Tensor], tuple[Tensor, Captured | None]]


def _first_tensor(value: Any) -> Tensor | None:
    """The layer's output tensor; the first tensor of a tuple/list output (e.g. RNN-style returns)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, Tensor):
                return v
    return None


#: Key suffix under which an extractor returns a token layer's CLS token ``[B, C]`` beside the
#: layer's patch-token map (see :class:`FeatureExtractor`).
CLS_SUFFIX = "[cls]"


class FeatureExtractor:
    """``extract(x) -> (outputs, {layer: output} | None)`` with a record of how layers are reached.

    The outputs are the tensor ``model.output_key`` names (:func:`medaudit.model.select_output`).
    A captured layer whose output is a token sequence ``[B, T, C]`` (a vision transformer's block,
    :mod:`medaudit.tokens`) is returned as its patch-token map ``[B, C, T_patch]`` — the channel ×
    spatial matrix a CNN's feature map is, which ``spectral`` reads and :func:`pool` averages into
    the mean patch token — and, when the model has a CLS token, that token ``[B, C]`` under
    ``layer + CLS_SUFFIX`` (:func:`feature_vector` picks the vector feature detectors read).
    Register tokens are in neither.

    Attributes
    ----------
    layers : tuple of str
        The captured layers (empty: outputs only, and ``None`` in place of the dict).
    method : str
        ``"none"``, ``"hook"``, ``"fx"`` or ``"torchscript-graph"``.
    missed : int
        Calls in which a layer was not reached (e.g. a hooked module skipped by the model's
        control flow); such a layer is absent from that call's dict.
    """

    def __init__(self, call: Callable[[Tensor], tuple[Any, Captured | None]], layers: tuple[str, ...], method: str,
                 handles: tuple[Any, ...] = (), model: LoadedModel | None = None) -> None:
        self._call = call
        self.layers = layers
        self.method = method
        self.missed = 0
        self._handles = list(handles)
        self._model = model
        #: The token layout of each token layer met so far (results.json ``model.tokens``).
        self.token_layouts: dict[str, TokenLayout] = {}

    def __call__(self, x: Tensor) -> tuple[Tensor, Captured | None]:
        raw, feats = self._call(x)
        if self.layers and (feats is None or len(feats) < len(self.layers)):
            self.missed += 1
        if self._model is None:
            return raw, feats
        out = select_output(raw, self._model.output_key, self._model.path)
        if feats and x.ndim in (4, 5):
            feats = self._tokens(feats, tuple(x.shape[2:]))
        return out, feats

    def _tokens(self, feats: Captured, spatial: tuple[int, ...]) -> Captured:
        """Token layers as patch-token maps (and CLS tokens); other layers as they are."""
        assert self._model is not None
        converted: Captured = {}
        for layer, value in feats.items():
            if not is_token_sequence(value, len(spatial)):
                converted[layer] = value
                continue
            layout = self.token_layouts.get(layer)
            if layout is None or layout.prefix >= value.shape[1]:
                cfg = self._model.tokens
                layout = find_layout(_unwrap(self._model.module), int(value.shape[1]), spatial,
                                     None if cfg is None else cfg.prefix, None if cfg is None else cfg.cls)
                self.token_layouts[layer] = layout
            converted[layer] = patch_map(value, layout)
            if layout.cls:
                converted[layer + CLS_SUFFIX] = pooled_tokens(value, layout, "cls")
        return converted

    def close(self) -> None:
        """Remove the forward hooks, if any were registered."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _is_script(module: object) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def _fx_scopes(gm: torch.fx.GraphModule) -> dict[str, list[torch.fx.Node]]:
    """Layer path -> nodes traced inside it, from torch.export's ``nn_module_stack`` metadata."""
    scopes: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        for path, _type in (node.meta.get("nn_module_stack") or {}).values():
            path = str(path)
            if path.startswith("L['self']."):  # older dynamo spelling of the same path
                path = path[len("L['self']."):]
            scopes.setdefault(path, []).append(node)
    return scopes


def pool(features: Tensor) -> Tensor:
    """Global average pooling ``[B, C, *spatial] -> [B, C]``; ``[B, D]`` features pass through."""
    return features.flatten(2).mean(dim=2) if features.ndim > 2 else features


def feature_vector(feats: Captured, layer: str, pooling: str = "auto") -> Tensor | None:
    """What feature detectors read from ``layer`` of an extractor's capture: a token layer's CLS
    token (``pooling`` ``cls``, or ``auto`` when the model has one), else the layer's output as
    captured (a feature map, or a token layer's patch-token map, which :func:`pool` averages into
    the mean patch token). None when the layer was not captured.

    :raises ValueError: ``pooling: cls`` on a token layer of a model without a CLS token.
    """
    value = feats.get(layer)
    if value is None or pooling == "mean":
        return value
    cls = feats.get(layer + CLS_SUFFIX)
    if cls is not None:
        return cls
    if pooling == "cls" and value.ndim == 3:
        raise ValueError(f"model.tokens.pooling is cls, but layer {layer!r} has no CLS token (this model has none); "
                         "set model.tokens.pooling: mean (or auto)")
    return value


def _unwrap(module: Any) -> Any:
    """An ``ExportedProgram`` is not callable; its ``.module()`` is the flat GraphModule."""
    return module.module() if isinstance(module, torch.export.ExportedProgram) else module


def model_callable(model: LoadedModel) -> Callable[[Tensor], Tensor]:
    """The loaded model as a callable returning its output tensor (an ``ExportedProgram`` is not
    callable; ``model.output_key`` picks the tensor from a tuple, dict or model-output object)."""
    module = _unwrap(model.module)
    return lambda x: select_output(module(x), model.output_key, model.path)


def available_layers(model: LoadedModel) -> list[str]:
    """Layer names ``model.feature_layer`` may name for this model (empty when none can be)."""
    module = _unwrap(model.module)
    names: set[str] = set(model.feature_modules)
    if isinstance(module, nn.Module) and not (type(module).__name__ == "OnnxModule"):
        names |= {n for n, _ in module.named_modules() if n}
        if isinstance(module, torch.fx.GraphModule):
            names |= {p for p in _fx_scopes(module) if p}
    return sorted(names)


def _hook_extractor(module: Callable[[Tensor], Tensor], subs: dict[str, nn.Module]) -> FeatureExtractor:
    holder: Captured = {}

    def hook_for(layer: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            # Last call wins when a module is reused; detach so nothing holds the graph.
            t = _first_tensor(out)
            if t is not None:
                holder[layer] = t.detach()
        return hook

    handles = tuple(sub.register_forward_hook(hook_for(layer)) for layer, sub in subs.items())

    def call(x: Tensor) -> tuple[Tensor, Captured | None]:
        holder.clear()
        out = module(x)
        feats = dict(holder)
        holder.clear()
        return out, feats

    return FeatureExtractor(call, tuple(subs), "hook", handles)


def _fx_extractor(gm: torch.fx.GraphModule, layers: tuple[str, ...]) -> FeatureExtractor:
    """Record the value leaving each layer in a flat exported graph (see module docstring)."""
    scopes = _fx_scopes(gm)
    graph = copy.deepcopy(gm.graph)
    holder: Captured = {}
    for layer in layers:
        scope = scopes.get(layer)
        if not scope:
            raise RuntimeError(f"no graph node was traced inside {layer!r}")
        inside = set(scope)
        leaving = [n for n in scope if n.op != "placeholder" and any(u not in inside for u in n.users)]
        if len(leaving) != 1:
            raise RuntimeError(f"{len(leaving)} values leave {layer!r} in the graph (need exactly one tensor output)")
        target = next(n for n in graph.nodes if n.name == leaving[0].name)

        def record(t: Any, layer: str = layer) -> None:
            tt = _first_tensor(t)
            if tt is not None:
                holder[layer] = tt.detach()

        with graph.inserting_after(target):
            graph.call_function(record, (target,))
    # Shares parameters and buffers with gm (GraphModule copies references, not tensors).
    new_gm = torch.fx.GraphModule(gm, graph)

    def call(x: Tensor) -> tuple[Tensor, Captured | None]:
        holder.clear()
        out = new_gm(x)
        feats = dict(holder)
        holder.clear()
        return out, feats

    return FeatureExtractor(call, layers, "fx")


def _getattr_path(value: Any) -> list[str] | None:
    """The attribute path from ``self`` of a TorchScript module value (``prim::GetAttr`` chain)."""
    path: list[str] = []
    node = value.node()
    while node.kind() == "prim::GetAttr":
        path.append(node.s("name"))
        value = node.inputsAt(0)
        node = value.node()
    if node.kind() != "prim::Param":
        return None
    return path[::-1]


def _script_extractor(module: torch.jit.ScriptModule, layers: tuple[str, ...]) -> FeatureExtractor:
    """Graph surgery on a TorchScript ``forward`` so it also returns the layers' outputs."""
    graph = module.forward.graph.copy()
    found: dict[str, Any] = {}  # layer -> the graph value of its output
    for layer in layers:
        target = layer.split(".")
        for _ in range(len(target)):
            calls = [n for n in graph.nodes()  # top-level block only: values inside if/loop blocks are not visible at return
                     if n.kind() == "prim::CallMethod" and n.s("name") == "forward"]
            paths = [(n, _getattr_path(n.inputsAt(0))) for n in calls]
            hits = [n for n, p in paths if p == target]
            if len(hits) > 1:
                raise RuntimeError(f"forward calls {layer!r} {len(hits)} times")
            if hits:
                found[layer] = hits[0].output()
                break
            # Inline the call of the enclosing submodule (a proper prefix of the target path) and look again.
            parents = [(n, p) for n, p in paths if p is not None and len(p) < len(target) and p == target[: len(p)]]
            if len(parents) != 1:
                break
            node, path = parents[0]
            sub: Any = module
            for part in path:
                sub = getattr(sub, part)
            callee = sub._c._get_method("forward").graph.copy()  # traced submodules expose forward as a plain function
            with graph.insert_point_guard(node):
                outs = graph.insertGraph(callee, list(node.inputs()))
            for name, value in found.items():  # a layer found earlier may be the call inlined now
                if value == node.output():
                    found[name] = outs[0]
            node.output().replaceAllUsesWith(outs[0])
            node.destroy()
        if layer not in found:
            raise RuntimeError(f"{layer!r} is not called directly by forward (it may be called inside an if/loop "
                               "block or through another method)")
    ret = graph.return_node()
    old = ret.inputsAt(0)
    values = [found[layer] for layer in layers]
    tup = graph.create("prim::TupleConstruct", [old, *values])
    tup.output().setType(torch._C.TupleType([old.type(), *(v.type() for v in values)]))
    tup.insertBefore(ret)
    ret.replaceInput(0, tup.output())
    fn = torch._C._create_function_from_graph("medaudit_forward_with_features", graph)

    def call(x: Tensor) -> tuple[Tensor, Captured | None]:
        out, *feats = fn(module._c, x)
        return out, {layer: t for layer, f in zip(layers, feats) if (t := _first_tensor(f)) is not None}

    return FeatureExtractor(call, layers, "torchscript-graph")


def make_extractor(model: LoadedModel, layers: str | Sequence[str] | None,
                   setting: str = "model.feature_layer") -> tuple[FeatureExtractor, str | None]:
    """Build the runner's extractor for ``model`` capturing ``layers`` in the same forward pass.

    Parameters
    ----------
    model : LoadedModel
        What the model-loader plugin returned (its ``output_key`` and ``tokens`` as the audit set them).
    layers : str, sequence of str, or None
        Dotted submodule names (``"features"``, ``"layer4.1"``); None or empty captures nothing.
    setting : str
        The configuration key that named the layers, for messages.

    Returns
    -------
    extract, warning
        ``extract(x) -> (outputs, {layer: output} | None)`` (see :class:`FeatureExtractor` for
        token layers); ``warning`` is ``None`` when every layer is captured, otherwise a message
        naming the layers, the format and what to do (the extractor then captures nothing and
        feature-based detectors are skipped).

    Raises
    ------
    ConfigError
        When the model exposes named layers but not one of ``layers``; the message lists them.
    """
    extract, warning = _make_extractor(model, layers, setting)
    extract._model = model
    return extract, warning


def _make_extractor(model: LoadedModel, layers: str | Sequence[str] | None,
                   setting: str = "model.feature_layer") -> tuple[FeatureExtractor, str | None]:
    module = _unwrap(model.module)
    plain = FeatureExtractor(lambda x: (module(x), None), (), "none")
    wanted = tuple(dict.fromkeys([layers] if isinstance(layers, str) else (layers or ())))
    if not wanted:
        return plain, None
    shown_layers = wanted[0] if len(wanted) == 1 else list(wanted)
    names = available_layers(replace(model, module=module))
    if not names:
        return plain, (f"{setting} {shown_layers!r} cannot be reached in a {model.format} model (the format exposes "
                       "no named layers); feature-based detectors are skipped. Save the model with torch.jit.save, "
                       "torch.export.save or as a state dict with model.arch to use them")
    for layer in wanted:
        if layer not in names:
            shown = ", ".join(names[:40]) + (f", … ({len(names)} in all)" if len(names) > 40 else "")
            raise ConfigError(f"{setting} {layer!r} is not a layer of {model.path}; available: {shown}")
    try:
        if _is_script(module):
            return _script_extractor(module, wanted), None  # type: ignore[arg-type]
        if isinstance(module, torch.fx.GraphModule):
            called = {n.target for n in module.graph.nodes if n.op == "call_module"}
            if any(layer not in called for layer in wanted):
                return _fx_extractor(module, wanted), None
        subs: dict[str, nn.Module] = {}
        for layer in wanted:
            sub = model.feature_modules.get(layer)
            if sub is None and isinstance(module, nn.Module):
                sub = module.get_submodule(layer)
            if sub is None or _is_script(sub):
                raise RuntimeError(f"the submodule {layer!r} does not accept forward hooks")
            subs[layer] = sub
        return _hook_extractor(module, subs), None
    except Exception as exc:  # every capture path is best effort: fall back to outputs only, say why
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return plain, (f"{setting} {shown_layers!r} exists in this {model.format} model but its output cannot be "
                       f"captured ({reason}); feature-based detectors are skipped. Choose a layer that forward calls "
                       "once, outside if/loop blocks, or save the model as a state dict with model.arch")


# ---------------------------------------------------------------------------------------------
# model.feature_layer: auto — the layer that feeds the classification head
# ---------------------------------------------------------------------------------------------

#: Layers tried, from the head backwards, before settling for the best found so far.
AUTO_CANDIDATES = 16


@dataclass
class FeatureChoice:
    """Which layer feature-based detectors read and which linear head the model classifies with.

    ``layer`` None: no features (detectors that need them are skipped); ``head`` None: no linear
    head was verified on ``layer`` (detectors that need it are skipped); ``note`` says how the
    choice was made, or why nothing was found, in words for results.json and the report.
    """

    layer: str | None
    source: str  # "config", "auto", or "none"
    head_name: str | None = None
    head: LinearHead | None = None
    note: str = ""
    #: ``model.feature_layers``: the stages multi-layer detectors read, shallow to deep, with each
    #: one's per-sample output shape, how they were chosen ("config", "auto", "layer": the feature
    #: layer alone, "none") and a note.
    stages: tuple[tuple[str, tuple[int, ...]], ...] = ()
    stages_source: str = "none"
    stages_note: str = ""


def _ordered_layers(module: Any) -> list[str]:
    """Layer names in call order for a flat exported graph (the order its nodes were traced in),
    else in registration order (forward order for the usual Sequential-style networks)."""
    names = [n for n, _ in module.named_modules() if n] if isinstance(module, nn.Module) else []
    if isinstance(module, torch.fx.GraphModule):
        traced = [p for p in _fx_scopes(module) if p]
        names = traced + [n for n in names if n not in traced]
    return names


def _head(module: Any, k: int) -> tuple[str, Tensor, Tensor | None] | None:
    """The last parameter pair ``<name>.weight [k, D]`` (and ``<name>.bias [k]``): the linear layer
    whose outputs are the model's ``k`` class scores, found by its parameters so that eager,
    TorchScript and exported modules are searched alike."""
    if not isinstance(module, nn.Module):
        return None
    params = dict(module.named_parameters())
    found = None
    for name, w in params.items():
        if name.endswith("weight") and w.ndim == 2 and w.shape[0] == k:
            prefix = name[: -len("weight")].rstrip(".")
            bias = params.get(f"{prefix}.bias" if prefix else "bias")
            found = (prefix, w.detach(), None if bias is None or bias.shape != (k,) else bias.detach())
    return found


def _verified(head: tuple[str, Tensor, Tensor | None], features: Tensor, logits: Tensor) -> LinearHead | None:
    """The head when the model's logits are ``pool(features) @ weight.T + bias`` on this batch."""
    _, w, b = head
    pooled = pool(features.float())
    if pooled.ndim != 2 or pooled.shape[1] != w.shape[1]:
        return None
    candidate = LinearHead(w, b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    expected = logits.float()
    got = candidate(pooled)
    tol = 1e-3 * float(expected.abs().max().clamp_min(1.0))
    return candidate if got.shape == expected.shape and bool((got - expected).abs().max() <= tol) else None


def capture_layers(model: LoadedModel, layers: Sequence[str], x: Tensor) -> Captured:
    """The outputs of ``layers`` on ``x`` (one forward pass), leaving out any that cannot be
    captured or are not ``[B, …]`` tensors; nothing at all when the capture itself fails."""
    try:
        extract, warning = make_extractor(model, layers)
    except ConfigError:
        return {}
    feats: Captured | None = None
    if warning is None:
        try:
            with torch.inference_mode():
                _, feats = extract(x)
        except Exception:  # layers the capture cannot run: not candidates
            feats = None
        finally:
            extract.close()
    if feats is None and len(layers) > 1:  # one layer that cannot be captured spoils a joint capture: one by one
        feats = {k: v for layer in layers for k, v in capture_layers(model, [layer], x).items()}
    return {k: v for k, v in (feats or {}).items() if v.ndim >= 2 and v.shape[0] == x.shape[0]}


def _spatial(features: Tensor) -> bool:
    return features.ndim > 2 and features[0, 0].numel() > 1


_NO_HEAD = ("model.feature_layer: auto looks for the layer feeding a linear classification head, and this model's "
            "outputs are not [B, K] class scores from one (e.g. a segmentation network); name a layer, e.g. a UNet's "
            "bottleneck, to run the feature-based detectors")


def choose_feature_layer(model: LoadedModel, requested: str | None, x: Tensor, maps: bool = False) -> FeatureChoice:
    """Resolve ``model.feature_layer`` (``"auto"``, a layer name, or None) on a sample batch ``x``
    (normalised, on the model's device) and find the linear head the detectors of the post-hoc zoo
    recompute logits with.

    ``auto`` finds the head — the last linear layer whose outputs are the model's class scores —
    and walks the layers registered before it, backwards (skipping the head's own containers;
    top-level stages before their inner layers), up to :data:`AUTO_CANDIDATES` of them: the first whose globally pooled output reproduces the
    model's logits through the head (``pool(f) @ Wᵀ + b``, checked on ``x``) and still has spatial
    extent (a feature map, which ``spectral`` needs) is chosen; else the best found (verified
    without spatial extent, e.g. a flattened vector; or the last layer with a feature map, the
    head then unverified). A named layer is used as given, the head verified on it. Models whose
    outputs are not ``[B, K]`` class scores (segmentation maps) have no head: ``auto`` chooses
    nothing and says to name a layer — without running the model when the task says its outputs
    are maps (``maps``).
    """
    module = _unwrap(model.module)
    if requested is None:
        return FeatureChoice(None, "none", note="model.feature_layer is null: feature-based detectors are off")
    if requested == "auto" and maps:
        return FeatureChoice(None, "none", note=_NO_HEAD)
    with torch.inference_mode():
        logits = model_callable(model)(x)
    head = _head(module, int(logits.shape[1])) if logits is not None and logits.ndim == 2 else None

    pooling = model.tokens.pooling if model.tokens is not None else "auto"

    def capture(layer: str) -> Tensor | None:
        # a token layer's vector as the detectors will read it (its CLS token, or patch-token map)
        return feature_vector(capture_layers(model, [layer], x), layer, pooling)

    if requested != "auto":
        feats = capture(requested)
        verified = _verified(head, feats, logits) if head is not None and feats is not None else None
        note = (f"head {head[0]!r} verified on layer {requested!r}" if verified is not None else
                f"no linear head reproduces the model's logits from the pooled output of {requested!r}; detectors "
                "that need the head are skipped")
        return FeatureChoice(requested, "config", head[0] if verified is not None else None, verified, note)
    if head is None:
        return FeatureChoice(None, "none", note=_NO_HEAD)
    names = _ordered_layers(module)
    stop = names.index(head[0]) if head[0] in names else len(names)
    ancestors = {n for n in names if head[0].startswith(n + ".")}
    # backwards from the head, the network's stages before their inner layers (depth first): a
    # deep network's last block holds hundreds of leaves, and the stage's output is the one pooled
    before = [n for n in reversed(names[:stop]) if n not in ancestors]
    candidates = sorted(before, key=lambda n: n.count("."))[:AUTO_CANDIDATES]
    flat_verified: tuple[str, LinearHead] | None = None
    last_map: str | None = None
    def outermost(name: str, feats: Tensor) -> str:
        """The shallowest container of ``name`` with the very same output (``stage`` for ``stage.1``)."""
        parts = name.split(".")
        for depth in range(1, len(parts)):
            parent = ".".join(parts[:depth])
            if parent in names and parent not in ancestors:
                same = capture(parent)
                if same is not None and same.shape == feats.shape and torch.equal(same, feats):
                    return parent
        return name

    for name in candidates:
        feats = capture(name)
        if feats is None:
            continue
        verified = _verified(head, feats, logits)
        if verified is not None and _spatial(feats):
            name = outermost(name, feats)
            return FeatureChoice(name, "auto", head[0], verified,
                                 f"auto: {name!r}, whose globally pooled output feeds the linear head {head[0]!r}")
        if verified is not None and flat_verified is None:
            flat_verified = (name, verified)
        if last_map is None and _spatial(feats):
            last_map = outermost(name, feats)
    if flat_verified is not None:
        name, verified = flat_verified
        return FeatureChoice(name, "auto", head[0], verified, (
            f"auto: {name!r}, the layer feeding the linear head {head[0]!r} (no feature map before it reproduces "
            "the logits when pooled)"))
    if last_map is not None:
        return FeatureChoice(last_map, "auto", None, None, (
            f"auto: {last_map!r}, the last feature map before the linear layer {head[0]!r}, whose pooled output does "
            "not reproduce the logits through it (the head reads more than a global average, e.g. a crop or "
            "a flattened map); detectors that need the head are skipped"))
    return FeatureChoice(None, "none", note=(
        f"model.feature_layer: auto found the linear head {head[0]!r} but no layer before it whose output can be "
        "captured; name a layer to run the feature-based detectors"))


# ---------------------------------------------------------------------------------------------
# model.feature_layers: auto — the outputs of the network's main stages
# ---------------------------------------------------------------------------------------------

#: Stages kept by ``feature_layers: auto`` (the deepest ones).
AUTO_STAGES = 5
#: Children of one container captured when looking for the stages.
STAGE_CANDIDATES = 48


def _children(names: list[str], parent: str) -> list[str]:
    prefix = parent + "." if parent else ""
    return [n for n in names if n.startswith(prefix) and "." not in n[len(prefix):]]


def _stage_groups(layers: list[str], outputs: Captured) -> list[str]:
    """The last layer of each run of consecutive layers (registration order) whose outputs are
    feature maps of one spatial size: a stage ends where the resolution changes."""
    stages: list[str] = []
    last_shape: tuple[int, ...] | None = None
    for layer in layers:
        f = outputs.get(layer)
        if f is None or not _spatial(f):
            continue
        shape = tuple(f.shape[2:])
        if shape == last_shape:
            stages[-1] = layer
        else:
            stages.append(layer)
            last_shape = shape
    return stages


def choose_stages(model: LoadedModel, requested: list[str] | str | None, layer: str | None,
                  x: Tensor) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], str, str]:
    """Resolve ``model.feature_layers`` on a sample batch ``x`` (normalised, on the model's device).

    Returns ``(stages, source, note)``: each stage's name and per-sample output shape, shallow to
    deep. A list is used as given (a layer that cannot be captured is an error the caller's
    extractor reports). ``None`` reads the feature layer alone. ``auto`` looks, among the model's
    top-level modules and their children (the containers a network's stages are registered in:
    a ``features`` Sequential, a ResNet's root), for the container whose children, in
    registration order, pass through the most spatial resolutions before the head; each
    resolution's last child is a stage, and the deepest :data:`AUTO_STAGES` are kept (for a
    torchvision/MONAI DenseNet: ``relu0``, ``denseblock1``–``3``, ``norm5``; for a ResNet:
    ``relu``, ``layer1``–``4``). Fewer than two resolutions anywhere, or no linear head whose
    outputs are the model's class scores (a segmentation network, whose stages are nested in
    ways registration order does not reveal): the feature layer alone.
    """
    if isinstance(requested, list):
        make_extractor(model, requested, "model.feature_layers")[0].close()  # a name the model lacks: ConfigError
        got = capture_layers(model, requested, x)
        return (tuple((n, tuple(got[n].shape[1:])) for n in requested if n in got), "config",
                f"model.feature_layers as configured: {', '.join(requested)}")
    alone: tuple[tuple[str, tuple[int, ...]], ...] = ()
    if layer is not None:
        got = capture_layers(model, [layer], x)
        alone = ((layer, tuple(got[layer].shape[1:])),) if layer in got else ()
    module = _unwrap(model.module)
    head_name = None
    if requested is not None and layer is not None:
        with torch.inference_mode():
            logits = model_callable(model)(x)
        head = _head(module, int(logits.shape[1])) if logits is not None and logits.ndim == 2 else None
        head_name = head[0] if head is not None else None
    if requested is None or layer is None or head_name is None:
        why = ("model.feature_layers is null" if requested is None else "no feature layer was found" if layer is None
               else "model.feature_layers: auto looks for the stages of a classifier with a linear head, and the "
                    "model's outputs are not class scores from one (for a segmentation network, list its encoder "
                    "stages)")
        return alone, "layer" if alone else "none", f"{why}: multi-layer detectors read {layer!r} alone" if alone else why
    names = _ordered_layers(module)
    skip = {n for n in names if head_name and (head_name == n or head_name.startswith(n + "."))} - {""}
    containers = ["", *_children(names, "")]
    best: list[str] = []
    for container in containers:
        kids = [n for n in _children(names, container) if n not in skip][:STAGE_CANDIDATES]
        if len(kids) < 2:
            continue
        stages = _stage_groups(kids, capture_layers(model, kids, x))
        if len(stages) > len(best):
            best = stages
    if len(best) < 2:
        return alone, "layer" if alone else "none", (
            f"model.feature_layers: auto found no sequence of stages at two or more resolutions; multi-layer "
            f"detectors read {layer!r} alone" if alone else "model.feature_layers: auto found no stages")
    best = best[-AUTO_STAGES:]
    got = capture_layers(model, best, x)
    if len(got) != len(best):  # capturable one container at a time, not together: keep what works alone
        return alone, "layer" if alone else "none", (
            f"model.feature_layers: auto found stages {best} but cannot capture them in one pass; multi-layer "
            f"detectors read {layer!r} alone")
    return (tuple((n, tuple(got[n].shape[1:])) for n in best), "auto",
            f"auto: the last layer at each of {len(best)} resolutions: {', '.join(best)}")
