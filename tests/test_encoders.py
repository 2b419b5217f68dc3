"""Encoder audits end to end: input presets, ``model.output_key``, token feature layers of vision
transformers (Hugging Face DINOv2, MONAI ViT), the embedding task's probes, representation
robustness and its gates, and grey data given to a 3-channel model.

The models are tiny (2 blocks of width 32 on 32×32 inputs) and the data are real: rows of the
bundled MNI152 patch set, 240 as the ``--reference`` set the probes are fitted on and 120 as the
audit set.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner, Result
from torch import nn

from medaudit.cli import cli
from medaudit.config import INPUT_PRESETS, load_config
from medaudit.data import preprocess
from medaudit.errors import ConfigError, ModelOutputError
from medaudit.model import select_output
from medaudit.checks import PLAIN  # a plain check's (empty) non-inferiority fields

ROOT = Path(__file__).resolve().parents[1]
MNI = ROOT / "examples" / "mni-patches" / "test.npz"
CLASSES = ["csf_other", "grey_matter", "white_matter"]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
#: One perturbation at two severities and few resamples: enough to see every part, quick.
FAST = ["--perturbation", "intensity.gamma", "--severities", "1,5", "--bootstrap", "50", "--quiet"]
#: The module written into the assets folder: the factory ``model.arch`` names for the state dict.
ARCH_MODULE = "encmodels"
ENCMODELS = '''\
import torch
from transformers import Dinov2Config, Dinov2Model


def tiny_dinov2():
    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8))
'''


def tiny_vit(num_classes: int) -> nn.Module:
    from monai.networks import nets

    torch.manual_seed(0)
    return nets.ViT(in_channels=3, img_size=(32, 32), patch_size=(8, 8), hidden_size=32, mlp_dim=64, num_layers=2,
                    num_heads=2, classification=True, num_classes=num_classes, post_activation=None,
                    spatial_dims=2).eval()


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def medaudit_run(*args: Any) -> Result:
    return CliRunner().invoke(cli, ["run", *(str(a) for a in args)])


def results_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


def perturbed(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in results["scenarios"] if s["perturbation"]]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """Data, models and configs, written once; the folder is on sys.path for ``model.arch``."""
    root = tmp_path_factory.mktemp("encoders")
    with np.load(MNI) as d:
        images, labels = d["images"], d["labels"]
    np.savez(root / "ref.npz", images=images[:240], labels=labels[:240])
    np.savez(root / "audit.npz", images=images[240:360], labels=labels[240:360])
    (root / f"{ARCH_MODULE}.py").write_text(ENCMODELS)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        sys.modules.pop(ARCH_MODULE, None)
        import encmodels  # type: ignore[import-not-found]

        torch.save(encmodels.tiny_dinov2().state_dict(), root / "dinov2.pt")
        x = torch.rand(2, 3, 32, 32)
        # MONAI's ViT returns (x, hidden_states): traced with strict=False, which allows the list in the tuple
        torch.jit.save(torch.jit.trace(tiny_vit(16), x, strict=False), str(root / "vit-encoder.ts.pt"))
        torch.jit.save(torch.jit.trace(tiny_vit(3), x, strict=False), str(root / "vit-classifier.ts.pt"))
        base_input = {"spatial_size": [32, 32], "intensity": {"scaling": "fixed", "max_value": 255}}
        dinov2 = write_yaml(root / "dinov2.yaml", {
            "model": {"arch": f"{ARCH_MODULE}:tiny_dinov2", "output_key": "pooler_output"},
            "input": {"preset": "dinov2", **base_input},
            "task": {"type": "embedding", "classes": CLASSES}})
        vit_encoder = write_yaml(root / "vit-encoder.yaml", {
            "model": {"output_key": 0}, "input": {"preset": "imagenet", **base_input},
            "task": {"type": "embedding", "classes": CLASSES}})
        vit_classifier = write_yaml(root / "vit-classifier.yaml", {
            "model": {"output_key": 0, "feature_layer": "auto"}, "input": {"preset": "imagenet", **base_input},
            "task": {"type": "multiclass", "classes": CLASSES}})
        yield SimpleNamespace(root=root, ref=root / "ref.npz", data=root / "audit.npz", dinov2=root / "dinov2.pt",
                              dinov2_cfg=dinov2, vit_encoder=root / "vit-encoder.ts.pt", vit_encoder_cfg=vit_encoder,
                              vit_classifier=root / "vit-classifier.ts.pt", vit_classifier_cfg=vit_classifier,
                              images=images, labels=labels)
        sys.modules.pop(ARCH_MODULE, None)


@pytest.fixture(scope="module")
def dinov2_audit(assets: SimpleNamespace) -> Path:
    """The HF DINOv2 encoder audited once through the CLI (model batch size 8: the determinism test reruns it)."""
    out = assets.root / "dinov2-out"
    res = medaudit_run(assets.dinov2, "--data", assets.data, "--reference", assets.ref, "--config", assets.dinov2_cfg,
                       "--out", out, "--model-batch-size", "8", "--save-predictions", *FAST)
    assert res.exit_code == 0, res.output
    return out


# ---------------------------------------------------------------------------------------------
# 1. input presets
# ---------------------------------------------------------------------------------------------


def test_presets_fill_the_input_spec_and_explicit_keys_win(tmp_path: Path) -> None:
    clip = load_config(write_yaml(tmp_path / "clip.yaml", {"input": {"preset": "clip"}})).input
    assert (clip.channels, clip.spatial_size, clip.dims) == (3, [224, 224], 2)
    assert clip.mean == CLIP_MEAN and clip.std == CLIP_STD
    for name in ("imagenet", "dinov2"):
        spec = load_config(None, {"input.preset": name}).input
        assert (spec.channels, spec.spatial_size, spec.mean, spec.std) == (3, [224, 224], IMAGENET_MEAN, IMAGENET_STD)
    # an explicit key overrides the preset's value, the others stay the preset's
    small = load_config(write_yaml(tmp_path / "small.yaml",
                                   {"input": {"preset": "imagenet", "spatial_size": [32, 32]}})).input
    assert small.spatial_size == [32, 32]
    assert (small.channels, small.dims, small.mean, small.std) == (3, 2, IMAGENET_MEAN, IMAGENET_STD)
    assert small.preset == "imagenet"
    one_mean = load_config(None, {"input.preset": "clip", "input.mean": [0.5]}).input
    assert one_mean.mean == [0.5] and one_mean.std == CLIP_STD
    # the table itself was not changed by a config that overrode it
    assert INPUT_PRESETS["imagenet"]["spatial_size"] == [224, 224]
    with pytest.raises(ConfigError, match=r"input\.preset"):
        load_config(write_yaml(tmp_path / "bad.yaml", {"input": {"preset": "resnet"}}))


# ---------------------------------------------------------------------------------------------
# 2. model.output_key
# ---------------------------------------------------------------------------------------------


def test_select_output_picks_the_named_element() -> None:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    t = torch.zeros(2, 3)
    assert select_output(t, None, "m.pt") is t
    pair = (torch.ones(2, 4), [torch.zeros(2, 5, 4)])
    with pytest.raises(ModelOutputError, match=r"model m\.pt returns a tuple of 2: \[0\] tensor \[2, 4\], \[1\] list"
                                               r".*set model\.output_key"):
        select_output(pair, None, "m.pt")
    assert select_output(pair, 0, "m.pt") is pair[0]
    assert select_output(pair, "0", "m.pt") is pair[0]  # an index written as a string (CLI override)
    assert select_output(pair, -2, "m.pt") is pair[0]
    with pytest.raises(ModelOutputError, match=r"model\.output_key 1 names no tensor"):
        select_output(pair, 1, "m.pt")  # a list, not a tensor
    with pytest.raises(ModelOutputError, match=r"model\.output_key 2 names no tensor"):
        select_output(pair, 2, "m.pt")

    pooled, hidden = torch.randn(2, 8), torch.randn(2, 5, 8)
    as_dict = {"last_hidden_state": hidden, "pooler_output": pooled}
    assert select_output(as_dict, "pooler_output", "m.pt") is pooled
    hf = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
    assert select_output(hf, "pooler_output", "m.pt") is pooled
    assert select_output(hf, "last_hidden_state", "m.pt") is hidden
    with pytest.raises(ModelOutputError, match=r"returns a BaseModelOutputWithPooling with keys 'last_hidden_state' "
                                               r"tensor \[2, 5, 8\]"):
        select_output(hf, None, "m.pt")
    for out in (as_dict, hf):
        with pytest.raises(ModelOutputError, match=r"model\.output_key 'logits' names no tensor in the output of model "
                                                   r"m\.pt: it returns a .* with keys 'last_hidden_state'"):
            select_output(out, "logits", "m.pt")
    # a field the model did not fill (hidden_states without output_hidden_states) is no tensor either
    with pytest.raises(ModelOutputError, match="'hidden_states'"):
        select_output(hf, "hidden_states", "m.pt")
    with pytest.raises(ModelOutputError,
                       match=r"'pooler_output' names no tensor .* is a tensor; remove model\.output_key"):
        select_output(t, "pooler_output", "m.pt")


# ---------------------------------------------------------------------------------------------
# 3. grey data for a 3-channel model
# ---------------------------------------------------------------------------------------------


class ChannelGap(nn.Module):
    """Class 1 scores 1000 × the largest difference between input channels; class 0 scores 0. On
    identical channels the logits tie at 0 and argmax picks class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gap = (x[:, 0] - x[:, 1]).abs().amax(dim=(1, 2)) + (x[:, 0] - x[:, 2]).abs().amax(dim=(1, 2))
        return torch.stack([torch.zeros_like(gap), 1000.0 * gap], dim=1)


