"""Attention sites, blocks and prefix tokens found in the graphs of every family; failures carry reasons."""

import pytest
import torch

from tests.models import PREFIX_TOKENS, VISION_FAMILIES, build
from tokensparse.capture import capture_graphs
from tokensparse.patterns import MatchFailure, match_vision_encoder

BLOCK_LISTS = {"timm": "blocks", "hf_vit": "layers", "hf_clip": "encoder.layers", "hf_siglip": "encoder.layers",
               "hf_dinov2": "encoder.layer"}


def _graph(family, **kwargs):
    model, pixels = build(family, **kwargs)
    (gm, _), = capture_graphs(model, pixels)
    return gm


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_blocks_sites_and_prefix(family):
    match = match_vision_encoder(_graph(family, depth=3))
    assert match.depth == 3
    assert match.prefix_tokens == PREFIX_TOKENS[family]
    list_path = BLOCK_LISTS["timm" if family.startswith("timm") else family]
    assert [block.path for block in match.blocks] == [f"{list_path}.{i}" for i in range(3)]
    for block in match.blocks:
        assert block.site.kind == "sdpa" and block.site.module_path.startswith(block.path)
        assert block.tokens == 64 + PREFIX_TOKENS[family]       # 32x32 image, patch 4
    assert match.grid == (8, 8)


def test_unfused_attention_is_matched():
    model, pixels = build("timm_vit", depth=2)
    for block in model.blocks:
        block.attn.fused_attn = False
    (gm, _), = capture_graphs(model, pixels)
    match = match_vision_encoder(gm)
    assert [block.site.kind for block in match.blocks] == ["unfused", "unfused"]
    assert match.blocks[0].site.scale == pytest.approx(model.blocks[0].attn.scale)


def test_hf_eager_attention_is_matched():
    model, pixels = build("hf_vit", depth=2, attn_implementation="eager")
    (gm, _), = capture_graphs(model, pixels)
    assert [block.site.kind for block in match_vision_encoder(gm).blocks] == ["unfused", "unfused"]


def test_prefix_override_and_range():
    gm = _graph("timm_vit")
    assert match_vision_encoder(gm, prefix_tokens=3).prefix_tokens == 3
    with pytest.raises(ValueError, match="prefix_tokens=65 is out of range"):
        match_vision_encoder(gm, prefix_tokens=65)


def test_attention_outside_a_block_list_is_reported():
    class Single(torch.nn.Module):
        def forward(self, x):
            q = x.unsqueeze(1)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q).squeeze(1)

    (gm, _), = capture_graphs(Single(), torch.randn(2, 5, 4))
    with pytest.raises(MatchFailure, match="not inside a repeated block"):
        match_vision_encoder(gm)
