"""ODIN (plugins/ood/odin.py): the input-gradient step against a closed form, inference mode,
the ε = 0 limit, a real architecture eager and TorchScript, and bad configurations.

The closed form: for a linear model on normalised images, ``f(x) = W ((x − m) / s) + b`` with
``x`` in ``[0, 1]`` flattened, ``∇_x log softmax(f(x) / T)_ŷ = (W_ŷ − Σ_c S_c W_c) / (T s)``
(``S = softmax(f(x) / T)``), so ODIN's step ``x̃ = x − ε sign(∇_x[−log S_ŷ])`` is
``x + ε sign(W_ŷ − Σ_c S_c W_c)`` and its score ``max_k softmax(f(x̃) / T)_k`` can be computed
by numpy without autograd.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from medaudit.plugins.ood.detectors import MSP
from medaudit.plugins.ood.odin import DEFAULT_EPSILON, ODIN
from medaudit.testing import check_detector_declaration

MEAN, STD = 0.5, 0.25


def _linear(weight: Tensor, bias: Tensor):
    """The model callable the audit would hand over: ``[0, 1]`` images → logits of a linear model
    on the normalised, flattened images (a ``[D]`` weight gives one-value binary outputs ``[B]``)."""
    def model(x: Tensor) -> Tensor:
        w = weight if weight.ndim == 1 else weight.T
        return ((x - MEAN) / STD).flatten(1) @ w.to(x.dtype) + bias.to(x.dtype)
    return model


def _numpy_odin(x: np.ndarray, w: np.ndarray, b: np.ndarray, t: float, eps: float) -> np.ndarray:
    """ODIN's score ``[B]`` of a linear model from the closed-form input gradient (float64)."""
    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    flat = x.reshape(len(x), -1)
    s = softmax((((flat - MEAN) / STD) @ w.T + b) / t)
    y_hat = s.argmax(axis=1)
    grad_log = (w[y_hat] - s @ w) / (t * STD)  # ∇_x log S_ŷ, in [0, 1] units
    moved = flat + eps * np.sign(grad_log)
    return softmax((((moved - MEAN) / STD) @ w.T + b) / t).max(axis=1)


def _images(n: int = 5, shape: tuple[int, ...] = (2, 3, 3), seed: int = 0, dtype=torch.float64) -> Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _weights(k: int, d: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=gen, dtype=torch.float64), torch.randn(k, generator=gen, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# 1. The closed form
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "eps"), [(1000.0, DEFAULT_EPSILON), (1000.0, 0.02), (2.0, 0.05), (1.0, 0.1)])
def test_linear_model_matches_closed_form(t: float, eps: float) -> None:
    x = _images()
    w, b = _weights(4, x[0].numel())
    det = ODIN(temperature=t, epsilon=eps)
    det.model = _linear(w, b)
    emb = det.embed(det.model(x), x)
    assert emb.shape == (5, 1) and emb.device == x.device
    want = _numpy_odin(x.numpy(), w.numpy(), b.numpy(), t, eps)
    np.testing.assert_allclose(emb[:, 0].numpy(), want, rtol=0, atol=1e-10)
    # The step matters at this tolerance: the unperturbed score (and the score after a step in the
    # wrong direction) differ from the closed form by far more than it.
    assert np.abs(_numpy_odin(x.numpy(), w.numpy(), b.numpy(), t, 0.0) - want).max() > 1e-8
    assert np.abs(_numpy_odin(x.numpy(), w.numpy(), b.numpy(), t, -eps) - want).max() > 1e-8
    # The score is the paper's, negated.
    torch.testing.assert_close(det.score(emb), -emb[:, 0].double(), rtol=0, atol=0)


