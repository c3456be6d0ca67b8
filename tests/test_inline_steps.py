"""Policy steps inlined for Inductor (tokensparse/inline_steps.py): FastV's selection enters the compiled prefill
as its own PyTorch function, so no tokensparse op runs eagerly, and the prefill equals the eager masking oracle."""

import warnings

import pytest
import torch

import tokensparse
from tests.models import build_llava
from tokensparse import TokensparseWarning
from tokensparse.benchmark import eager_ops_per_forward
from tokensparse.reference.llava import masked_forward


def _compiled_prefill_equals_oracle(model, inputs, policy):
    """tokensparse.compile(model) with `policy`: its prefill (no TokensparseWarning) equals the masking oracle's
    last logits. Returns the compiled model and the prefill's inputs."""
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy))
    prefill = {**inputs, "logits_to_keep": 1}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        got = fast(**prefill).logits
    torch.testing.assert_close(got[:, -1], masked_forward(model, inputs, policy)["logits"][:, -1], atol=1e-5,
                               rtol=1e-4)
    return fast, prefill


def _profiled_ops(fast, prefill) -> list[str]:
    with torch.inference_mode(), torch.profiler.profile() as profile:       # compiled: the first call compiled
        fast(**prefill)
    return [event.name for event in profile.events()]


def _runs_no_tokensparse_op(fast, model, prefill, extra_ops: int, host_reads: int):
    """The compiled prefill dispatches no tokensparse op, reads `host_reads` scalars to the host and dispatches at
    most `extra_ops` eager ops more than the unpruned model compiled by Inductor."""
    names = _profiled_ops(fast, prefill)
    assert not [name for name in names if name.startswith("tokensparse::")]
    assert names.count("aten::_local_scalar_dense") == host_reads
    plain = torch.compile(model.forward)
    assert eager_ops_per_forward(lambda: fast(**prefill), calls=1) <= eager_ops_per_forward(
        lambda: plain(**prefill), calls=1) + extra_ops


def test_fastv_selection_runs_inside_the_compiled_prefill():
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), batch=2)
    fast, prefill = _compiled_prefill_equals_oracle(model, inputs, tokensparse.FastV(layer=2, keep=0.25))
    # unpruned + 4: the selection's two sorts (Inductor's CPU fallbacks) and the forward's check of the image-token
    # counts (eq, sum, and one tolist(), which the profiler does not list). No host read in the graph: the kept
    # length follows from the image features' shape
    _runs_no_tokensparse_op(fast, model, prefill, extra_ops=4, host_reads=0)


def test_pyramiddrop_stages_after_an_inlined_selection_equal_the_oracle():
    """A later stage scores the last row of a sequence whose length an inlined selection chose."""
    model, inputs = build_llava(text_layers=6, image_tokens=16, prompt=(3, 5), batch=2)
    fast, prefill = _compiled_prefill_equals_oracle(model, inputs, tokensparse.PyramidDrop(layers=(2, 4), ratio=0.5))
    # each stage's kept length follows from the one before it (16 -> 8 -> 4 image tokens): no host read
    assert "aten::_local_scalar_dense" not in _profiled_ops(fast, prefill)


def test_unequal_image_counts_fail_before_the_compiled_prefill():
    """17 and 15 image tokens: the kept positions would not fill one dense [B, S'], so the prefill fails with an
    error that names the counts rather than mixing the samples' rows (or failing an in-graph check whose message
    could only be a symbolic expression)."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), batch=2)
    ids = inputs["input_ids"].clone()
    ids[0, 2], ids[1, 3] = model.config.image_token_index, 5
    fast = tokensparse.compile(model, tokensparse.Config(llm=tokensparse.FastV(layer=2, keep=0.25)))
    with torch.inference_mode(), pytest.raises(ValueError, match=r"different numbers of image tokens \(\[17, 15\]\)"):
        fast(**{**inputs, "input_ids": ids})


def test_fastv_under_a_dynamic_batch_equals_the_oracle():
    """A second batch size recompiles with a symbolic batch: the kept length is read from the first sample."""
    policy = tokensparse.FastV(layer=2, keep=0.25)
    model, _ = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), batch=2)
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy))
    for batch in (2, 3):
        _, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), batch=batch)
        with torch.inference_mode():
            got = fast(**inputs, logits_to_keep=1).logits
        torch.testing.assert_close(got[:, -1], masked_forward(model, inputs, policy)["logits"][:, -1], atol=1e-5,
                                   rtol=1e-4)


def test_visionzip_selection_runs_inside_the_compiled_prefill():
    """VisionZip's mapping of kept encoder rows to sequence positions (tokensparse::keep_image_rows) is inlined
    too: a static kept length, no tokensparse op in the prefill, which equals the masking oracle."""
    model, inputs = build_llava(vision_layers=3, text_layers=4, feature_layer=-2, image_tokens=16, prompt=(3, 5),
                                batch=2)
    fast, prefill = _compiled_prefill_equals_oracle(model, inputs, tokensparse.VisionZip(dominant=5, contextual=2))
    # measured: unpruned + 11 (the op ran 12 aten ops eagerly, unpruned + 20), two of them the forward's check of
    # the image-token counts before the prefill (eq, sum): no host read in the graph, where the check was one
    _runs_no_tokensparse_op(fast, model, prefill, extra_ops=11, host_reads=0)


def test_visionzip_with_a_wrong_image_count_fails_in_the_compiled_prefill():
    """17 and 15 image tokens for images of 16 features (32 in all, as the model checks): the inlined step's
    runtime check fails rather than mapping features to the wrong positions, and the error names the counts."""
    model, inputs = build_llava(vision_layers=3, text_layers=4, feature_layer=-2, image_tokens=16, prompt=(3, 5),
                                batch=2)
    ids = inputs["input_ids"].clone()
    ids[0, 2], ids[1, 3] = model.config.image_token_index, 5
    fast = tokensparse.compile(model, tokensparse.Config(llm=tokensparse.VisionZip(dominant=5, contextual=2)))
    with torch.inference_mode(), pytest.raises(ValueError, match=r"different numbers of image tokens \(\[17, 15\]\)"):
        fast(**{**inputs, "input_ids": ids})
