"""End to end under Inductor (20-40 s per compile on 2 cores): the compiled pruned model against the
eager reference."""

import warnings

import pytest
import torch

import tokensparse
from tests.conftest import main_outputs
from tests.models import build
from tokensparse import TokensparseWarning
from tokensparse.reference import reference_forward

pytestmark = pytest.mark.inductor


@pytest.mark.parametrize("family, policy", [
    ("timm_deit_distilled", tokensparse.ToMe(r=4)),
    ("hf_clip", tokensparse.TopK(layers=(1, 2), keep=0.5, fuse=True)),
    ("hf_siglip", tokensparse.ToMe(r=5, schedule="decreasing")),
], ids=["deit_tome", "clip_topk", "siglip_tome"])
def test_inductor_matches_reference(family, policy):
    model, pixels = build(family, depth=3, width=64, heads=4, batch=3)
    compiled = tokensparse.compile(model, tokensparse.Config(vision=policy))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        with torch.no_grad():
            got = main_outputs(compiled(pixels))
    want = reference_forward(model, pixels, policy)
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], atol=1e-4, rtol=1e-4)


def test_cudagraphs_compiles_static_token_counts_in_one_graph():
    """cudagraphs=True (CUDA graphs on a GPU; here on the CPU the same static-count whole graph without
    them): one Inductor graph whose token counts are concrete, equal to the reference on fresh inputs too."""
    from torch._inductor import compile_fx as inductor

    model, pixels = build("timm_vit", depth=3, width=32, heads=2, batch=2)
    policy = tokensparse.ToMe(r=3)
    compiled = torch.compile(model, backend="tokensparse", options={"policy": "tome", "r": 3, "cudagraphs": True})
    graphs = []
    original = inductor.compile_fx
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(), torch.no_grad():
        patch.setattr(inductor, "compile_fx", lambda gm, inputs, **kw: graphs.append(gm) or original(gm, inputs, **kw))
        warnings.simplefilter("error", TokensparseWarning)
        for seed in (0, 1):
            fresh = pixels if seed == 0 else torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(compiled(fresh), reference_forward(model, fresh, policy)["logits"],
                                       atol=1e-4, rtol=1e-4)
    assert len({id(gm) for gm in graphs}) == 1        # compile_fx calls itself once to apply config_patches
    from tokensparse.inline_steps import STEPS

    # The merge steps enter Inductor as ToMe's own PyTorch function (no opaque op), at concrete token counts.
    assert not [node for node in graphs[0].graph.nodes if node.target in STEPS]
    outputs = [value for node in graphs[0].graph.nodes if node.target in STEPS.values()
               for value in torch.utils._pytree.tree_leaves(node.meta["val"])]
    assert len(outputs) == 2 * 3 and all(isinstance(size, int) for value in outputs for size in value.shape)


def test_batch_changes_recompile_once_with_a_dynamic_batch():
    """Serving with varying batches: dynamo recompiles once with a symbolic batch, regions included."""
    model, _ = build("timm_vit", depth=3, width=32, heads=2, batch=2)
    policy = tokensparse.ToMe(r=3)
    compiled = tokensparse.compile(model, tokensparse.Config(vision=policy))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        for batch in (2, 3, 5):
            pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                got = compiled(pixels)
            torch.testing.assert_close(got, reference_forward(model, pixels, policy)["logits"], atol=1e-4, rtol=1e-4)


def test_fastv_generate_under_inductor_equals_the_masking_oracle():
    """LLaVA (CLIP tower, Llama GQA): the pruned prefill graph and the decode graphs compiled by Inductor."""
    from tests.models import build_llava
    from tokensparse.reference.llava import masked_forward, masked_generate

    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5))
    policy = tokensparse.FastV(layer=2, keep=0.25)
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy))
    settings = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        prefill = fast(**inputs).logits
        out = fast.generate(**inputs, **settings)
    want = masked_forward(model, inputs, policy)
    torch.testing.assert_close(prefill[:, -1], want["logits"][:, -1], atol=1e-5, rtol=1e-4)
    assert torch.equal(out, masked_generate(model, inputs, policy, **settings))


