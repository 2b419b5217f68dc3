"""Built-in model loaders: TorchScript, torch.export, state dicts (+ architecture), ONNX, trusted pickles.

Safety rule: nothing is unpickled without ``weights_only=True`` unless the user passed
``--trust-pickle``. A file saved with ``torch.save(model)`` is recognised by the
``UnpicklingError`` that ``torch.load(weights_only=True)`` raises for it, and refused with an
explanation of the risk and of the two ways forward (opt in, or convert to TorchScript).

With ``model.format: auto`` the format is decided from the file's content (zip member names,
pickle/safetensors headers), then its extension; a file that fits no format returns ``None`` so
another plugin's loader can try.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import logging
import math
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medaudit.config import Config
from medaudit.errors import ModelError, one_line
from medaudit.hashing import sha256_file
from medaudit.hookspecs import hookimpl
from medaudit.model import LoadedModel, describe_module, fail_to_load

MEDAUDIT_API_VERSION = 1

CONVERT_HINT = (
    "convert it once in a trusted environment: m = torch.load(path, weights_only=False).eval(), then "
    "torch.jit.save(torch.jit.script(m) (or torch.jit.trace(m, example)), 'model.ts.pt'), or "
    "torch.export.save(torch.export.export(m, (example,)), 'model.pt2'), or save m.state_dict() and set model.arch"
)


# ---------------------------------------------------------------------------------------------
# Format detection
# ---------------------------------------------------------------------------------------------


def _zip_members(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def _looks_safetensors(head: bytes) -> bool:
    """safetensors: little-endian u64 header length, then a JSON object."""
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n < (1 << 30) and head[8:9] == b"{"


def detect_format(path: Path) -> str | None:
    """``torchscript``, ``export``, ``torch`` (a ``torch.save`` file), ``safetensors``, ``onnx`` or None.

    Content wins over extension: all three PyTorch formats are zip archives, told apart by their
    members (TorchScript has ``code/``, torch.export has ``models/*.json``, torch.save has
    ``data.pkl`` only).
    """
    name = path.name.lower()
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] == b"PK\x03\x04":
        members = _zip_members(path)
        if members is not None:
            tails = {m.split("/", 1)[-1] for m in members}
            if any(t.startswith("code/") for t in tails) or "constants.pkl" in tails:
                return "torchscript"
            if any(t.startswith("models/") and t.endswith(".json") for t in tails) or "archive_format" in tails:
                return "export"
            if "data.pkl" in tails:
                return "torch"
    if _looks_safetensors(head):
        return "safetensors"
    if head[:1] == b"\x80" and name.endswith((".pt", ".pth", ".bin", ".ckpt", ".pkl")):
        return "torch"  # legacy (pre-1.6) torch.save: a bare pickle stream
    # Damaged zips cannot be listed: fall back on the extension so the user still gets a named error.
    if name.endswith(".pt2"):
        return "export"
    if name.endswith(".onnx"):
        return "onnx"
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith((".pt", ".pth", ".ckpt", ".bin")):
        return "torch"
    return None


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------


def _loaded(module: Any, path: Path, fmt: str, features: dict[str, nn.Module], summary_note: str = "") -> LoadedModel:
    if isinstance(module, nn.Module):
        try:
            module.eval()
        except (RuntimeError, NotImplementedError):
            pass  # exported graphs fix train/eval at export time and refuse .eval()
        n, dtype, summary = describe_module(module)
    else:
        n, dtype, summary = 0, "n/a", type(module).__name__
    if summary_note:
        summary = f"{summary}; {summary_note}"
    return LoadedModel(module=module, path=path, format=fmt, sha256=sha256_file(path), num_parameters=n,
                       dtype=dtype, summary=summary, feature_modules=features)


def _named_submodules(module: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in module.named_modules() if name}


# ---------------------------------------------------------------------------------------------
# Loaders per format
# ---------------------------------------------------------------------------------------------


def load_torchscript(path: Path) -> LoadedModel:
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 deprecates TorchScript; the user chose the format, so the warning is noise here.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, OSError, ValueError for damaged archives
        raise fail_to_load(path, f"not a readable TorchScript archive ({one_line(exc)}); the file may be truncated, "
                                 "re-save it with torch.jit.save") from None
    # Loaded ScriptModules reject register_forward_hook; the submodules are still listed so
    # medaudit.features can locate the layer's call in the TorchScript graph instead.
    return _loaded(module, path, "torchscript", _named_submodules(module))


def _pt2_pickle_risk(path: Path) -> str | None:
    """Why ``torch.export.load`` would run a full unpickler on this archive, or None when it would not.

    ``torch.export.load`` falls back to ``torch.load(weights_only=False)`` for sample inputs and
    legacy payloads whose weights-only load fails, and unpickles "use_pickle" weights, non-tensor
    constants and opaque objects unconditionally, so a crafted ``.pt2`` can run code on load.
    Every such payload must load under ``weights_only=True`` here first: the same bytes then
    reference only allow-listed globals, so the full unpickler cannot do anything else with them.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            suspects: set[str] = {n for n in names if n.split("/", 1)[-1].startswith("data/") and n.endswith(".pt")}
            for name in names:
                tail = name.split("/", 1)[-1]
                if not (tail.startswith(("data/weights/", "data/constants/")) and tail.endswith("_config.json")):
                    continue
                folder = name.rsplit("/", 1)[0]
                entries = json.loads(zf.read(name)).get("config", {})
                for fqn, meta in entries.items():
                    if meta.get("use_pickle") or meta.get("tensor_meta") is None:
                        suspects.add(f"{folder}/{meta.get('path_name', fqn)}")
            for member in sorted(suspects):
                try:
                    torch.load(io.BytesIO(zf.read(member)), map_location="cpu", weights_only=True)
                except KeyError:
                    return f"{member} is referenced but missing"
                except Exception as exc:
                    return f"{member} is not weights-only ({one_line(exc, 120)})"
    except (zipfile.BadZipFile, OSError, ValueError, AttributeError) as exc:
        raise fail_to_load(path, f"not a readable torch.export archive ({one_line(exc)}); the file may be truncated, "
                                 "re-save it with torch.export.save") from None
    return None


class _LogRecorder(logging.Handler):
    """Keeps what torch.export logs while loading: its loader reports the cause of a failure there
    and raises a generic error."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(logging.Formatter().format(record))  # the cause is in the traceback (exc_info)

    def text(self) -> str:
        return "\n".join(self.records)


_UNREGISTERED = re.compile(r"Deserializing (\S+) in pytree is not registered")


def _unreadable_program(exc: Exception, logged: str) -> str:
    """Why a torch.export archive does not load, in terms the user can act on."""
    match = _UNREGISTERED.search(logged)
    if match:
        # e.g. a Hugging Face model exported with its model-output object as the return value
        return (f"the exported program returns a {match[1]}, a container type registered by the library that defines "
                "it, and torch.export.load can only rebuild it in a process that imported that library (medaudit "
                "imports no library a model file names); export a wrapper whose forward returns a tensor (e.g. "
                "`return self.backbone(x).pooler_output`), or save it with torch.jit.trace(model, x, strict=False) and "
                "set model.output_key")
    return (f"not a readable torch.export program ({one_line(exc)}); the file may be truncated, re-save it with "
            "torch.export.save")


def load_exported(path: Path, trust_pickle: bool) -> LoadedModel:
    risk = _pt2_pickle_risk(path)
    if risk is not None and not trust_pickle:
        raise _pickle_refusal(path, risk, what="the torch.export archive holds a pickled Python object "
                                               f"({risk}), and torch.export.load would unpickle it")
    with warnings.catch_warnings():
        # torch's own deprecations inside its loader and unflatten (e.g. "isinstance(treespec,
        # LeafSpec) is deprecated") say nothing about the user's model and were printed on every audit
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        logged = _LogRecorder()
        torch_export_log = logging.getLogger("torch.export")
        torch_export_log.addHandler(logged)
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise fail_to_load(path, _unreadable_program(exc, logged.text())) from None
        finally:
            torch_export_log.removeHandler(logged)
        # unflatten() rebuilds the submodule hierarchy as modules that are actually called, so forward
        # hooks on them fire (on program.module() the graph is flat and hooks on submodules never run).
        try:
            module: nn.Module = torch.export.unflatten(program)
            features = _named_submodules(module)
            note = ""
        except Exception as exc:
            module = program.module()
            features = {}
            note = f"torch.export: layer hierarchy unavailable ({one_line(exc, 120)})"
    return _loaded(module, path, "export", features, note)


def _state_dict_from(obj: Any, path: Path) -> dict[str, Tensor]:
    """The tensor mapping in a torch.save payload: a bare state dict or a checkpoint wrapping one."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
        for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return dict(inner)
    raise fail_to_load(path, f"holds a {type(obj).__name__}, not a state dict (a mapping of parameter names to "
                             "tensors, possibly under 'state_dict'); save model.state_dict() or a TorchScript file")


def _build_arch(path: Path, config: Config) -> nn.Module:
    arch = config.model.arch
    if not arch:
        raise fail_to_load(path, "the file holds only weights (a state dict); set model.arch to 'package.module:factory' "
                                 "(a class or function returning the nn.Module, e.g. 'monai.networks.nets:DenseNet121') "
                                 "and model.arch_kwargs to its arguments, or save a TorchScript/torch.export model instead")
    module_name, sep, attr = arch.partition(":")
    if not sep or not module_name or not attr:
        raise fail_to_load(path, f"model.arch {arch!r} must look like 'package.module:factory'")
    try:
        factory: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise fail_to_load(path, f"cannot import {module_name!r} from model.arch ({one_line(exc)}); install the package "
                                 "that defines the architecture") from None
    for part in attr.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise fail_to_load(path, f"model.arch {arch!r}: {module_name!r} has no attribute {attr!r}") from None
    try:
        module = factory(**config.model.arch_kwargs)
    except Exception as exc:
        raise fail_to_load(path, f"model.arch {arch!r} failed with model.arch_kwargs {config.model.arch_kwargs}: "
                                 f"{type(exc).__name__}: {one_line(exc)}") from None
    if not isinstance(module, nn.Module):
        raise fail_to_load(path, f"model.arch {arch!r} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def _load_into(module: nn.Module, state: dict[str, Tensor], path: Path, arch: str) -> None:
    # DataParallel/DDP checkpoints prefix every key with "module."; strip it when that is the only difference.
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in module.state_dict()):
        state = {k[len("module."):]: v for k, v in state.items()}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise fail_to_load(path, f"weights do not match model.arch {arch!r}: {len(missing)} missing keys {missing[:3]}, "
                                 f"{len(unexpected)} unexpected keys {unexpected[:3]}; check model.arch and model.arch_kwargs")
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if state[k].shape != expected[k].shape]
    if shapes:
        raise fail_to_load(path, f"weight shapes do not match model.arch {arch!r} ({len(shapes)} tensors, e.g. {shapes[0]}); "
                                 "check model.arch_kwargs (channels, classes, spatial dims)")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise fail_to_load(path, f"load_state_dict failed: {one_line(exc)}") from None


def _from_state_dict(state: dict[str, Tensor], path: Path, config: Config, fmt: str) -> LoadedModel:
    module = _build_arch(path, config)
    _load_into(module, state, path, config.model.arch or "")
    return _loaded(module, path, fmt, _named_submodules(module))


def load_safetensors(path: Path, config: Config) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise fail_to_load(path, f"not a readable safetensors file ({one_line(exc)}); the file may be truncated") from None
    return _from_state_dict(state, path, config, "state_dict")


def _pickle_refusal(path: Path, reason: str, what: str | None = None) -> ModelError:
    if what is None:
        culprit = re.search(r"GLOBAL ([\w.]+)", reason)
        refs = f" (it references {culprit.group(1)})" if culprit else ""
        what = f"the file is a pickled Python object{refs}, e.g. torch.save(model) of a full nn.Module"
    return fail_to_load(
        path,
        f"{what}, and unpickling it can execute arbitrary code, so medaudit refuses by default; if you trust "
        f"its source, rerun with --trust-pickle, or {CONVERT_HINT}",
    )


def load_torch_file(path: Path, config: Config, trust_pickle: bool) -> LoadedModel:
    """A ``torch.save`` file: a state dict (safe) or a pickled module (only with ``trust_pickle``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any non-tensor global: this is a pickled object, not bare weights.
        if not trust_pickle:
            raise _pickle_refusal(path, str(exc)) from None
        return load_pickle(path, config)
    except Exception as exc:
        raise fail_to_load(path, f"not a readable torch.save file ({type(exc).__name__}: {one_line(exc)}); the file may be "
                                 "truncated or corrupt, re-save or re-copy it") from None
    if isinstance(obj, nn.Module):  # cannot happen under weights_only, kept as a guard
        return _loaded(obj, path, "pickle", _named_submodules(obj))
    return _from_state_dict(_state_dict_from(obj, path), path, config, "state_dict")


def load_pickle(path: Path, config: Config) -> LoadedModel:
    """Full unpickling; the caller has checked ``trust_pickle``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError) as exc:
        raise fail_to_load(path, f"the pickled model's class cannot be found ({one_line(exc)}); import or install the "
                                 "code that defines it (classes defined in a training script's __main__ cannot be "
                                 f"found), or {CONVERT_HINT}") from None
    except Exception as exc:
        raise fail_to_load(path, f"cannot unpickle ({type(exc).__name__}: {one_line(exc)}); the file may be truncated") from None
    if isinstance(obj, nn.Module):
        return _loaded(obj, path, "pickle", _named_submodules(obj))
    # A checkpoint with non-tensor extras (optimizer state, argparse Namespace) holding a state dict.
    return _from_state_dict(_state_dict_from(obj, path), path, config, "state_dict")


class OnnxModule(nn.Module):
    """An onnxruntime session behind the ``nn.Module`` call interface the runner uses."""

    def __init__(self, session: Any, n_params: int) -> None:
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.n_params = n_params

    def forward(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def load_onnx(path: Path) -> LoadedModel:
    if importlib.util.find_spec("onnxruntime") is None:
        raise fail_to_load(path, "ONNX models need onnxruntime, which is not installed; pip install medaudit[onnx]")
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise fail_to_load(path, f"onnxruntime cannot open it ({one_line(exc)}); the file may be truncated") from None
    n_params, note = 0, "parameter count needs the onnx package"
    if importlib.util.find_spec("onnx") is not None:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        n_params = sum(math.prod(init.dims) for init in graph.initializer)
        note = f"{len(graph.node)} ONNX nodes"
    inp = session.get_inputs()[0]
    module = OnnxModule(session, n_params).eval()  # a forward-only wrapper; eval like every loaded model
    dtype = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}.get(inp.type, inp.type)
    return LoadedModel(module=module, path=path, format="onnx", sha256=sha256_file(path), num_parameters=n_params,
                       dtype=dtype, summary=f"ONNX graph, input {inp.name} {inp.shape}; {note}", feature_modules={})


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


# Which detected contents each explicit model.format accepts.
_COMPATIBLE: dict[str, set[str]] = {
    "torchscript": {"torchscript"},
    "export": {"export"},
    "state_dict": {"torch", "safetensors"},
    "pickle": {"torch"},
    "onnx": {"onnx"},
}
_DESCRIBE = {
    "torchscript": "TorchScript archive (torch.jit.save)",
    "export": "torch.export program (torch.export.save)",
    "torch": "torch.save file",
    "safetensors": "safetensors file",
}


@hookimpl
def medaudit_load_model(path: Path, config: Config, trust_pickle: bool) -> LoadedModel | None:
    path = Path(path)
    if not path.is_file():
        if config.model.format == "auto":
            return None  # a directory or URL may belong to another plugin's loader
        raise fail_to_load(path, "no such file")
    fmt = config.model.format
    detected = detect_format(path)
    if fmt == "auto":
        if detected is None:
            return None
        fmt = {"torch": "state_dict", "safetensors": "state_dict"}.get(detected, detected)
    elif detected is not None and detected != "onnx" and detected not in _COMPATIBLE[fmt]:
        # An explicit format that contradicts the content would otherwise fail with a confusing torch error.
        raise fail_to_load(path, f"model.format is {fmt!r} but the file is a {_DESCRIBE[detected]}; "
                                 "set model.format: auto (or the matching format)")
    if fmt == "torchscript":
        return load_torchscript(path)
    if fmt == "export":
        return load_exported(path, trust_pickle)
    if fmt == "onnx":
        return load_onnx(path)
    if fmt == "pickle":
        if not trust_pickle:
            raise _pickle_refusal(path, "")
        return load_pickle(path, config)
    # state_dict: safetensors or torch.save (whose pickled-module case is refused without trust)
    if detected == "safetensors" or path.name.lower().endswith(".safetensors"):
        return load_safetensors(path, config)
    return load_torch_file(path, config, trust_pickle)

