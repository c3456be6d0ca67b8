"""to_onnx_generation: a LLaVA model as prefill.onnx (the policy built in, the pruned or evicted KV cache out) and
decode.onnx (per-layer caches of any lengths in and out). Greedy generation in ONNX Runtime equals generate()
with the policy's reference (masking oracle, evicting reference) on left-padded inputs other than the traced
ones (other prompt lengths too): every token and every step's logits."""

import onnx
import pytest
import torch
from transformers import DynamicCache

from tests.models import build_llama, build_llava
from tokensparse import H2O, AdaptiveKV, Config, KeyNorm, SnapKV, StreamingLLM, VisionBudget
from tokensparse.export.generation import to_onnx_generation
from tokensparse.export.onnx_generate import generate_onnx
from tokensparse.deploy.trt_check import check_tensorrt
from tokensparse.policies import FastV, PyramidDrop
from tokensparse.reference.kv import evicted_generate
from tokensparse.reference.llava import masked_generate

NEW_TOKENS = 12
GREEDY = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
FASTV = FastV(layer=2, keep=0.25)
SNAPKV = SnapKV(budget=10, window=4)


def _padded(inputs: dict, sample: int, pads: int) -> dict:
    mask = torch.ones_like(inputs["input_ids"])
    mask[sample, :pads] = 0
    return {**inputs, "attention_mask": mask}


@pytest.fixture(scope="module")
def llava():
    model, traced = build_llava(batch=2)
    return model, _padded(traced, 0, 2)


@pytest.fixture(scope="module")
def other_inputs():
    """Not the traced example: other ids and pixels, a longer prompt (31 tokens, traced 24), the other sample
    padded."""
    return _padded(build_llava(batch=2, seed=7, prompt=(6, 9))[1], 1, 3)


@pytest.fixture(scope="module")
def fastv_pair(llava, tmp_path_factory):
    model, traced = llava
    return to_onnx_generation(model, traced, Config(llm=FASTV), str(tmp_path_factory.mktemp("fastv")))


@pytest.fixture(scope="module")
def snapkv_pair(llava, tmp_path_factory):
    model, traced = llava
    return to_onnx_generation(model, traced, Config(kv=SNAPKV), str(tmp_path_factory.mktemp("snapkv")))


def _greedy(pair, inputs: dict):
    return generate_onnx(pair.directory, {name: value.numpy() for name, value in inputs.items()}, NEW_TOKENS)


def _assert_same_generation(got, want):
    assert torch.equal(got.tokens, want.sequences[:, -NEW_TOKENS:])
    torch.testing.assert_close(torch.stack(got.logits, 1), torch.stack(want.logits, 1), rtol=1e-4, atol=1e-5)


def test_fastv_generates_what_the_masking_oracle_generates(fastv_pair, llava, other_inputs):
    model, _ = llava
    assert fastv_pair.prefill.changed, fastv_pair.prefill.reason
    want = masked_generate(model, other_inputs, FASTV, **GREEDY)
    _assert_same_generation(_greedy(fastv_pair, other_inputs), want)


def test_fastv_caches_hold_what_each_layer_kept(fastv_pair, other_inputs):
    """Layers 0-1 hold the whole prompt, layers 2-3 the text and a quarter of the 16 image tokens; the decode
    graph takes one symbolic length per group of layers."""
    prompt = other_inputs["input_ids"].shape[1]
    assert fastv_pair.length_groups == [[0, 1], [2, 3]]
    assert _greedy(fastv_pair, other_inputs).cache_lengths == [prompt + NEW_TOKENS - 1] * 2 + [
        prompt - 12 + NEW_TOKENS - 1] * 2
    decode = onnx.load(fastv_pair.decode.path).graph
    lengths = {value.name: value.type.tensor_type.shape.dim[2].dim_param for value in decode.input
               if value.name.startswith("past_key_values.")}
    assert lengths["past_key_values.0.key"] == lengths["past_key_values.1.value"] != lengths["past_key_values.2.key"]
    assert lengths["past_key_values.2.key"] == lengths["past_key_values.3.value"]
    assert fastv_pair.prefill.input_names == ["input_ids", "attention_mask", "pixel_values"]
    assert fastv_pair.decode.output_names[:3] == ["logits", "present.0.key", "present.0.value"]
    assert fastv_pair.prompt_lengths == (2, 1 << 20)
    for path in (fastv_pair.prefill.path, fastv_pair.decode.path):
        assert {node.domain for node in onnx.load(path).graph.node} <= {"", "ai.onnx"}
        assert check_tensorrt(path).ok


