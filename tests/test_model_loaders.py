"""Model loaders: every format round-trips to the same outputs; pickles are refused unless trusted."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
import io
import zipfile
from pathlib import Path
from typing import Any

import pluggy
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from medaudit import hookspecs
from medaudit.config import Config
from medaudit.errors import ModelError
from medaudit.model import LoadedModel
from medaudit.plugins import model_loaders

TINY_DENSENET = {"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "init_features": 8, "growth_rate": 4,
                 "block_config": [1, 1]}


class SmallNet(nn.Module):
    """Defined at module level so pickles of it can be loaded back (by reference to this module)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Payload:
    """A pickle that creates a marker file when unpickled: proof of code execution on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def cfg(fmt: str = "auto", arch: str | None = None, **arch_kwargs: Any) -> Config:
    return Config.model_validate({"model": {"format": fmt, "arch": arch, "arch_kwargs": arch_kwargs}})


def load(path: Path, config: Config, trust_pickle: bool = False) -> LoadedModel | None:
    """Load through a real pluggy manager, so the hookimpl's signature is checked against the spec."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(model_loaders)
    return pm.hook.medaudit_load_model(path=path, config=config, trust_pickle=trust_pickle)


@pytest.fixture(scope="module")
def net() -> SmallNet:
    torch.manual_seed(0)
    m = SmallNet()
    m.features[1].running_mean.uniform_(-0.5, 0.5)  # so that eval vs train mode changes the outputs
    return m.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(3, 1, 9, 9, generator=torch.Generator().manual_seed(1))


def _same_outputs(loaded: LoadedModel, reference: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), reference.eval()(x))


def _identity_ok(loaded: LoadedModel, path: Path, fmt: str) -> None:
    assert loaded.format == fmt
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.path == path
    if isinstance(loaded.module, nn.Module):
        assert not loaded.module.training


def test_plugin_declares_api_version() -> None:
    assert model_loaders.MEDAUDIT_API_VERSION == hookspecs.HOOK_API_VERSION


def test_torchscript_round_trip(tmp_path: Path, net: SmallNet, x: torch.Tensor) -> None:
    p = tmp_path / "model.ts.pt"
    torch.jit.save(torch.jit.script(net), str(p))
    loaded = load(p, cfg())
    assert loaded is not None
    _identity_ok(loaded, p, "torchscript")
    _same_outputs(loaded, net, x)
    assert loaded.num_parameters == sum(q.numel() for q in net.parameters())
    assert loaded.dtype == "float32" and "SmallNet" in loaded.summary
    # Listed by name; they refuse forward hooks, so medaudit.features captures them by graph rewriting.
    assert {"features", "features.1", "head"} <= set(loaded.feature_modules)
    assert all(isinstance(m, torch.jit.ScriptModule) for m in loaded.feature_modules.values())


def test_exported_program_with_dynamic_batch_and_hooks(tmp_path: Path, net: SmallNet, x: torch.Tensor) -> None:
    p = tmp_path / "model.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes={"x": {0: batch}}), str(p))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load(p, cfg())
    # torch's loader warns about its own internals (a FutureWarning in torch 2.13): not the user's concern
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], \
        [str(w.message) for w in caught]
    assert loaded is not None
    _identity_ok(loaded, p, "export")
    x5 = torch.rand(5, 1, 9, 9)
    _same_outputs(loaded, net, x5)
    assert {"features", "head"} <= set(loaded.feature_modules)
    captured: list[torch.Size] = []
    handle = loaded.feature_modules["features"].register_forward_hook(lambda m, i, o: captured.append(o.shape))
    loaded.module(x)
    handle.remove()
    assert captured == [torch.Size([3, 4])]


def test_state_dict_with_monai_architecture(tmp_path: Path) -> None:
    from monai.networks.nets import DenseNet121

    torch.manual_seed(2)
    ref = DenseNet121(**TINY_DENSENET).eval()
    p = tmp_path / "weights.pth"
    torch.save(ref.state_dict(), p)
    config = cfg(arch="monai.networks.nets:DenseNet121", **TINY_DENSENET)
    loaded = load(p, config)
    assert loaded is not None
    _identity_ok(loaded, p, "state_dict")
    x = torch.rand(2, 1, 16, 16)
    _same_outputs(loaded, ref, x)
    assert loaded.num_parameters == sum(q.numel() for q in ref.parameters())
    assert "features.denseblock2" in loaded.feature_modules and "DenseNet121" in loaded.summary

    wrong = cfg(arch="monai.networks.nets:DenseNet121", **{**TINY_DENSENET, "out_channels": 5})
    with pytest.raises(ModelError, match=r"weights\.pth: weight shapes do not match .*class_layers"):
        load(p, wrong)