def test_grey_data_stays_grey_through_noise_and_is_replicated_afterwards(assets: SimpleNamespace,
                                                                         tmp_path: Path) -> None:
    model = torch.jit.script(ChannelGap())
    # the model sees a channel difference: the audit below can fail
    assert model(torch.rand(4, 3, 8, 8)).argmax(1).tolist() == [1, 1, 1, 1]
    assert model(torch.rand(4, 1, 8, 8).expand(4, 3, 8, 8)).argmax(1).tolist() == [0, 0, 0, 0]
    path = tmp_path / "gap.ts.pt"
    torch.jit.save(model, str(path))
    data = tmp_path / "grey.npz"
    np.savez(data, images=assets.images[240:300], labels=np.zeros(60, dtype=np.int64))
    cfg = write_yaml(tmp_path / "gap.yaml", {
        "model": {"feature_layer": None},
        "input": {"dims": 2, "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                  "intensity": {"scaling": "fixed", "max_value": 255}},
        "task": {"type": "multiclass", "classes": ["same", "different"]}})
    out = tmp_path / "out"
    res = medaudit_run(path, "--data", data, "--config", cfg, "--out", out, "--perturbation", "mri.noise",
                       "--bootstrap", "20", "--quiet")
    assert res.exit_code == 0, res.output
    results = results_of(out)
    ids = [s["id"] for s in results["scenarios"]]
    assert ids == ["clean"] + [f"mri.noise@{k}" for k in range(1, 6)]
    # per-pixel noise drawn for each channel would separate them: the noise is drawn once, on the grey image
    assert {s["id"]: s["metrics"]["accuracy"]["value"] for s in results["scenarios"]} == {i: 1.0 for i in ids}

    # both paths of the preprocessing: replicated at once (keep_grey=False), or kept grey for the runner
    spec = load_config(cfg).input.model_copy(update={"spatial_size": [32, 32]})
    raw = assets.images[240][None]  # [1, 48, 48] uint8
    replicated = preprocess(raw, spec, "row 240")
    grey = preprocess(raw, spec, "row 240", keep_grey=True)
    assert replicated.shape == (3, 32, 32) and grey.shape == (1, 32, 32)
    assert torch.equal(replicated, grey.expand(3, 32, 32))
    mean = torch.tensor(spec.mean)[:, None, None]
    std = torch.tensor(spec.std)[:, None, None]
    assert ((grey - mean) / std).shape == (3, 32, 32)  # the normalisation's broadcast replicates it


# ---------------------------------------------------------------------------------------------
# 4. Hugging Face DINOv2 encoder (state dict + arch)
# ---------------------------------------------------------------------------------------------


def _embeddings(images: np.ndarray) -> torch.Tensor:
    """The tiny DINOv2's pooled output on images preprocessed by hand: /255, 48→32 bilinear with
    antialiasing, grey replicated to 3 channels by the ImageNet normalisation; batches of 8 as
    the audit's model batch size."""
    import encmodels  # type: ignore[import-not-found]  # on sys.path through the assets fixture

    model = encmodels.tiny_dinov2().eval()
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False).clamp(0.0, 1.0)
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    assert x.shape[1] == 3
    with torch.inference_mode():
        return torch.cat([model(pixel_values=b).pooler_output for b in x.split(8)])


