"""tokensparse.compile for Hugging Face generate(): pruned prefill, decoding from the pruned KV cache,
greedy tokens equal to the eager masking oracle's generate(), and the model passed in left unchanged."""

import warnings

import torch

import tokensparse
from tests.models import build_llava
from tokensparse import TokensparseWarning
from tokensparse.reference.llava import masked_generate


def test_generate_equals_the_masking_oracle_and_leaves_the_model_alone():
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5))
    forward = model.forward
    policy = tokensparse.FastV(layer=2, keep=0.25)
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy, inductor=False))
    settings = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        out = fast.generate(**inputs, **settings, return_dict_in_generate=True)
    want = masked_generate(model, inputs, policy, **settings)
    assert torch.equal(out.sequences, want)
    # Layers 2 and 3 hold 3 + 4 + 5 prompt tokens and the generated ones (the last has no KV yet).
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [43, 43, 31, 31]
    assert model.forward == forward and fast.forward != forward


def test_every_prompt_length_is_pruned_including_the_dynamic_graph():
    """The second prompt length recompiles with a symbolic length s: the layers' reshapes read s (a SymInt
    node, not a literal) and must follow the kept tokens; FastV then prunes every prompt length."""
    model, _ = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5))
    policy = tokensparse.FastV(layer=2, keep=0.25)
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy, inductor=False))
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    for prompt in ((3, 5), (4, 7), (6, 9)):
        _, inputs = build_llava(text_layers=4, image_tokens=16, prompt=prompt)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", TokensparseWarning)
            out = fast.generate(**inputs, **settings, return_dict_in_generate=True)
        assert torch.equal(out.sequences, masked_generate(model, inputs, policy, **settings))
        full = sum(prompt) + 16 + 7
        assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [full, full, full - 12, full - 12]