def test_snapkv_generates_what_the_evicting_reference_generates(snapkv_pair, llava, other_inputs):
    model, _ = llava
    assert snapkv_pair.prefill.changed, snapkv_pair.prefill.reason
    want, _ = evicted_generate(model, other_inputs, SNAPKV, **GREEDY)
    got = _greedy(snapkv_pair, other_inputs)
    _assert_same_generation(got, want)
    assert got.cache_lengths == [SNAPKV.budget + NEW_TOKENS - 1] * 4


@pytest.mark.parametrize("policy", [StreamingLLM(sinks=2, window=8), H2O(heavy=4, recent=6)],
                         ids=["streamingllm", "h2o"])
def test_decode_time_eviction(policy, llava, other_inputs, tmp_path):
    """Eviction in the prefill and after every decode step's attention (H2O: the step's attention row added to
    each position's score, carried as present.{i}.scores): the cache stays at 10 positions, and the decode graph
    takes and gives caches of that fixed length."""
    model, traced = llava
    pair = to_onnx_generation(model, traced, Config(kv=policy), str(tmp_path))
    assert pair.prefill.changed, pair.prefill.reason
    assert pair.prompt_lengths == (11, 1 << 20)
    want, _ = evicted_generate(model, other_inputs, policy, **GREEDY)
    got = _greedy(pair, other_inputs)
    _assert_same_generation(got, want)
    assert got.cache_lengths == [10] * 4
    decode = onnx.load(pair.decode.path).graph
    assert {value.type.tensor_type.shape.dim[2].dim_value for value in decode.input
            if value.name.startswith("past_key_values.")} == {10}
    assert ("past_key_values.0.scores" in pair.decode.input_names) == isinstance(policy, H2O)


def test_vision_budget_generates_what_the_evicting_reference_generates(llava, other_inputs, tmp_path):
    """Its kept count depends on the image tokens (NonZero in ONNX); text=1.0 on the padded sample gives its spare
    text slots to image tokens, so its cache holds padding only where it holds every real position."""
    model, traced = llava
    policy = VisionBudget(vision=4, window=4)
    pair = to_onnx_generation(model, traced, Config(kv=policy), str(tmp_path))
    assert pair.prefill.changed, pair.prefill.reason
    want, _ = evicted_generate(model, other_inputs, policy, **GREEDY)
    got = _greedy(pair, other_inputs)
    _assert_same_generation(got, want)
    prompt = other_inputs["input_ids"].shape[1]
    assert got.cache_lengths == [prompt - 16 + 4 + NEW_TOKENS - 1] * 4          # 4 of 16 image tokens, all text


def test_an_unpadded_batch_runs_the_same_graphs(fastv_pair, llava):
    model, _ = llava
    inputs = build_llava(batch=2, seed=11, prompt=(2, 3))[1]
    want = masked_generate(model, inputs, FASTV, **GREEDY)
    _assert_same_generation(_greedy(fastv_pair, inputs), want)


@pytest.mark.parametrize("sizes, vision, policy, groups", [
    ({}, None, PyramidDrop(layers=(1, 3), ratio=0.5, positions="compact"), [[0], [1, 2], [3]]),
], ids=["pyramiddrop_compact"])
def test_other_policies_generate_what_the_oracle_generates(sizes, vision, policy, groups, tmp_path):
    model, traced = build_llava(batch=2, **sizes)
    pair = to_onnx_generation(model, _padded(traced, 0, 2), Config(vision=vision, llm=policy), str(tmp_path))
    assert pair.prefill.changed, pair.prefill.reason
    assert pair.length_groups == groups
    inputs = _padded(build_llava(batch=2, seed=7, prompt=(6, 9), **sizes)[1], 1, 3)
    want = masked_generate(model, inputs, policy, vision=vision, **GREEDY)
    _assert_same_generation(_greedy(pair, inputs), want)


def test_a_text_model_with_a_dynamic_batch(tmp_path):
    """Llama with SnapKV: traced at batch 2 with 40 tokens, run at batch 3 with 57 (one sample padded). The
    budget's branch on the prompt length makes the prefill take prompts longer than the budget, and says so."""
    model, traced = build_llama(batch=2, prompt=40)
    traced["attention_mask"][0, :3] = 0
    policy = SnapKV(budget=16, window=4)
    pair = to_onnx_generation(model, traced, Config(kv=policy), str(tmp_path), dynamic=True)
    assert pair.prefill.changed, pair.prefill.reason
    assert pair.prompt_lengths == (17, 1 << 20)
    inputs = build_llama(batch=3, prompt=57, seed=5)[1]
    inputs["attention_mask"][2, :5] = 0
    want, _ = evicted_generate(model, inputs, policy, **GREEDY)
    got = _greedy(pair, inputs)
    _assert_same_generation(got, want)
    assert got.cache_lengths == [16 + NEW_TOKENS - 1] * 2
    short = build_llama(batch=1, prompt=12)[1]
    with pytest.raises(ValueError, match="a prompt of 12 tokens is out of range: prefill.onnx was exported for "
                                         "prompts of 17 to 1048576 tokens"):
        _greedy(pair, short)
    with pytest.raises(ValueError, match="the example prompt has 12 tokens, within kv=snapkv's budget of 16"):
        to_onnx_generation(model, short, Config(kv=policy), str(tmp_path / "short"))


