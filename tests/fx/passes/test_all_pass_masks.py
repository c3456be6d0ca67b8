"""Masks that let every token through are dropped; any other mask is kept (and a rewrite that would
need it to follow the kept tokens refuses, with the reason)."""

import pytest
import torch
import torch.nn.functional as F

from tokensparse import Config, ToMe
from tokensparse.fx.passes.all_pass_masks import constant_value
from tokensparse.fx.patterns.graph import arg
from tokensparse.fx.rewrite import rewrite_graph


class Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.mlp = torch.nn.Linear(width, width)

    def forward(self, x, mask):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(x)


class Encoder(torch.nn.Module):
    """A ViT-like stack whose mask is built from arange, as Hugging Face does under torch.export."""

    def __init__(self, blocking: bool, width=16, tokens=17):
        super().__init__()
        self.blocking, self.tokens = blocking, tokens
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(3))

    def forward(self, x):
        mask = None
        if self.blocking is not None:
            keep = torch.arange(self.tokens) >= (1 if self.blocking else 0)
            mask = keep[None, None, None, :].expand(x.shape[0], 1, self.tokens, self.tokens)
        for block in self.blocks:
            x = block(x, mask)
        return x


def _export(blocking):
    torch.manual_seed(0)
    model = Encoder(blocking).eval()
    x = torch.randn(2, 17, 16)
    return model, x, torch.export.export(model, (x,)).module()


def test_all_true_mask_is_dropped_and_the_result_equals_the_unmasked_model():
    model, x, gm = _export(blocking=False)
    result = rewrite_graph(gm, [x], Config(vision=ToMe(r=2, prefix_tokens=1, proportional_attention=False)))
    assert result.changed, result.reason
    assert any(name == "drop_all_pass_masks" for name, _ in result.context.changes)
    sdpa = [n for n in result.gm.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert sdpa and all(arg(n, 3, "attn_mask") is None for n in sdpa)
    _, _, unmasked = _export(blocking=None)
    want = rewrite_graph(unmasked, [x], Config(vision=ToMe(r=2, prefix_tokens=1, proportional_attention=False)))
    with torch.no_grad():
        out = result.gm(x)
        torch.testing.assert_close(out, want.gm(x), rtol=0, atol=0)
    assert out.shape == (2, 17 - 3 * 2, 16)


def test_a_mask_that_blocks_a_token_is_kept_and_the_rewrite_refuses():
    _, x, gm = _export(blocking=True)
    with pytest.warns(UserWarning, match="unified with the 17 tokens|attention mask has 17 key columns"):
        result = rewrite_graph(gm, [x], Config(vision=ToMe(r=2, prefix_tokens=1)))
    assert not result.changed


def test_constant_value_needs_no_graph_input():
    graph = torch.fx.symbolic_trace(lambda x: x + torch.arange(3).float())
    nodes = {node.name: node for node in graph.graph.nodes}
    assert constant_value(graph, nodes["add"]) is None
    assert torch.equal(constant_value(graph, nodes["_tensor_constant0"]), torch.arange(3).float())
