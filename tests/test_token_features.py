"""Token layers through the feature extractor: patch-token maps for spectral, CLS for vector detectors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from medaudit.config import TokensConfig
from medaudit.features import CLS_SUFFIX, feature_vector, make_extractor, pool
from medaudit.model import LoadedModel
from medaudit.plugins.ood.detectors import spectral_signature

C, GRID = 6, 3  # 6 channels, 3 × 3 patches


class Tokens(nn.Module):
    """A ViT-shaped toy: its ``block`` returns ``[B, 1 + 2 + 9, C]`` tokens (CLS, 2 registers, 9 patches)
    whose patch matrix is ``3·e₁f₁ᵀ + 1·e₂f₂ᵀ`` (singular values 3 and 1), scaled per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.full((1, 1, C), 5.0))
        self.register_tokens = nn.Parameter(torch.full((1, 2, C), -7.0))
        self.block = nn.Identity()
        self.head = nn.Linear(C, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        scale = x.flatten(1).mean(1)[:, None, None] + 1.0
        e1, e2 = torch.zeros(GRID * GRID), torch.zeros(GRID * GRID)
        e1[0], e2[4] = 1.0, 1.0
        f1, f2 = torch.zeros(C), torch.zeros(C)
        f1[1], f2[3] = 1.0, 1.0
        patches = (3 * torch.outer(e1, f1) + torch.outer(e2, f2))[None] * scale
        tokens = torch.cat([self.cls_token.expand(b, -1, -1) * scale, self.register_tokens.expand(b, -1, -1), patches], 1)
        tokens = self.block(tokens)
        return self.head(tokens[:, 0])


def _loaded(module: nn.Module, pooling: str = "auto") -> LoadedModel:
    model = LoadedModel(module, Path("toy.pt"), "state_dict", "0" * 64, 0, "float32", "toy")
    model.tokens = TokensConfig(pooling=pooling)
    return model


def test_spectral_signature_of_patch_tokens_has_the_known_answer() -> None:
    extract, warning = make_extractor(_loaded(Tokens().eval()), "block")
    assert warning is None
    x = torch.rand(2, 1, 12, 12)
    _, feats = extract(x)
    patch_map = feats["block"]
    assert patch_map.shape == (2, C, GRID * GRID)  # CLS and registers are not patches
    sig = spectral_signature(patch_map)
    # singular values 3 and 1 (times the sample's scale, which the normalisation removes), the rest 0
    expected = torch.tensor([math.log(0.75), math.log(0.25)] + [math.log(1e-12)] * (C - 2), dtype=sig.dtype)
    assert torch.allclose(sig, expected.expand_as(sig), atol=1e-6)
    layout = extract.token_layouts["block"]
    assert (layout.prefix, layout.cls, layout.registers) == (3, True, 2)


def test_vector_detectors_read_the_cls_token_or_the_patch_mean() -> None:
    x = torch.rand(2, 1, 12, 12)
    extract, _ = make_extractor(_loaded(Tokens().eval()), "block")
    _, feats = extract(x)
    scale = x.flatten(1).mean(1)[:, None] + 1.0
    assert torch.allclose(feature_vector(feats, "block", "auto"), 5.0 * scale.expand(2, C))
    assert torch.equal(feats["block" + CLS_SUFFIX], feature_vector(feats, "block", "cls"))
    mean = pool(feature_vector(feats, "block", "mean"))
    hand = torch.zeros(2, C)
    hand[:, 1], hand[:, 3] = 3 * scale[:, 0] / 9, scale[:, 0] / 9  # registers (-7) would pull it down
    assert torch.allclose(mean, hand, atol=1e-6)


def test_pooling_cls_without_a_cls_token_is_refused() -> None:
    class NoCls(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.block(torch.rand(x.shape[0], GRID * GRID, C))
            return tokens.mean(1)

    extract, _ = make_extractor(_loaded(NoCls().eval()), "block")
    _, feats = extract(torch.rand(2, 1, 12, 12))
    assert extract.token_layouts["block"].prefix == 0  # 9 tokens tile 12 × 12 in 4-pixel patches
    assert torch.equal(feature_vector(feats, "block", "auto"), feats["block"])  # no CLS: the patch map (pooled: mean)
    with pytest.raises(ValueError, match="has no CLS token"):
        feature_vector(feats, "block", "cls")