def test_safetensors_checkpoint_dict_and_dataparallel_prefix(tmp_path: Path) -> None:
    torch.manual_seed(3)
    ref = nn.Linear(4, 2)
    x = torch.rand(3, 4)
    st = tmp_path / "linear.safetensors"
    save_file(ref.state_dict(), str(st))
    loaded = load(st, cfg(arch="torch.nn:Linear", in_features=4, out_features=2))
    assert loaded is not None
    _identity_ok(loaded, st, "state_dict")
    _same_outputs(loaded, ref, x)

    ckpt = tmp_path / "ckpt.pt"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, ckpt)
    loaded2 = load(ckpt, cfg(arch="torch.nn:Linear", in_features=4, out_features=2))
    assert loaded2 is not None
    _same_outputs(loaded2, ref, x)

    legacy = tmp_path / "legacy.pt"  # pre-1.6 non-zip torch.save format
    torch.save(ref.state_dict(), legacy, _use_new_zipfile_serialization=False)
    loaded3 = load(legacy, cfg(arch="torch.nn:Linear", in_features=4, out_features=2))
    assert loaded3 is not None
    _same_outputs(loaded3, ref, x)


def test_state_dict_needs_a_valid_arch(tmp_path: Path) -> None:
    p = tmp_path / "w.pt"
    torch.save(nn.Linear(4, 2).state_dict(), p)
    with pytest.raises(ModelError, match=r"w\.pt: the file holds only weights .*set model\.arch"):
        load(p, cfg())
    with pytest.raises(ModelError, match=r"w\.pt: model\.arch 'torch\.nn\.Linear' must look like 'package\.module:factory'"):
        load(p, cfg(arch="torch.nn.Linear"))
    with pytest.raises(ModelError, match=r"w\.pt: cannot import 'no_such_pkg_xyz'"):
        load(p, cfg(arch="no_such_pkg_xyz:Net"))
    with pytest.raises(ModelError, match=r"w\.pt: model\.arch 'torch\.nn:Linear' failed with model\.arch_kwargs"):
        load(p, cfg(arch="torch.nn:Linear", in_features=4))
    with pytest.raises(ModelError, match=r"w\.pt: weights do not match .*unexpected keys"):
        load(p, cfg(arch="torch.nn:Linear", in_features=4, out_features=2, bias=False))


def test_pickled_module_refused_without_trust_and_loaded_with_it(tmp_path: Path, net: SmallNet, x: torch.Tensor) -> None:
    p = tmp_path / "full model.pt"
    torch.save(net, p)
    with pytest.raises(ModelError, match=r"full model\.pt: the file is a pickled Python object.*arbitrary code.*"
                                         r"--trust-pickle.*torch\.jit\.save"):
        load(p, cfg())
    with pytest.raises(ModelError, match=r"full model\.pt: .*arbitrary code"):
        load(p, cfg(fmt="pickle"))
    loaded = load(p, cfg(), trust_pickle=True)
    assert loaded is not None
    _identity_ok(loaded, p, "pickle")
    _same_outputs(loaded, net, x)
    assert "features.1" in loaded.feature_modules


def test_untrusted_pickle_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": Payload(marker)}, p)
    with pytest.raises(ModelError, match=r"evil\.pt: the file is a pickled Python object"):
        load(p, cfg(arch="torch.nn:Linear", in_features=1, out_features=2))
    assert not marker.exists()


def test_trusted_checkpoint_with_extras_uses_its_state_dict(tmp_path: Path) -> None:
    ref = nn.Linear(3, 2)
    p = tmp_path / "lightning.ckpt"
    torch.save({"hparams": argparse.Namespace(lr=0.1), "state_dict": ref.state_dict()}, p)
    config = cfg(arch="torch.nn:Linear", in_features=3, out_features=2)
    with pytest.raises(ModelError, match=r"lightning\.ckpt: the file is a pickled Python object"):
        load(p, config)
    loaded = load(p, config, trust_pickle=True)
    assert loaded is not None and loaded.format == "state_dict"
    _same_outputs(loaded, ref, torch.rand(2, 3))


