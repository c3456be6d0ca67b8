"""Re-deriving token-count literals after a cut, including the ambiguous cases that must refuse."""

import pytest
import torch

from tokensparse.fx.passes.sizes import _rederive


@pytest.mark.parametrize("sizes, old_in, new_in, old_out, want", [
    # timm qkv: [B, N, 3C] -> [B, N, 3, H, d]
    ([2, 197, 3, 12, 64], (2, 197, 2304), (2, 150, 2304), (2, 197, 3, 12, 64), [2, 150, 3, 12, 64]),
    # HF view with -1: [B, N, C] -> [B, N, H, d]
    ([2, 17, -1, 16], (2, 17, 64), (2, 9, 64), (2, 17, 4, 16), [2, 9, -1, 16]),
    # attention output back to [B, N, C] from [B, N, H, d]
    ([2, 17, 64], (2, 17, 4, 16), (2, 9, 4, 16), (2, 17, 64), [2, 9, 64]),
    # hidden size equal to the token count: alignment tells them apart
    ([2, 64, 64], (2, 64, 4, 16), (2, 56, 4, 16), (2, 64, 64), [2, 56, 64]),
    # a flattened B*N axis
    ([394, 768], (2, 197, 768), (2, 150, 768), (394, 768), [300, 768]),
    # token axis after a transpose: mapped by value
    ([2, 4, 16, 17], (2, 4, 17, 16), (2, 4, 9, 16), (2, 4, 16, 17), [2, 4, 16, 9]),
])
def test_rederive(sizes, old_in, new_in, old_out, want):
    assert _rederive(sizes, old_in, new_in, old_out, preserve_numel=True) == want


def test_ambiguous_literal_refuses():
    # [B, H, N, d] -> [B, 8, 8, 8] with N = 8: three literals 8 and no aligned token dim to tell them apart.
    assert _rederive([2, 8, 8, 8], (2, 4, 8, 16), (2, 4, 6, 16), (2, 8, 8, 8), preserve_numel=True) is None
    # The same literal is the token count and an unchanged size.
    assert _rederive([8, 2, 8], (8, 8, 2), (8, 6, 2), (8, 2, 8), preserve_numel=True) is None


def test_grid_reshape_of_tokens_refuses():
    # [B, 196, C] -> [B, 14, 14, C] cannot follow 150 tokens.
    assert _rederive([2, 14, 14, 8], (2, 196, 8), (2, 150, 8), (2, 14, 14, 8), preserve_numel=True) is None


def test_rewrite_that_breaks_shapes_falls_back_with_reason():
    """A graph that reshapes the token axis into a 2-D grid after a cut cannot be re-derived."""
    import tokensparse
    from tokensparse.capture import capture_graphs
    from tokensparse.fx.rewrite import rewrite_graph

    class GridBlock(torch.nn.Module):
        """Attention, then a token mixer that views [B, N, C] as a [B, h, w, C] grid."""

        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(2, 16, 3, 2, 4).permute(2, 0, 3, 1, 4)
            x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 16, 8)
            return x + x.reshape(2, 4, 4, 8).flip(1).reshape(2, 16, 8)

    class GridMixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 8, 4, 4)
            self.blocks = torch.nn.Sequential(GridBlock(), GridBlock())

        def forward(self, x):
            return self.blocks(self.proj(x).flatten(2).transpose(1, 2))

    model = GridMixer().eval()
    (gm, example), = capture_graphs(model, torch.randn(2, 3, 16, 16))
    with pytest.warns(tokensparse.TokensparseWarning, match=r"blocks.0 lays the tokens out as a grid \(reshape_\d+: "
                                                            r"\[2, 16, 8\] -> \[2, 4, 4, 8\]\)"):
        result = rewrite_graph(gm, example, tokensparse.Config(vision=tokensparse.ToMe(r=2)))
    assert not result.changed and result.gm is gm


def test_a_flattened_token_axis_viewed_back_takes_the_symbolic_count():
    """An MoE layer's view(B, N, D) of its [B*N, D] tokens: after a cut to a symbolic count the literal N
    becomes -1; ambiguous literals are left to the refusal."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from tokensparse.fx.passes.sizes import _unflattened

    count = ShapeEnv().create_unbacked_symint()
    assert _unflattened([2, 12, 64], (24, 64), (2 * count, 64), 12) == [2, -1, 64]
    assert _unflattened([12, 12, 64], (144, 64), (12 * count, 64), 12) is None       # which 12 is the count?
    assert _unflattened([2, 12, 64], (24, 64), (2 * count, 64), None) is None


def test_a_token_axis_laid_out_as_a_grid_is_named():
    from tokensparse.fx.passes.sizes import _lays_out_a_grid

    assert _lays_out_a_grid((2, 32, 64), (2, 32, 52), (2, 32, 8, 8))          # Gemma3's pooling connector
    assert not _lays_out_a_grid((2, 64, 32), (2, 52, 32), (2, 64, 4, 8))      # heads split off the channels