def test_nothing_to_evict_equals_the_unmodified_models_generate(tmp_path):
    """budget=1.0: the pair holds the whole cache and generates what the model's own generate() does."""
    model, traced = build_llama(batch=2, prompt=40)
    pair = to_onnx_generation(model, traced, Config(kv=SnapKV(budget=1.0)), str(tmp_path), dynamic=True)
    assert not pair.prefill.changed
    inputs = build_llama(batch=3, prompt=50, seed=5)[1]
    inputs["attention_mask"][1, :4] = 0
    with torch.no_grad():
        want = model.generate(**inputs, **GREEDY)
    got = _greedy(pair, inputs)
    _assert_same_generation(got, want)
    assert got.cache_lengths == [50 + NEW_TOKENS - 1] * 2


def test_adaptive_kv_keeps_a_data_dependent_count_per_layer(tmp_path):
    """AdaptiveKV's count is the data's: each layer's cache length is its own symbol (NonZero in ONNX)."""
    model, traced = build_llama(batch=2, prompt=40)
    policy = AdaptiveKV(tau=0.5, window=4)
    pair = to_onnx_generation(model, traced, Config(kv=policy), str(tmp_path), dynamic=True)
    assert pair.prefill.changed, pair.prefill.reason
    assert pair.length_groups == [[0], [1]]
    inputs = build_llama(batch=3, prompt=50, seed=5)[1]
    inputs["attention_mask"][1, :4] = 0
    want, _ = evicted_generate(model, inputs, policy, **GREEDY)
    got = _greedy(pair, inputs)
    _assert_same_generation(got, want)
    assert all(length < 50 + NEW_TOKENS - 1 for length in got.cache_lengths)


@pytest.mark.parametrize("policy, kept", [(SnapKV(budget=18, window=4), [18 + NEW_TOKENS - 1] * 4),
                                          (KeyNorm(budget=18, window=2), [18 + NEW_TOKENS - 1] * 4),
                                          (VisionBudget(vision=2, window=4), [31 - 16 + 2 + NEW_TOKENS - 1] * 4),
                                          (StreamingLLM(sinks=2, window=20), [22] * 4),
                                          (H2O(heavy=10, recent=12), [22] * 4),
                                          (AdaptiveKV(tau=0.5, window=4), None)],
                         ids=["snapkv", "key_norm", "vision_budget", "streamingllm", "h2o", "adaptive"])
def test_fastv_with_a_kv_policy_generates_what_the_evicting_reference_in_the_oracle_generates(policy, kept, llava,
                                                                                              other_inputs, tmp_path):
    """Each layer also carries present.{i}.entered (the positions that entered it): the padded sample's pruned
    layers keep 2 of its 3 padding positions (16 real ones for 18 slots), the others none; the decode graph
    masks each layer's own padding from that count. VisionBudget keeps 2 image tokens: of the 16 in the layers
    before FastV's, of the 4 FastV kept after it (there, the image mask gathered by FastV's kept positions).
    StreamingLLM and H2O evict to 22 positions after every step: the 31-token prompt's layers before FastV's
    from the prefill on, the 19 positions FastV kept after the fourth step (their decode graph takes and gives
    caches of a symbolic length, at most 22). AdaptiveKV keeps a data-dependent count per layer (each its own
    symbol). Every layer holds what the reference keeps alive."""
    from tokensparse.reference.llava import _applied

    model, traced = llava
    pair = to_onnx_generation(model, traced, Config(llm=FASTV, kv=policy), str(tmp_path))
    assert pair.prefill.changed, pair.prefill.reason
    with torch.no_grad(), _applied(model, other_inputs, FASTV):
        want, log = evicted_generate(model, other_inputs, policy, **GREEDY)
    got = _greedy(pair, other_inputs)
    _assert_same_generation(got, want)
    assert got.cache_lengths == [int(log.alive[layer][0, 0].sum()) for layer in range(4)]
    assert kept is None or got.cache_lengths == kept
    assert pair.decode.input_names[2:4] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert "past_key_values.0.entered" in pair.decode.input_names
    assert "present.3.entered" in pair.prefill.output_names


