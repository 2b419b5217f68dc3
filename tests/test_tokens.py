"""Token layouts of vision transformers (medaudit.tokens) on real Hugging Face and MONAI models."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from medaudit.tokens import TokenLayout, find_layout, is_token_sequence, patch_map, pooled_tokens

transformers = pytest.importorskip("transformers")

# Tiny models: 32² inputs in 8² patches, so 4×4 = 16 patch tokens.
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _seeded(build):  # reproducible random weights
    torch.manual_seed(0)
    return build().eval()


@pytest.fixture(scope="module")
def dinov2() -> nn.Module:
    return _seeded(lambda: transformers.Dinov2Model(transformers.Dinov2Config(**SMALL)))


@pytest.fixture(scope="module")
def dinov2_reg() -> nn.Module:
    return _seeded(lambda: transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(**SMALL, num_register_tokens=4)))


def _monai_vit(classification: bool) -> nn.Module:
    nets = pytest.importorskip("monai.networks.nets")
    return _seeded(lambda: nets.ViT(in_channels=3, img_size=(32, 32), patch_size=(8, 8), hidden_size=32, mlp_dim=64,
                                    num_layers=2, num_heads=2, classification=classification, num_classes=3,
                                    spatial_dims=2))


def _capture(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` (first tensor of a tuple output) in one forward pass, via a forward hook."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


# ---------------------------------------------------------------------------------------------
# find_layout from the model's parameters
# ---------------------------------------------------------------------------------------------


def test_dinov2_cls(dinov2: nn.Module, x: torch.Tensor) -> None:
    hidden = _capture(dinov2, "encoder.layer.1", x)
    assert hidden.shape == (2, 1 + 16, 32)
    layout = find_layout(dinov2, hidden.shape[1], (32, 32))
    assert (layout.prefix, layout.cls, layout.registers) == (1, True, 0)
    assert "embeddings.cls_token" in layout.source


def test_dinov2_registers(dinov2_reg: nn.Module, x: torch.Tensor) -> None:
    hidden = _capture(dinov2_reg, "encoder.layer.1", x)
    assert hidden.shape == (2, 1 + 4 + 16, 32)
    layout = find_layout(dinov2_reg, hidden.shape[1], (32, 32))
    assert (layout.prefix, layout.cls, layout.registers) == (5, True, 4)
    assert "embeddings.cls_token" in layout.source and "embeddings.register_tokens" in layout.source


def test_clip_class_embedding(x: torch.Tensor) -> None:
    model = _seeded(lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL)))
    with torch.no_grad():
        hidden = model(x).last_hidden_state
    assert hidden.shape[1] == 17
    layout = find_layout(model, hidden.shape[1], (32, 32))
    assert (layout.prefix, layout.cls, layout.registers) == (1, True, 0)
    assert "class_embedding" in layout.source


@pytest.mark.parametrize(("classification", "prefix"), [(True, 1), (False, 0)])
def test_monai_vit(classification: bool, prefix: int, x: torch.Tensor) -> None:
    model = _monai_vit(classification)
    hidden = _capture(model, "blocks.1", x)
    assert hidden.shape == (2, prefix + 16, 32)
    layout = find_layout(model, hidden.shape[1], (32, 32))
    assert (layout.prefix, layout.cls, layout.registers) == (prefix, classification, 0)
    # With a CLS token the parameter decides; without one, the count (16 = 4×4) does.
    assert ("cls_token" in layout.source) == classification
    assert layout.source.startswith("model parameter" if classification else "inferred from the token count")


def test_parameter_names_survive_torchscript_and_export(dinov2_reg: nn.Module, x: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(dinov2_reg, x, strict=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        exported = torch.export.export(dinov2_reg, (x,)).module()
    assert isinstance(exported, torch.fx.GraphModule) and isinstance(loaded, torch.jit.ScriptModule)
    for module in (traced, loaded, exported):
        # No spatial size: only the parameters can give the answer (inference would raise).
        layout = find_layout(module, 21)
        assert (layout.prefix, layout.cls, layout.registers) == (5, True, 4), type(module)


class TimmLike(nn.Module):
    """What timm's VisionTransformer exposes: ``num_prefix_tokens``, ``cls_token``, ``reg_token``."""

    def __init__(self, class_token: bool, reg_tokens: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, 8)) if reg_tokens else None
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + reg_tokens