def test_float32_images_as_the_runner_passes_them() -> None:
    """The runner hands float32 images; the closed form holds to float32 rounding."""
    x = _images(dtype=torch.float32)
    w, b = _weights(3, x[0].numel(), seed=2)
    det = ODIN(temperature=1000.0, epsilon=0.01)
    det.model = _linear(w.float(), b.float())
    emb = det.embed(det.model(x), x)
    want = _numpy_odin(x.double().numpy(), w.float().double().numpy(), b.float().double().numpy(), 1000.0, 0.01)
    np.testing.assert_allclose(emb[:, 0].numpy(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("column", [False, True], ids=["[B]", "[B,1]"])
def test_binary_one_value_output_is_two_class(column: bool) -> None:
    """A one-logit model ``z`` is ODIN'd as the two-class logits ``[0, z]`` (as detectors.two_class)."""
    x = _images(n=6, seed=3)
    w, b = _weights(1, x[0].numel(), seed=4)
    det = ODIN(temperature=3.0, epsilon=0.05)
    model = _linear(w[0], b[0])
    det.model = (lambda im: model(im)[:, None]) if column else model
    emb = det.embed(model(x), x)
    w2 = np.concatenate([np.zeros_like(w.numpy()), w.numpy()])
    b2 = np.array([0.0, float(b[0])])
    np.testing.assert_allclose(emb[:, 0].numpy(), _numpy_odin(x.numpy(), w2, b2, 3.0, 0.05), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# 2. Inside the runner's inference mode
# ---------------------------------------------------------------------------------------------


def test_embed_inside_inference_mode_leaves_no_grad() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(18, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    net.eval()
    det = ODIN(temperature=10.0, epsilon=0.05)
    det.model = lambda im: net((im - MEAN) / STD)
    x = _images(dtype=torch.float32)
    expected = det.embed(net(x), x)  # outside inference mode
    with torch.inference_mode():
        x_inf = x.clone()  # an inference tensor, as the runner's batches are
        logits = net((x_inf - MEAN) / STD)
        emb = det.embed(logits, x_inf)
    assert torch.is_inference(x_inf) and not x_inf.requires_grad
    torch.testing.assert_close(x_inf, x, rtol=0, atol=0)  # the images are not modified
    assert emb.shape == (5, 1) and torch.isfinite(emb).all()
    torch.testing.assert_close(emb, expected, rtol=0, atol=0)
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    # ... and the step did something: it differs from the temperature-scaled softmax of x.
    assert (emb - torch.softmax(net((x - MEAN) / STD) / 10.0, dim=1).amax(1, keepdim=True)).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# 3. ε = 0 and the direction of the step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1.0, 7.0, 1000.0])
def test_epsilon_zero_is_temperature_scaled_msp(t: float) -> None:
    x = _images(n=8, seed=5)
    w, b = _weights(5, x[0].numel(), seed=6)
    det = ODIN(temperature=t, epsilon=0.0)
    det.model = _linear(w, b)
    logits = det.model(x)
    emb = det.embed(logits, x)
    torch.testing.assert_close(emb[:, 0], torch.softmax(logits / t, dim=1).amax(dim=1), rtol=0, atol=1e-12)
    torch.testing.assert_close(det.score(emb), MSP().score(logits / t), rtol=0, atol=1e-12)


def test_small_step_raises_the_confidence_of_a_linear_model() -> None:
    """For a linear model ``log S_ŷ`` is concave in ``x`` with directional derivative
    ``ε ‖∇ log S_ŷ‖₁ > 0`` along ODIN's step, so a small enough step raises every sample's maximum
    softmax, the more the larger ε (within that range). Whether in-distribution inputs gain more
    than shifted ones depends on the trained model, so it is not tested here."""
    x = _images(n=8, seed=7)
    w, b = _weights(4, x[0].numel(), seed=8)
    scores = []
    for eps in (0.0, 1e-4, 1e-3):
        det = ODIN(temperature=5.0, epsilon=eps)
        det.model = _linear(w, b)
        scores.append(det.embed(det.model(x), x)[:, 0])
    assert bool((scores[1] > scores[0]).all()) and bool((scores[2] > scores[1]).all())


# ---------------------------------------------------------------------------------------------
# 4. A real architecture, eager and TorchScript
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def densenet():
    monai_nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    net = monai_nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=3).eval()
    return net


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
@pytest.mark.parametrize(("t", "eps"), [(1.0, 0.02), (1000.0, DEFAULT_EPSILON)])
def test_densenet121_eager_and_torchscript(densenet, mni_slices: Tensor, t: float, eps: float) -> None:
    x = F.avg_pool2d(mni_slices, 4)  # four real 32×32 brain slices in [0, 1]
    traced = torch.jit.trace(densenet, (x - MEAN) / STD, check_trace=False)
    results = []
    for net in (densenet, traced):
        det = ODIN(temperature=t, epsilon=eps)
        det.model = lambda im, net=net: net((im - MEAN) / STD)
        with torch.inference_mode():
            emb = det.embed(det.model(x), x)
        assert emb.shape == (4, 1) and bool(torch.isfinite(emb).all())
        assert bool(((emb >= 1 / 3 - 1e-9) & (emb <= 1)).all())
        results.append(emb)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-5)
    assert all(p.grad is None for p in densenet.parameters())
    if t == 1.0:
        # The gradient step moves the scores by far more than the tolerance, so the comparison
        # above tests the traced model's input gradient, not just its forward pass.
        with torch.no_grad():
            plain = torch.softmax(densenet((x - MEAN) / STD) / t, dim=1).amax(dim=1, keepdim=True)
        assert (results[0] - plain).abs().max() > 1e-3
        # Each sample's score is its own (the model is in eval mode): a batch of one gives the same.
        det = ODIN(temperature=t, epsilon=eps)
        det.model = lambda im: densenet((im - MEAN) / STD)
        alone = torch.cat([det.embed(densenet((x[i:i + 1] - MEAN) / STD), x[i:i + 1]) for i in range(4)])
        torch.testing.assert_close(alone, results[0], rtol=0, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    x = _images(dtype=torch.float32)
    w, b = _weights(4, x[0].numel())
    det = ODIN(temperature=1000.0, epsilon=0.01)
    det.model = _linear(w.float(), b.float())
    cpu = det.embed(det.model(x), x)
    det.model = _linear(w.float().cuda(), b.float().cuda())
    with torch.inference_mode():
        gpu = det.embed(det.model(x.cuda()), x.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 5. Declaration and bad configurations
# ---------------------------------------------------------------------------------------------


def test_declaration() -> None:
    det = ODIN()
    check_detector_declaration(det)
    assert (det.name, det.needs, det.needs_model, det.logits_only) == ("odin", "inputs", True, True)
    assert (det.temperature, det.epsilon) == (1000.0, DEFAULT_EPSILON) and DEFAULT_EPSILON == 0.0014
    assert det.model is None and ODIN.model is None
    det.fit(torch.rand(4, 1), torch.arange(4))  # nothing to fit, and nothing kept
    assert set(vars(det)) == {"temperature", "epsilon"}


@pytest.mark.parametrize("t", [0.0, -1.0, math.nan, math.inf])
def test_bad_temperature(t: float) -> None:
    with pytest.raises(ValueError, match=rf"odin temperature must be positive and finite, got {t!r}"):
        ODIN(temperature=t)


@pytest.mark.parametrize("eps", [-0.001, math.nan, math.inf])
def test_bad_epsilon(eps: float) -> None:
    with pytest.raises(ValueError, match=rf"odin epsilon must be finite and >= 0 .* got {eps!r}"):
        ODIN(epsilon=eps)


def test_no_model_or_no_images() -> None:
    x = _images()
    det = ODIN()
    with pytest.raises(ValueError, match="odin needs the model: the audit sets detector.model"):
        det.embed(torch.zeros(5, 3), x)
    w, b = _weights(3, x[0].numel())
    det.model = _linear(w, b)
    with pytest.raises(ValueError, match=r"odin needs the input images \[B, C, \*spatial\]"):
        det.embed(torch.zeros(5, 3), None)


def test_per_voxel_outputs_are_refused() -> None:
    det = ODIN()
    det.model = lambda im: im.repeat(1, 3, 1, 1)  # [B, 3, H, W], a segmentation map
    with pytest.raises(ValueError, match=r"odin needs class logits \[B, K\].*got outputs of shape \(2, 3, 4, 4\)"):
        det.embed(torch.zeros(2, 3, 4, 4), torch.rand(2, 1, 4, 4))


def test_odin_runs_in_an_audit_when_asked_for(tmp_path: Path) -> None:
    """plugins.ood.odin: true through the CLI on the bundled example: the audit hands odin the
    model, its gradients are taken inside the forward loop, and its scores are results like any
    detector's; without the setting it does not run."""
    from click.testing import CliRunner

    from medaudit.cli import cli

    root = Path(__file__).resolve().parents[1]
    config = tmp_path / "odin.yaml"
    config.write_text((root / "examples" / "mni-patches.yaml").read_text(encoding="utf-8")
                      + "\nplugins:\n  ood:\n    odin: true\n    odin_temperature: 1000\n", encoding="utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(root / "examples" / "model.pt"), "--data",
                                      str(root / "examples" / "mni-patches" / "test.npz"), "--config", str(config),
                                      "--perturbation", "mri.noise", "--bootstrap", "50", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    noise = next(s for s in results["scenarios"] if s["id"] == "mri.noise@5")
    assert 0.5 < noise["ood"]["odin"]["auroc"]["value"] <= 1.0
    assert "odin" in noise["failure_detection"] and "odin" in noise["epd"]