def test_a_model_without_generate_is_refused(tmp_path):
    from tests.models import build

    model, _ = build("timm_vit")
    with pytest.raises(TypeError, match="has no generate"):
        to_onnx_generation(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)}, None, str(tmp_path / "out"))


@pytest.mark.parametrize("policy", [SnapKV(budget=16, window=4), H2O(heavy=8, recent=8),
                                    StreamingLLM(sinks=2, window=10)], ids=["snapkv", "h2o", "streamingllm"])
def test_a_sliding_window_model_past_its_window(policy, tmp_path):
    """Mistral with a window of 24, traced with prompts of 40, run with prompts of 44 (one sample padded by 22)
    and 12 new tokens: the graphs carry each layer's positions, by which its attention sees the window (H2O's
    scores too), and each layer keeps the last 23 of its entries. Equals the evicting reference with a full
    cache: tokens, logits, and each layer's cache length."""
    model, traced = build_llama(batch=2, prompt=40, family="mistral", sliding_window=24)
    model.generation_config.eos_token_id = None     # min_new_tokens would mask token 2, which ONNX's argmax may pick
    pair = to_onnx_generation(model, traced, Config(kv=policy), str(tmp_path), dynamic=True)
    assert pair.prefill.changed, pair.prefill.reason
    assert pair.max_positions is None and "past_key_values.1.positions" in pair.decode.input_names
    inputs = build_llama(batch=3, prompt=44, seed=5, family="mistral")[1]
    inputs["attention_mask"][1, :22] = 0
    want, log = evicted_generate(model, inputs, policy, past_key_values=DynamicCache(), **GREEDY)
    got = _greedy(pair, inputs)
    _assert_same_generation(got, want)
    assert got.cache_lengths == [int(log.alive[layer][0, 0].sum()) for layer in range(2)]
    assert max(got.cache_lengths) <= 23


def test_a_sliding_window_model_without_a_kv_policy_within_its_window(tmp_path):
    """Without positions the graphs hold every position in full layers, so they are the model while every position
    fits the window: prefill.onnx carries the window, and generate_onnx refuses a generation past it before it
    runs."""
    model, traced = build_llama(batch=2, prompt=40, family="mistral", sliding_window=64)
    model.generation_config.eos_token_id = None
    pair = to_onnx_generation(model, traced, Config(), str(tmp_path), dynamic=True)
    assert pair.max_positions == 64
    metadata = {prop.key: prop.value for prop in onnx.load(pair.prefill.path).metadata_props}
    assert metadata["tokensparse.max_positions"] == "64"
    inputs = build_llama(batch=3, prompt=44, seed=5, family="mistral")[1]
    inputs["attention_mask"][1, :4] = 0
    with torch.no_grad():
        want = model.generate(**inputs, **GREEDY, pad_token_id=0)              # 44 + 12 - 1 positions: within
    _assert_same_generation(_greedy(pair, inputs), want)
    with pytest.raises(ValueError, match="need 65 positions, past the model.s sliding window of 64"):
        generate_onnx(pair.directory, {name: value.numpy() for name, value in inputs.items()}, 22)


def test_a_model_with_3d_positions_is_refused(tmp_path):
    from tests.models import build_qwen2_vl

    model, inputs = build_qwen2_vl()
    with pytest.raises(ValueError, match="Qwen2-VL numbers positions in 3-D"):
        to_onnx_generation(model, inputs, None, str(tmp_path / "out"))


def test_inputs_that_are_not_tensors_are_named(llava, tmp_path):
    model, traced = llava
    with pytest.raises(TypeError, match=r"example_inputs \['use_cache'\] are not tensors"):
        to_onnx_generation(model, {**traced, "use_cache": True}, None, str(tmp_path / "out"))


def test_generate_onnx_names_a_missing_input(fastv_pair, other_inputs):
    inputs = {name: value.numpy() for name, value in other_inputs.items() if name != "pixel_values"}
    with pytest.raises(ValueError, match=r"inputs lack \['pixel_values'\]"):
        generate_onnx(fastv_pair.directory, inputs, 2)
    with pytest.raises(ValueError, match="max_new_tokens=0 is out of range"):
        generate_onnx(fastv_pair.directory, inputs, 0)
    right = {name: value.numpy() for name, value in other_inputs.items()}
    right["attention_mask"] = right["attention_mask"][:, ::-1].copy()
    with pytest.raises(ValueError, match=r"pads samples \[1\] on the right"):
        generate_onnx(fastv_pair.directory, right, 2)