@pytest.mark.parametrize(("class_token", "regs"), [(True, 4), (False, 0), (False, 2)])
def test_timm_num_prefix_tokens(class_token: bool, regs: int) -> None:
    wrapped = nn.Sequential(TimmLike(class_token, regs))  # a wrapper around the backbone, as users write
    layout = find_layout(wrapped, int(class_token) + regs + 196, (224, 224))
    assert (layout.prefix, layout.cls, layout.registers) == (int(class_token) + regs, class_token, regs)
    assert "num_prefix_tokens" in layout.source


def test_deit_distillation_token_is_a_prefix_token() -> None:
    model = _seeded(lambda: transformers.DeiTModel(transformers.DeiTConfig(**SMALL)))
    layout = find_layout(model, 2 + 16, (32, 32))
    assert (layout.prefix, layout.cls, layout.registers) == (2, True, 0)


def test_found_prefix_larger_than_the_sequence(dinov2_reg: nn.Module) -> None:
    # e.g. a layer before the prefix tokens are prepended, with fewer tokens than the prefix
    with pytest.raises(ValueError, match="model.tokens.prefix"):
        find_layout(dinov2_reg, 4, (32, 32))


# ---------------------------------------------------------------------------------------------
# pooled_tokens / patch_map on real block outputs
# ---------------------------------------------------------------------------------------------


def test_pooled_and_map_on_dinov2(dinov2: nn.Module, x: torch.Tensor) -> None:
    hidden = _capture(dinov2, "encoder.layer.1", x)
    layout = find_layout(dinov2, hidden.shape[1], (32, 32))
    assert torch.equal(pooled_tokens(hidden, layout, "cls"), hidden[:, 0])
    assert torch.equal(pooled_tokens(hidden, layout, "auto"), hidden[:, 0])
    by_hand = torch.stack([torch.stack([hidden[b, t] for t in range(1, 17)]).sum(0) / 16 for b in range(2)])
    torch.testing.assert_close(pooled_tokens(hidden, layout, "mean"), by_hand)
    m = patch_map(hidden, layout)
    assert m.shape == (2, 32, 16) and m.is_contiguous()
    assert torch.equal(m, hidden[:, 1:].transpose(1, 2))


def test_registers_are_excluded(dinov2_reg: nn.Module, x: torch.Tensor) -> None:
    hidden = _capture(dinov2_reg, "encoder.layer.1", x)
    layout = find_layout(dinov2_reg, hidden.shape[1], (32, 32))
    mean = pooled_tokens(hidden, layout, "mean")
    torch.testing.assert_close(mean, hidden[:, 5:].mean(1))
    assert not torch.allclose(mean, hidden[:, 1:].mean(1))  # the registers would shift it
    assert torch.equal(pooled_tokens(hidden, layout, "cls"), hidden[:, 0])
    m = patch_map(hidden, layout)
    assert m.shape == (2, 32, 16) and torch.equal(m, hidden[:, 5:].transpose(1, 2))


def test_cls_pooling_matches_hugging_face_pooler(dinov2: nn.Module, x: torch.Tensor) -> None:
    final = _capture(dinov2, "layernorm", x)
    with torch.no_grad():
        reference = dinov2(x).pooler_output
    layout = find_layout(dinov2, final.shape[1], (32, 32))
    torch.testing.assert_close(pooled_tokens(final, layout, "cls"), reference)


def test_no_cls_token(x: torch.Tensor) -> None:
    model = _monai_vit(False)
    hidden = _capture(model, "blocks.1", x)
    layout = find_layout(model, hidden.shape[1], (32, 32))
    with pytest.raises(ValueError, match="no CLS token; use pooling mean"):
        pooled_tokens(hidden, layout, "cls")
    torch.testing.assert_close(pooled_tokens(hidden, layout, "auto"), hidden.mean(1))  # auto: the patch mean
    assert torch.equal(patch_map(hidden, layout), hidden.transpose(1, 2))


def test_bad_pooling_and_shapes() -> None:
    layout = TokenLayout(prefix=1, cls=True, registers=0, source="test")
    with pytest.raises(ValueError, match="unknown token pooling"):
        pooled_tokens(torch.zeros(1, 5, 4), layout, "max")
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        patch_map(torch.zeros(1, 4, 2, 2), layout)
    with pytest.raises(ValueError, match="prefix"):
        pooled_tokens(torch.zeros(1, 1, 4), layout, "mean")  # no patch token left