def test_export_archive_with_pickled_payload_is_refused(tmp_path: Path, net: SmallNet, x: torch.Tensor) -> None:
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(net, (x,)), str(good))
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            zout.writestr(name, payload.getvalue() if name.endswith("sample_inputs/model.pt") else zin.read(name))
    with pytest.raises(ModelError, match=r"evil\.pt2: the torch\.export archive holds a pickled Python object.*--trust-pickle"):
        load(evil, cfg())
    assert not marker.exists()
    # The check is needed: torch.export.load on its own falls back to a full unpickler and runs the payload.
    with pytest.raises(Exception):
        torch.export.load(str(evil))
    assert marker.exists()


@pytest.mark.parametrize("kind", ["torchscript", "export", "state_dict", "safetensors"])
def test_truncated_files_name_the_file(tmp_path: Path, net: SmallNet, x: torch.Tensor, kind: str) -> None:
    if kind == "torchscript":
        p = tmp_path / "cut.pt"
        torch.jit.save(torch.jit.script(net), str(p))
    elif kind == "export":
        p = tmp_path / "cut.pt2"
        torch.export.save(torch.export.export(net, (x,)), str(p))
    elif kind == "state_dict":
        p = tmp_path / "cut.pth"
        torch.save(net.state_dict(), p)
    else:
        p = tmp_path / "cut.safetensors"
        save_file(net.state_dict(), str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    config = cfg(arch=f"{__name__}:SmallNet")
    with pytest.raises(ModelError, match=rf"cannot load model .*{p.name}: .*(truncated|corrupt)"):
        load(p, config)


def test_explicit_format_contradicting_content(tmp_path: Path, net: SmallNet) -> None:
    p = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(net), str(p))
    with pytest.raises(ModelError, match=r"model\.pt: model\.format is 'state_dict' but the file is a TorchScript archive"):
        load(p, cfg(fmt="state_dict"))


def test_unknown_files_are_left_to_other_plugins(tmp_path: Path) -> None:
    p = tmp_path / "model.h5"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    assert load(p, cfg()) is None
    assert load(tmp_path, cfg()) is None


def test_onnx_without_onnxruntime_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: `import onnxruntime` fails
    p = tmp_path / "model.onnx"
    p.write_bytes(b"\x08\x07")  # content is never parsed without onnxruntime
    with pytest.raises(ModelError, match=r"model\.onnx: ONNX models need onnxruntime.*pip install medaudit\[onnx\]"):
        load(p, cfg())


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                    reason="needs onnxruntime and onnx")
def test_onnx_round_trip(tmp_path: Path, net: SmallNet, x: torch.Tensor) -> None:
    p = tmp_path / "model.onnx"
    torch.onnx.export(net, (x,), str(p), input_names=["x"], dynamic_axes={"x": {0: "b"}}, dynamo=False)
    loaded = load(p, cfg())
    assert loaded is not None
    _identity_ok(loaded, p, "onnx")
    _same_outputs(loaded, net, x)
    assert loaded.num_parameters > 0  # BatchNorm may be folded into the conv, so not an exact count


def test_export_returning_a_library_output_type_says_what_to_export(tmp_path: Path) -> None:
    # A Hugging Face model exported as is returns a model-output object whose pytree type only
    # transformers registers; a process that has not imported it cannot rebuild the program.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
        patch_size=8)).eval()
    path = tmp_path / "hf.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(2, 3, 16, 16),)), path)
    import subprocess

    probe = ("import sys\nfrom pathlib import Path\nfrom medaudit.errors import ModelError\n"
             "from medaudit.plugins.model_loaders import load_exported\n"
             "try:\n    load_exported(Path(sys.argv[1]), False)\nexcept ModelError as exc:\n    print(exc)\n"
             "assert 'transformers' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "returns a transformers.modeling_outputs.BaseModelOutputWithPooling" in done.stdout
    assert "export a wrapper whose forward returns a tensor" in done.stdout
    assert str(path) in done.stdout
