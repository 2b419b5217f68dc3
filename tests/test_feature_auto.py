"""model.feature_layer: auto — the layer feeding the linear head, found in eager, TorchScript and
torch.export models (and a MONAI network nobody here wrote), with the head verified on it."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from medaudit.features import choose_feature_layer
from medaudit.model import LoadedModel


class GapNet(nn.Module):
    """The common classifier shape: conv stages, global average pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stage(self.stem(x))), 1))


class CropNet(nn.Module):
    """A head that reads a crop of the map, not its global average (the bundled example's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.classifier = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)[:, :, :2, :2].flatten(1))


def loaded(module: object, fmt: str) -> LoadedModel:
    return LoadedModel(module=module, path=Path("m.pt"), format=fmt, sha256="", num_parameters=0,  # type: ignore[arg-type]
                       dtype="float32", summary="")


def formats(net: nn.Module, x: torch.Tensor) -> dict[str, LoadedModel]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(net)
    exported = torch.export.export(net, (x,))
    return {"eager": loaded(net, "state_dict"), "torchscript": loaded(scripted, "torchscript"),
            "export": loaded(torch.export.unflatten(exported), "export"),
            "export-flat": loaded(exported.module(), "export")}


@pytest.mark.parametrize("fmt", ["eager", "torchscript", "export", "export-flat"])
def test_auto_finds_the_map_feeding_the_head_in_every_format(fmt: str) -> None:
    torch.manual_seed(0)
    net = GapNet().eval()
    x = torch.randn(4, 1, 12, 12)
    choice = choose_feature_layer(formats(net, x)[fmt], "auto", x)
    assert choice.source == "auto" and choice.layer == "stage" and choice.head_name == "fc"
    # the verified head reproduces the model's logits from the pooled map
    feats = net.stage(net.stem(x))
    torch.testing.assert_close(choice.head(feats.mean(dim=(2, 3))), net(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(choice.head.weight, net.fc.weight.detach())


def test_auto_on_a_monai_densenet_picks_its_feature_stage() -> None:
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=3).eval()
    x = torch.randn(2, 1, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.trace(net, x)
    for model in (loaded(net, "state_dict"), loaded(scripted, "torchscript")):
        choice = choose_feature_layer(model, "auto", x)
        # MONAI's head starts with an in-place ReLU, which rewrites the `features` stage's output
        # tensor in place: what is captured (and what the detectors see) is that activated map, whose
        # pooled value is exactly the linear layer's input
        assert choice.layer == "features" and choice.head_name == "class_layers.out", choice.note
        feats = torch.relu(net.features(x))
        torch.testing.assert_close(choice.head(feats.mean(dim=(2, 3))), net(x), rtol=1e-4, atol=1e-4)


def test_a_head_that_reads_a_crop_keeps_the_map_but_no_head() -> None:
    torch.manual_seed(0)
    net = CropNet().eval()
    choice = choose_feature_layer(loaded(net, "state_dict"), "auto", torch.randn(3, 1, 8, 8))
    assert choice.layer == "features" and choice.head is None and "does not reproduce the logits" in choice.note


def test_a_named_layer_wins_and_its_head_is_verified() -> None:
    torch.manual_seed(0)
    net = GapNet().eval()
    x = torch.randn(4, 1, 12, 12)
    choice = choose_feature_layer(loaded(net, "state_dict"), "stem", x)
    assert choice.source == "config" and choice.layer == "stem" and choice.head is None  # 8 channels ≠ fc's 16
    assert choose_feature_layer(loaded(net, "state_dict"), "stage", x).head_name == "fc"
    assert choose_feature_layer(loaded(net, "state_dict"), None, x).layer is None


def test_a_segmentation_network_has_no_head_to_find() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    choice = choose_feature_layer(loaded(net, "state_dict"), "auto", torch.randn(2, 1, 8, 8))
    assert choice.layer is None and choice.source == "none" and "name a layer" in choice.note


def test_an_audit_without_feature_settings_runs_the_feature_detectors_and_the_zoo(tmp_path: Path) -> None:
    """No model.feature_layer anywhere: auto finds `stage` and the head `fc`, and every feature
    detector — the zoo's head-based ones included — reports on the shifted scenario."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np

    torch.manual_seed(0)
    net = GapNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net), str(tmp_path / "gap.pt"))
    rng = np.random.default_rng(0)
    images = (rng.random((60, 12, 12)) * 255).astype(np.uint8)
    labels = rng.integers(0, 3, 60)  # an untrained model: the detectors need classes, not accuracy
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    (tmp_path / "c.yaml").write_text("input: {channels: 1, dims: 2, mean: [0.0], std: [1.0], "
                                     "intensity: {scaling: fixed, max_value: 255}}\n"
                                     "task: {type: multiclass, classes: [a, b, c]}\naudit: {bootstrap: 20}\n")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "medaudit.cli", "run", str(tmp_path / "gap.pt"), "--data",
                          str(tmp_path / "d.npz"), "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--quiet",
                          "--perturbation", "intensity.inversion", "--severities", "5"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode in (0, 1), res.stderr
    results = json.loads((out / "results.json").read_text())
    model = results["model"]
    assert (model["feature_layer"], model["feature_layer_source"], model["head"]) == ("stage", "auto", "fc")
    ood = next(s for s in results["scenarios"] if s["id"] == "intensity.inversion@5")["ood"]
    for name in ("mahalanobis", "knn", "spectral", "vim", "react", "ash", "scale", "dice_sparse", "rmd", "she",
                 "nnguide", "fdbd", "gen", "kl_matching"):
        assert ood[name]["auroc"]["value"] is not None, name
    assert "Feature layer" in (out / "report.html").read_text()


@pytest.mark.parametrize("fmt", ["eager", "torchscript", "export"])
def test_auto_stages_of_a_monai_resnet_alike_in_every_format(fmt: str) -> None:
    """feature_layers: auto on MONAI's ResNet (nobody here wrote it): the stem's activation and
    layer1..4, one per resolution, whatever the format the model is saved in; a named list is
    used as given, and a layer the model lacks is a config error naming model.feature_layers."""
    from monai.networks.nets import ResNet

    from medaudit.errors import ConfigError
    from medaudit.features import choose_stages

    torch.manual_seed(0)
    net = ResNet("basic", [1, 1, 1, 1], [4, 8, 8, 16], spatial_dims=2, n_input_channels=1, num_classes=3).eval()
    x = torch.randn(2, 1, 64, 64)
    module = {"eager": net, "torchscript": torch.jit.trace(net, x),
              "export": torch.export.export(net, (x,)).module()}[fmt]
    model = LoadedModel(module=module, path=Path("resnet.pt"), format=fmt, sha256="", num_parameters=0,
                        dtype="float32", summary="", feature_modules={})
    choice = choose_feature_layer(model, "auto", x)
    stages, source, _ = choose_stages(model, "auto", choice.layer, x)
    assert source == "auto" and choice.layer == "layer4"
    assert stages == (("act", (4, 64, 64)), ("layer1", (4, 32, 32)), ("layer2", (8, 16, 16)), ("layer3", (8, 8, 8)),
                      ("layer4", (16, 4, 4)))
    named, source, _ = choose_stages(model, ["layer2", "layer4"], choice.layer, x)
    assert source == "config" and [n for n, _ in named] == ["layer2", "layer4"]
    with pytest.raises(ConfigError, match="model.feature_layers 'layer9'"):
        choose_stages(model, ["layer2", "layer9"], choice.layer, x)
    alone, source, _ = choose_stages(model, None, choice.layer, x)
    assert source == "layer" and alone == (("layer4", (16, 4, 4)),)
