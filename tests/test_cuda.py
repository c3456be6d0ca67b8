"""End to end on a CUDA GPU, Inductor generating GPU code, against the eager references on the same GPU:
ViT merging and pruning with the Triton kernels implementing the ops, LLaVA generate() with
language-model pruning, KV eviction into a StaticCache. Skipped without a GPU (CI has none); run with
TRITON_INTERPRET=0 python -m pytest tests/test_cuda.py tests/runtime/kernels on a GPU machine."""

import warnings

import pytest
import torch

import tokensparse
from tests.devices import KERNEL_DEVICE
from tests.models import build, build_llama, build_llava
from tokensparse import Config, FastV, SnapKV, StreamingLLM, ToMe, TokensparseWarning, TopK, VisionZip
from tokensparse.reference import reference_forward
from tokensparse.reference.kv import evicted_generate
from tokensparse.reference.llava import masked_generate

pytestmark = pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="needs a CUDA GPU and TRITON_INTERPRET=0")

# The pinned torch is 2.14.1; a GPU machine may hold an older one. Before 2.14, Inductor cannot lower a slice
# of an unbacked length (generate()'s logits_to_keep after a token cut: KeyError 'unbacked_bindings'), and
# transformers keeps the causal mask of an unpadded batch under torch.compile (pytorch#176499), which the KV
# pass refuses as possible padding. Both pass on the CPU with 2.14.1.
TORCH_2_14 = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)
NEEDS_TORCH_2_14 = pytest.mark.skipif(not TORCH_2_14, reason=f"needs torch >= 2.14 (this is {torch.__version__})")

GENERATE = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)


@pytest.fixture(scope="module", autouse=True)
def triton_kernels():
    """The Triton kernels implement tokensparse::tome_merge and topk_prune on CUDA tensors."""
    import tokensparse.runtime.triton_ops  # noqa: F401


def _on_gpu(inputs: dict) -> dict:
    return {name: value.cuda() for name, value in inputs.items()}


def _no_warnings(call):
    """call(), failing on any TokensparseWarning (a rewrite that did not happen)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        return call()


def _assert_same_generation(out, want):
    assert torch.equal(out.sequences, want.sequences)
    for got, expected in zip(out.logits, want.logits):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["timm_vit", "hf_clip"])
@pytest.mark.parametrize("options, policy", [({"policy": "tome", "r": 4}, ToMe(r=4)),
                                             ({"policy": "topk", "layers": (1, 2), "keep": 0.5},
                                              TopK(layers=(1, 2), keep=0.5))], ids=["tome", "topk"])
def test_vision_transformer_compiled_for_the_gpu_equals_the_reference(name, options, policy):
    model, pixels = build(name, depth=3, width=64, heads=2, patch=4, batch=3)
    model, pixels = model.cuda(), pixels.cuda()
    compiled = torch.compile(model, backend="tokensparse", options=options)
    got = _no_warnings(lambda: compiled(pixels))
    want = reference_forward(model, pixels, policy)
    with torch.no_grad():
        plain = model(pixels)
    if name == "timm_vit":
        got, plain = {"logits": got}, {"logits": plain}
    else:
        got = {"last_hidden_state": got.last_hidden_state, "pooler_output": got.pooler_output}
        plain = {"last_hidden_state": plain.last_hidden_state}
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-4)
    key = next(iter(plain))
    assert got[key].shape != plain[key].shape or not torch.allclose(got[key], plain[key])    # it did prune


@pytest.mark.parametrize("options, policy", [({"policy": "tome", "r": 4}, ToMe(r=4)),
                                             ({"policy": "topk", "layers": (1, 2), "keep": 0.5},
                                              TopK(layers=(1, 2), keep=0.5))], ids=["tome", "topk"])
def test_cuda_graphs_replay_the_reference_on_fresh_inputs(options, policy):
    """cudagraphs=True: recorded once, replayed on new pixels (copied into the graph's static input)."""
    model, _ = build("timm_vit", depth=3, width=64, heads=2, patch=4, batch=3)
    model = model.cuda()
    compiled = torch.compile(model, backend="tokensparse", options={**options, "cudagraphs": True})
    for seed in range(4):
        pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).cuda()
        # a replay's output is overwritten by the next
        got = _no_warnings(lambda pixels=pixels: compiled(pixels)).clone()
        torch.testing.assert_close(got, reference_forward(model, pixels, policy)["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("inductor", [False, pytest.param(True, marks=NEEDS_TORCH_2_14)], ids=["eager", "inductor"])
@pytest.mark.parametrize("policy, lengths", [(FastV(layer=2, keep=0.25), [43, 43, 31, 31]),
                                             (VisionZip(dominant=6, contextual=2), [35] * 4)], ids=["fastv", "visionzip"])
def test_llava_generate_on_the_gpu_equals_the_masking_oracle(policy, lengths, inductor):
    """3 + 16 image + 5 prompt tokens, 19 decoded into the cache: FastV keeps 4 image tokens from layer 2,
    VisionZip 6 + 2 from layer 0."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), batch=2)
    model, inputs = model.cuda(), _on_gpu(inputs)
    fast = tokensparse.compile(model, Config(llm=policy, inductor=inductor))
    out = _no_warnings(lambda: fast.generate(**inputs, **GENERATE))
    want = masked_generate(model, inputs, policy, **GENERATE)
    _assert_same_generation(out, want)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == lengths


@pytest.mark.parametrize("policy, static", [(SnapKV(budget=16, window=4), True),
                                            pytest.param(StreamingLLM(sinks=2, window=10), False, marks=NEEDS_TORCH_2_14)],
                         ids=["snapkv_static_cache", "streamingllm_dynamic_cache"])
def test_kv_eviction_on_the_gpu_equals_the_evicting_reference(policy, static):
    from transformers import StaticCache

    model, inputs = build_llama(layers=2, prompt=40, batch=2)
    model, inputs = model.cuda(), _on_gpu(inputs)
    fast = tokensparse.compile(model, Config(kv=policy))
    cache = StaticCache(config=model.config, max_cache_len=64) if static else None
    out = _no_warnings(lambda: fast.generate(**inputs, **GENERATE, past_key_values=cache))
    reference, log = evicted_generate(model, inputs, policy, **GENERATE)
    _assert_same_generation(out, reference)
    kept = [int(alive[0, 0].sum()) for alive in log.alive.values()]
    if static:
        assert [int(layer.cumulative_length) for layer in cache.layers] == kept == [16 + 19] * 2
    else:
        assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == kept == [12, 12]