def test_h2o_on_a_padded_batch_under_inductor_equals_the_evicting_reference():
    """Llama, a left-padded batch, H2O evicting at every decode step: the prefill and decode graphs compiled
    by Inductor (the accumulated scores, the padding read from each step's cut mask)."""
    from tests.generation import generate_without_warnings
    from tests.models import build_llama
    from tokensparse.reference.kv import evicted_generate

    model, inputs = build_llama(layers=2, prompt=40, batch=2)
    inputs["attention_mask"][0, :7] = 0
    policy = tokensparse.H2O(heavy=8, recent=6)
    settings = dict(max_new_tokens=20, do_sample=False, return_dict_in_generate=True, output_logits=True)
    out = generate_without_warnings(tokensparse.compile(model, tokensparse.Config(kv=policy)), **inputs, **settings)
    reference, _ = evicted_generate(model, inputs, policy, **settings)
    assert torch.equal(out.sequences, reference.sequences)
    for got, want in zip(out.logits, reference.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [14, 14]


def test_h2o_past_a_sliding_window_under_inductor_equals_the_evicting_reference():
    """Mistral with a window of 24 and prompts of 40, one padded by 20: the window over the PositionedCache's
    positions, in the attention mask and in H2O's column sums, compiled by Inductor."""
    from transformers import DynamicCache

    from tests.generation import generate_without_warnings
    from tests.models import build_llama
    from tokensparse.reference.kv import evicted_generate

    model, inputs = build_llama(layers=2, prompt=40, batch=2, family="mistral", sliding_window=24)
    inputs["attention_mask"][0, :20] = 0
    policy = tokensparse.H2O(heavy=8, recent=6)
    settings = dict(max_new_tokens=20, do_sample=False, return_dict_in_generate=True, output_logits=True)
    out = generate_without_warnings(tokensparse.compile(model, tokensparse.Config(kv=policy)), **inputs, **settings)
    reference, _ = evicted_generate(model, inputs, policy, past_key_values=DynamicCache(), **settings)
    assert torch.equal(out.sequences, reference.sequences)
    for got, want in zip(out.logits, reference.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [14, 14]


def test_tome_in_the_tower_then_fastv_under_inductor_equals_the_oracle():
    """ToMe in LLaVA's CLIP tower up to its feature layer, then FastV: the prefill graph (tower, source rows,
    both cuts) and the decode graphs compiled by Inductor equal the eager oracle."""
    from tests.models import build_llava
    from tokensparse.reference.llava import masked_generate

    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), vision_layers=3, feature_layer=-2)
    vision, llm = tokensparse.ToMe(r=3), tokensparse.FastV(layer=2, keep=0.5)
    fast = tokensparse.compile(model, tokensparse.Config(vision=vision, llm=llm))
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        out = fast.generate(**inputs, **settings)
    want = masked_generate(model, inputs, llm, vision=vision, **settings)
    assert torch.equal(out.sequences, want.sequences)
    for got, expected in zip(out.logits, want.logits):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [25, 25, 20, 20]


def test_tome_gradients_under_inductor_equal_the_reference():
    """A training step through the compiled regions: ToMe's merge inside Inductor's joint graph."""
    from tests.test_gradients import _parameter_gradients, assert_same_gradients

    model, pixels = build("timm_vit", depth=3, width=32, heads=2, batch=2)
    policy = tokensparse.ToMe(r=3)
    fast = torch.compile(model, backend="tokensparse", options={"policy": policy})
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        got = _parameter_gradients(model, lambda: fast(pixels).square().sum())
    want = _parameter_gradients(model, lambda: reference_forward(model, pixels, policy)["logits"].square().sum())
    assert_same_gradients(got, want)
