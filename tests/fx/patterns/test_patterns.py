"""Attention sites, blocks and prefix tokens found in the graphs of every family; failures carry reasons."""

import pytest
import torch

from tests.models import PREFIX_TOKENS, VISION_FAMILIES, build
from tokensparse.capture import capture_graphs
from tokensparse.fx.patterns import match_vision_encoder
from tokensparse.pipeline import MatchFailure

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
    assert match_vision_encoder(gm, prefix_tokens=0).prefix_tokens == 0           # CLS may merge too
    with pytest.raises(ValueError, match=r"prefix_tokens=3 is more than the model's 1 prefix token\(s\) \(65 tokens "
                                         r"enter its first block, 64 of them patches\)"):
        match_vision_encoder(gm, prefix_tokens=3)
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


def test_windowed_attention_is_refused_by_its_name():
    import timm

    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1), embed_dim=16,
                             num_heads=(1, 1, 1, 1), num_classes=5, img_size=64, window_size=4).eval()
    (gm, _), = capture_graphs(swin, torch.randn(1, 3, 64, 64))
    with pytest.raises(MatchFailure, match=r"its tokens enter as a \[1, 16, 16, 16\] grid and attention runs over "
                                           r"windows of 16 tokens inside the block \(windowed attention, as in Swin\)"):
        match_vision_encoder(gm)


def test_blocks_compiled_one_at_a_time_name_the_graph_break():
    """A graph break in a block's forward makes dynamo compile each block's frame on its own: the reason says
    so instead of a bare 'no attention'."""
    model, pixels = build("timm_vit")
    for block in model.blocks:
        forward = block.forward
        block.forward = lambda x, forward=forward: forward(torch._dynamo.graph_break() or x)
    reasons = set()
    for gm, _ in capture_graphs(model, pixels):
        try:
            match_vision_encoder(gm)
        except MatchFailure as failure:
            reasons.add(failure.reason)
    assert any("as when a graph break makes dynamo compile the blocks one at a time" in reason for reason in reasons)
