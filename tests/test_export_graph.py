"""The same passes on a torch.export graph (aten.scaled_dot_product_attention, aten.view, ...)."""

import pytest
import torch

from tests.models import build
from tokensparse import Config, ToMe, TopK
from tokensparse.reference import reference_forward
from tokensparse.fx.rewrite import rewrite_graph


@pytest.mark.parametrize("family", ["timm_vit", "hf_clip", "hf_vit", "hf_dinov2"])
@pytest.mark.parametrize("policy", [ToMe(r=3), TopK(layers=(1,), keep=0.5, fuse=True)], ids=["tome", "topk"])
def test_export_graph_rewrite_matches_reference(family, policy):
    model, pixels = build(family, depth=3, batch=2)
    gm = torch.export.export(model, (pixels,)).module()
    assert any("aten.scaled_dot_product_attention" in str(node.target) for node in gm.graph.nodes)
    result = rewrite_graph(gm, [pixels], Config(vision=policy))
    assert result.changed, result.reason
    with torch.no_grad():
        got = result.gm(pixels)
    want = reference_forward(model, pixels, policy)
    got = got if isinstance(got, torch.Tensor) else got["last_hidden_state"]
    key = "logits" if family.startswith("timm") else "last_hidden_state"
    torch.testing.assert_close(got, want[key], atol=2e-5, rtol=1e-4)
