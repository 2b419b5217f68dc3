"""Feature capture on eager, torch.export (flat and unflattened) and TorchScript models."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from medaudit.errors import ConfigError
from medaudit.features import make_extractor
from medaudit.model import LoadedModel


class PatchNet(nn.Module):
    """Same structure as examples/train_example.py: a ``features`` Sequential, a crop, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 2 * 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        h, w = f.shape[-2] // 2, f.shape[-1] // 2
        return self.classifier(f[:, :, h - 1:h + 1, w - 1:w + 1])


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 1)
        self.b = nn.Conv2d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 0):
            y = self.a(x)
        else:
            y = self.b(x)
        return y.mean(dim=(2, 3))


def _loaded(module: object, fmt: str, features: dict[str, nn.Module] | None = None) -> LoadedModel:
    return LoadedModel(module=module, path=Path("model.pt"), format=fmt, sha256="", num_parameters=0,  # type: ignore[arg-type]
                       dtype="float32", summary="", feature_modules=features or {})


@pytest.fixture(scope="module")
def net_and_reference() -> tuple[PatchNet, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    net = PatchNet().eval()
    x = torch.randn(3, 1, 8, 8)
    ref: dict[str, torch.Tensor] = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: ref.__setitem__(n, o.detach()))
             for n in ("features", "features.4", "classifier.1")]
    with torch.no_grad():
        y = net(x)
    for h in hooks:
        h.remove()
    return net, x, y, ref


LAYERS = ["features", "features.4", "classifier.1"]


def _check(model: LoadedModel, x: torch.Tensor, y: torch.Tensor, ref: dict[str, torch.Tensor], method: str) -> None:
    for layer in LAYERS:
        extract, warning = make_extractor(model, layer)
        assert warning is None, warning
        assert extract.method == method
        with torch.no_grad():
            out, feats = extract(x)
        torch.testing.assert_close(out, y, atol=1e-5, rtol=1e-5)
        assert feats is not None and list(feats) == [layer]
        torch.testing.assert_close(feats[layer], ref[layer], atol=1e-5, rtol=1e-5)
        extract.close()  # hooks live on the caller's module; later tests script the same net
    # every layer in one forward pass (model.feature_layers), nested ones included
    extract, warning = make_extractor(model, LAYERS, "model.feature_layers")
    assert warning is None, warning
    with torch.no_grad():
        out, feats = extract(x)
    torch.testing.assert_close(out, y, atol=1e-5, rtol=1e-5)
    assert feats is not None and sorted(feats) == sorted(LAYERS)
    for layer in LAYERS:
        torch.testing.assert_close(feats[layer], ref[layer], atol=1e-5, rtol=1e-5)
    extract.close()


def test_eager_module(net_and_reference) -> None:  # type: ignore[no-untyped-def]
    net, x, y, ref = net_and_reference
    _check(_loaded(net, "state_dict"), x, y, ref, "hook")
    assert not any(m._forward_hooks for m in net.modules())  # close() removed every hook


def test_torchscript_loaded_module(net_and_reference, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    net, x, y, ref = net_and_reference
    torch.jit.save(torch.jit.script(net), str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    with pytest.raises(RuntimeError, match="not supported on ScriptModules"):
        loaded.features.register_forward_hook(lambda *a: None)  # why graph surgery is needed
    _check(_loaded(loaded, "torchscript"), x, y, ref, "torchscript-graph")


def test_exported_program_flat_and_unflattened(net_and_reference) -> None:  # type: ignore[no-untyped-def]
    net, x, y, ref = net_and_reference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(net, (x,))
        _check(_loaded(program.module(), "export"), x, y, ref, "fx")
        _check(_loaded(program, "export"), x, y, ref, "fx")
        unflat = torch.export.unflatten(program)
        _check(_loaded(unflat, "export", {n: m for n, m in unflat.named_modules() if n}), x, y, ref, "hook")


def test_no_layer_and_unknown_layer(net_and_reference) -> None:  # type: ignore[no-untyped-def]
    net, x, y, _ = net_and_reference
    extract, warning = make_extractor(_loaded(net, "state_dict"), None)
    out, feats = extract(x)
    assert warning is None and feats is None and torch.allclose(out, y)
    with pytest.raises(ConfigError, match=r"'featurez' is not a layer .*available: classifier, classifier\.0"):
        make_extractor(_loaded(net, "state_dict"), "featurez")


def test_unreachable_formats_warn() -> None:
    extract, warning = make_extractor(_loaded(lambda x: x.sum(dim=(1, 2, 3))[:, None], "onnx"), "features")
    assert warning is not None and "'features'" in warning and "onnx" in warning
    out, feats = extract(torch.ones(2, 1, 2, 2))
    assert feats is None and out.tolist() == [[4.0], [4.0]]


def test_torchscript_layer_inside_control_flow_warns(tmp_path: Path) -> None:
    scripted = torch.jit.script(Branchy().eval())
    extract, warning = make_extractor(_loaded(scripted, "torchscript"), "a")
    assert warning is not None and "'a'" in warning and "torchscript" in warning and "if/loop" in warning
    x = torch.ones(2, 1, 3, 3)
    out, feats = extract(x)
    assert feats is None and torch.allclose(out, scripted(x))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torchscript_and_export_capture_on_cuda(net_and_reference, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    net, x, y, ref = net_and_reference
    torch.jit.save(torch.jit.script(net), str(tmp_path / "m.pt"))
    dev = torch.device("cuda")
    scripted = torch.jit.load(str(tmp_path / "m.pt"), map_location=dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flat = torch.export.export(net, (x,)).module().to(dev)
    for model in (_loaded(scripted, "torchscript"), _loaded(flat, "export")):
        extract, warning = make_extractor(model, "features.4")
        assert warning is None
        with torch.no_grad():
            out, feats = extract(x.to(dev))
        assert feats is not None and feats["features.4"].device.type == "cuda"
        torch.testing.assert_close(out.cpu(), y, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(feats["features.4"].cpu(), ref["features.4"], atol=1e-4, rtol=1e-4)