# ---------------------------------------------------------------------------------------------
# Inference from the token count; configured layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_tokens", "size", "prefix"), [
    (197, (224, 224), 1),       # ViT-B/16: CLS + 14×14
    (201, (224, 224), 5),       # DINOv2 with 4 registers
    (196, (224, 224), 0),       # no CLS (global average pooling)
    (17, (32, 32), 1),          # not 8 + 3×3: a patch size of 32/3 does not exist
    (1 + 4 * 4 * 4, (32, 32, 32), 1),  # 3-D: CLS + 4×4×4 patches of 8³
    (1 + 8 * 4, (64, 32), 1),   # non-square input, square 8² patches
])
def test_inferred_from_token_count(n_tokens: int, size: tuple[int, ...], prefix: int) -> None:
    layout = find_layout(object(), n_tokens, size)  # a plain callable: no parameters to read
    assert (layout.prefix, layout.cls, layout.registers) == (prefix, prefix >= 1, max(prefix - 1, 0))
    assert layout.source.startswith("inferred from the token count")


def test_inferred_source_text() -> None:
    expected = "inferred from the token count (T = 1 + 14×14 at 224²)"
    assert find_layout(nn.Linear(2, 2), 197, (224, 224)).source == expected
    assert find_layout(None, 65, (32, 32, 32)).source == "inferred from the token count (T = 1 + 4×4×4 at 32³)"


@pytest.mark.parametrize(("n_tokens", "size"), [(197, None), (3 + 1000, (224, 224)), (50, (37, 41))])
def test_nothing_fits(n_tokens: int, size: tuple[int, ...] | None) -> None:
    with pytest.raises(ValueError, match=r"could not be found.*model\.tokens\.prefix"):
        find_layout(nn.Linear(2, 2), n_tokens, size)


def test_configured() -> None:
    layout = find_layout(object(), 197, (224, 224), prefix=3)
    assert (layout.prefix, layout.cls, layout.registers, layout.source) == (3, True, 2, "configured (model.tokens)")
    layout = find_layout(object(), 197, prefix=2, cls=False)
    assert (layout.prefix, layout.cls, layout.registers) == (2, False, 2)
    assert find_layout(object(), 196, prefix=0).cls is False


def test_configured_overrides_the_model(dinov2_reg: nn.Module) -> None:
    layout = find_layout(dinov2_reg, 21, (32, 32), prefix=1)
    assert (layout.prefix, layout.cls, layout.source) == (1, True, "configured (model.tokens)")


@pytest.mark.parametrize("prefix", [197, 500, -1])
def test_configured_out_of_range(prefix: int) -> None:
    with pytest.raises(ValueError) as info:
        find_layout(object(), 197, (224, 224), prefix=prefix)
    assert str(prefix) in str(info.value) and "197" in str(info.value)


def test_configured_cls_without_prefix_token() -> None:
    with pytest.raises(ValueError, match="CLS"):
        find_layout(object(), 196, prefix=0, cls=True)


def test_cls_override_keeps_the_found_prefix(dinov2_reg: nn.Module) -> None:
    layout = find_layout(dinov2_reg, 21, (32, 32), cls=False)
    assert (layout.prefix, layout.cls, layout.registers) == (5, False, 5)


# ---------------------------------------------------------------------------------------------
# is_token_sequence
# ---------------------------------------------------------------------------------------------


def test_is_token_sequence(dinov2: nn.Module, x: torch.Tensor) -> None:
    assert is_token_sequence(_capture(dinov2, "encoder.layer.1", x), 2)
    assert is_token_sequence(torch.zeros(2, 65, 16), 3)
    assert not is_token_sequence(torch.zeros(2, 8, 4, 4), 2)  # a CNN feature map
    assert not is_token_sequence(torch.zeros(2, 8, 4, 4, 4), 3)
    assert not is_token_sequence(torch.zeros(2, 8), 2)  # already pooled
    assert not is_token_sequence(torch.zeros(2, 8, 100), 1)  # a 1-D CNN's [B, C, L] map