def test_dinov2_encoder_audit(assets: SimpleNamespace, dinov2_audit: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    results = results_of(dinov2_audit)
    model = results["model"]
    assert model["task"] == "embedding" and model["output_key"] == "pooler_output"
    assert model["format"] == "state_dict"
    probe = model["probe"]
    assert probe["kind"] == "linear+knn"
    assert probe["reference"]["n_samples"] == 240 and probe["embedding_dim"] == 32
    assert probe["linear"]["C"] == 1.0 and probe["knn"]["k"] == 20 and probe["knn"]["metric"] == "cosine"
    assert "encoder" in model["representation"]["source"]
    assert model["representation"]["knn_reference"] == "the --reference set"
    assert [s["id"] for s in results["scenarios"]] == ["clean", "intensity.gamma@1", "intensity.gamma@5"]
    clean = results["scenarios"][0]
    assert {"accuracy", "knn_probe/accuracy"} <= set(clean["metrics"])
    assert clean["representation"] == {}
    for s in perturbed(results):
        rep = s["representation"]
        assert set(rep) == {"cosine", "cka", "knn_consistency"}, s["id"]
        for key, est in rep.items():
            assert 0.0 <= est["ci_low"] <= est["ci_high"] <= 1.0 + 1e-12, (s["id"], key, est)
            assert 0.0 <= est["value"] <= 1.0 + 1e-12, (s["id"], key, est)
            if key != "cka":  # bootstrap CKA is biased upward: its interval may lie above the point value
                assert est["ci_low"] <= est["value"] <= est["ci_high"], (s["id"], key, est)
    # a stronger gamma moves the embeddings further
    weak, strong = (s["representation"]["cosine"]["value"] for s in perturbed(results))
    assert strong < weak < 1.0

    # the probes, independently: embeddings computed here, scikit-learn fitted on the reference rows
    # in float64, as medaudit fits its probe: on float32 input scikit-learn's lbfgs runs in float32 and
    # stops (tol 1e-4) about 1e-3 away in probability
    ref_x = _embeddings(assets.images[:240]).double().numpy()
    audit_x = _embeddings(assets.images[240:360]).double().numpy()
    ref_y, audit_y = assets.labels[:240], assets.labels[240:360]
    n = len(audit_y)
    linear = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, random_state=0))
    linear.fit(ref_x, ref_y)
    hits = int((linear.predict(audit_x) == audit_y).sum())
    assert clean["metrics"]["accuracy"]["value"] == pytest.approx(hits / n, abs=1e-9)
    # the linear probe's probabilities, sample by sample (predictions.npz keeps them, not the embeddings)
    with np.load(dinov2_audit / "predictions.npz") as preds:
        assert list(preds["scenario_ids"]) == ["clean", "intensity.gamma@1", "intensity.gamma@5"]
        np.testing.assert_allclose(preds["probs"][0], linear.predict_proba(audit_x), atol=1e-6)
    one_hot = np.eye(3)[audit_y]
    linear_brier = float(((linear.predict_proba(audit_x) - one_hot) ** 2).sum(1).mean())
    assert clean["metrics"]["brier"]["value"] == pytest.approx(linear_brier, abs=1e-5)
    knn = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute").fit(ref_x, ref_y)
    knn_acc = float((knn.predict(audit_x) == audit_y).mean())
    knn_brier = float(((knn.predict_proba(audit_x) - one_hot) ** 2).sum(1).mean())
    # At most one sample apart: medaudit ranks the cosine similarities in float32, scikit-learn the
    # cosine distances in float64, so two reference samples at (nearly) the same distance from a
    # query may swap across the 20th place and move one vote (1/20 of probability between two
    # classes: at most 0.21 of that sample's Brier score); a tied vote goes to the first class in both.
    assert abs(clean["metrics"]["knn_probe/accuracy"]["value"] - knn_acc) <= 1 / n + 1e-12
    assert abs(clean["metrics"]["knn_probe/brier"]["value"] - knn_brier) <= 0.21 / n
    # the two probes are different read-outs: their probabilities differ
    assert clean["metrics"]["knn_probe/brier"]["value"] != pytest.approx(clean["metrics"]["brier"]["value"], abs=1e-3)


def test_token_sequence_is_no_embedding(assets: SimpleNamespace, tmp_path: Path) -> None:
    """``last_hidden_state`` is ``[B, T, C]``: refused, with the hint to name the pooled output."""
    cfg = yaml.safe_load(assets.dinov2_cfg.read_text())
    cfg["model"]["output_key"] = "last_hidden_state"
    out = tmp_path / "out"
    res = medaudit_run(assets.dinov2, "--data", assets.data, "--reference", assets.ref, "--config",
                       write_yaml(tmp_path / "tokens.yaml", cfg), "--out", out, *FAST)
    assert res.exit_code == 2, res.output
    assert "an embedding task needs one embedding per image [B, D]" in res.output
    assert "[B, T, C]: set model.output_key to the pooled output" in res.output
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 5. MONAI ViT encoder (TorchScript, a tuple output)
# ---------------------------------------------------------------------------------------------


def test_monai_vit_encoder_through_torchscript(assets: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = medaudit_run(assets.vit_encoder, "--data", assets.data, "--reference", assets.ref, "--config",
                       assets.vit_encoder_cfg, "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    results = results_of(out)
    model = results["model"]
    assert model["format"] == "torchscript" and model["task"] == "embedding" and model["output_key"] == 0
    assert model["probe"]["embedding_dim"] == 16  # the [B, 16] element 0 of (x, hidden_states)
    assert model["representation"]["dim"] == 16
    for s in perturbed(results):
        assert set(s["representation"]) == {"cosine", "cka", "knn_consistency"}, s["id"]

    # without output_key the tuple is refused, and the message lists its elements
    cfg = yaml.safe_load(assets.vit_encoder_cfg.read_text())
    del cfg["model"]["output_key"]
    bare = write_yaml(tmp_path / "no-key.yaml", cfg)
    res = medaudit_run(assets.vit_encoder, "--data", assets.data, "--reference", assets.ref, "--config", bare,
                       "--out", tmp_path / "o2", *FAST)
    assert res.exit_code == 2, res.output
    assert "returns a tuple of 2: [0] tensor" in res.output and "model.output_key" in res.output
    assert not (tmp_path / "o2").exists()


# ---------------------------------------------------------------------------------------------
# 6. the embedding task needs --reference
# ---------------------------------------------------------------------------------------------


def test_embedding_task_without_reference_is_a_usage_error(assets: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = medaudit_run(assets.vit_encoder, "--data", assets.data, "--config", assets.vit_encoder_cfg, "--out", out,
                       *FAST)
    assert res.exit_code == 2, res.output
    assert "needs --reference" in res.output
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


# ---------------------------------------------------------------------------------------------
# 7. a ViT classifier: its token feature layer
# ---------------------------------------------------------------------------------------------


def test_vit_classifier_reads_the_cls_token_of_its_final_norm(assets: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = medaudit_run(assets.vit_classifier, "--data", assets.data, "--reference", assets.ref, "--config",
                       assets.vit_classifier_cfg, "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    results = results_of(out)
    model = results["model"]
    assert model["task"] == "multiclass"
    assert model["feature_layer"] == "norm" and model["feature_layer_source"] == "auto"
    # the head was verified: the CLS token of 'norm' through 'classification_head' reproduces the logits
    # (the mean patch token would not)
    assert model["head"] == "classification_head"
    tokens = model["tokens"]["norm"]
    assert (tokens["prefix"], tokens["cls"], tokens["registers"]) == (1, True, 0)
    assert "cls_token" in tokens["source"] and tokens["pooling"] == "auto"
    assert model["representation"]["source"] == "the pooled output of 'norm'" and model["representation"]["dim"] == 32
    for s in perturbed(results):
        for det in ("mahalanobis", "knn", "vim"):
            assert det in s["ood"], (s["id"], det, sorted(s["ood"]))
            assert 0.0 <= s["ood"][det]["auroc"]["value"] <= 1.0
        assert set(s["representation"]) == {"cosine", "cka", "knn_consistency"}
    # the strong gamma is the easier one to detect in the CLS features
    weak, strong = (s["ood"]["mahalanobis"]["auroc"]["value"] for s in perturbed(results))
    assert strong > weak


# ---------------------------------------------------------------------------------------------
# 8. representation gates
# ---------------------------------------------------------------------------------------------


def test_representation_gates(assets: SimpleNamespace, tmp_path: Path) -> None:
    base = [assets.dinov2, "--data", assets.data, "--reference", assets.ref, "--config", assets.dinov2_cfg,
            "--perturbation", "intensity.gamma", "--severities", "5", "--bootstrap", "20", "--quiet",
            "--model-batch-size", "8"]
    for i, bad in enumerate(["intensity.gamma@5.representation.foo<0.5", "clean.representation.cka<0.5"]):
        out = tmp_path / f"bad{i}"
        res = medaudit_run(*base, "--out", out, "--fail-on", bad)
        assert res.exit_code == 2, res.output
        assert bad in res.output
        assert not out.exists()
    out = tmp_path / "out"
    res = medaudit_run(*base, "--out", out, "--fail-on", "intensity.gamma@5.representation.cka<1.01",
                       "--fail-on", "intensity.gamma@*.representation.cosine<0.01")
    assert res.exit_code == 1, res.output
    results = results_of(out)
    cka = results["scenarios"][1]["representation"]["cka"]["value"]
    cosine = results["scenarios"][1]["representation"]["cosine"]["value"]
    assert results["checks"] == [
        {"expr": "intensity.gamma@5.representation.cka<1.01", "value": cka, "passed": False, "threshold": 1.01,
         "error": None, "scenario": "intensity.gamma@5", **PLAIN},
        {"expr": "intensity.gamma@*.representation.cosine<0.01", "value": cosine, "passed": True, "threshold": 0.01,
         "error": None, "scenario": "intensity.gamma@5", **PLAIN}]
    assert "FAIL intensity.gamma@5.representation.cka" in res.output


# ---------------------------------------------------------------------------------------------
# 9. audit.representation: false
# ---------------------------------------------------------------------------------------------


def test_representation_can_be_turned_off(assets: SimpleNamespace, tmp_path: Path) -> None:
    cfg = yaml.safe_load(assets.dinov2_cfg.read_text())
    cfg["audit"] = {"representation": False}
    off = write_yaml(tmp_path / "off.yaml", cfg)
    out = tmp_path / "out"
    res = medaudit_run(assets.dinov2, "--data", assets.data, "--reference", assets.ref, "--config", off,
                       "--out", out, "--model-batch-size", "8", *FAST)
    assert res.exit_code == 0, res.output
    results = results_of(out)
    assert results["model"]["representation"] is None
    assert all(s["representation"] == {} for s in results["scenarios"])
    assert "knn_probe/accuracy" in results["scenarios"][0]["metrics"]  # the probes still ran
    # and a representation gate is refused before the audit runs
    res = medaudit_run(assets.dinov2, "--data", assets.data, "--reference", assets.ref, "--config", off,
                       "--out", tmp_path / "gated", "--fail-on", "*.representation.cka<0.5", *FAST)
    assert res.exit_code == 2 and "measures no representation robustness" in res.output, res.output
    assert not (tmp_path / "gated").exists()


# ---------------------------------------------------------------------------------------------
# 10. determinism over the loading batch size
# ---------------------------------------------------------------------------------------------


def test_encoder_audit_does_not_depend_on_the_batch_size(assets: SimpleNamespace, dinov2_audit: Path,
                                                         tmp_path: Path) -> None:
    runs = []
    for batch in (16, 64):
        out = tmp_path / f"b{batch}"
        res = medaudit_run(assets.dinov2, "--data", assets.data, "--reference", assets.ref, "--config",
                           assets.dinov2_cfg, "--out", out, "--model-batch-size", "8", "--batch-size", batch, *FAST)
        assert res.exit_code == 0, res.output
        results = results_of(out)
        assert results["config"]["audit"]["batch_size"] == batch
        runs.append(results)
    runs.append(results_of(dinov2_audit))  # the default batch size
    scenarios = []
    for results in runs:
        for s in results["scenarios"]:
            s.pop("throughput", None)
        scenarios.append(results["scenarios"])
    assert scenarios[0] == scenarios[1] == scenarios[2]
    assert runs[0]["model"]["probe"] == runs[1]["model"]["probe"]


def test_encoder_with_a_named_block_has_no_head_and_reads_its_tokens(assets: SimpleNamespace, tmp_path: Path) -> None:
    # a weight matrix as wide as the embedding is no class head, and no stages are guessed from one
    cfg = yaml.safe_load(assets.dinov2_cfg.read_text())
    cfg["model"]["feature_layer"] = "layernorm"
    named = write_yaml(tmp_path / "named.yaml", cfg)
    out = tmp_path / "out"
    res = medaudit_run(assets.dinov2, "--data", assets.data, "--reference", assets.ref, "--config", named,
                       "--out", out, "--model-batch-size", "8", *FAST)
    assert res.exit_code == 0, res.output
    model = results_of(out)["model"]
    assert model["feature_layer"] == "layernorm" and model["head"] is None
    assert "an encoder has no classification head" in model["feature_layer_note"]
    assert model["feature_layers"] == ["layernorm"] and model["feature_layers_source"] == "layer"
    assert model["tokens"]["layernorm"]["cls"] is True
    assert model["representation"]["source"] == "the encoder's embeddings"  # not the named block
    assert "spectral" in results_of(out)["scenarios"][1]["ood"]  # the block's patch tokens


def test_probes_fitted_on_shuffled_labels_raise_the_near_chance_alert(assets: SimpleNamespace, tmp_path: Path) -> None:
    # an encoder audit whose reference labels do not match its images must be loud, never reassuring
    with np.load(assets.ref) as d:
        images, labels = d["images"], d["labels"]
    shuffled = tmp_path / "shuffled.npz"
    np.savez(shuffled, images=images, labels=np.random.default_rng(0).permutation(labels))
    out = tmp_path / "out"
    res = medaudit_run(assets.dinov2, "--data", assets.data, "--reference", shuffled, "--config", assets.dinov2_cfg,
                       "--out", out, "--model-batch-size", "8", *FAST)
    assert res.exit_code == 0, res.output
    results = results_of(out)
    alert = next(w for w in results["warning_records"] if w["code"] == "near-chance")
    assert "the probes were fitted on --reference" in alert["message"]
    assert results["verdict"]["status"] == "alert"


def test_report_identity_names_the_probes(dinov2_audit: Path) -> None:
    html = (dinov2_audit / "report.html").read_text(encoding="utf-8")
    assert "every metric is the linear probe" in html and "fitted on the --reference set of 240 samples" in html


def test_multilabel_audit_measures_the_representation_without_a_vote(assets: SimpleNamespace, tmp_path: Path) -> None:
    # multi-hot labels give no single class to vote on: cosine and CKA only
    with np.load(assets.data) as d:
        images, labels = d["images"], d["labels"]
    data = tmp_path / "multilabel.npz"
    np.savez(data, images=images, labels=np.eye(3, dtype=np.int64)[labels])
    cfg = yaml.safe_load(assets.vit_classifier_cfg.read_text())
    cfg["task"]["type"] = "multilabel"
    out = tmp_path / "out"
    res = medaudit_run(assets.vit_classifier, "--data", data, "--config", write_yaml(tmp_path / "ml.yaml", cfg),
                       "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    results = results_of(out)
    assert results["model"]["representation"]["knn_reference"] is None
    assert all(set(s["representation"]) == {"cosine", "cka"} for s in perturbed(results))
    assert "k-NN consistency is not measured" in (out / "report.html").read_text(encoding="utf-8")
