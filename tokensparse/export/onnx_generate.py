"""Greedy generation in ONNX Runtime from a to_onnx_generation directory: the reference loop for the contract
of its two graphs (what a C++ serving loop does), and tools/export.py's --check."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from tokensparse.export.generation import DECODE_FILE, MAX_POSITIONS_KEY, PREFILL_FILE, PROMPT_LENGTHS_KEY
from tokensparse.runtime.padding_checks import check_left_padding


@dataclass
class OnnxGenerated:
    tokens: torch.Tensor            # [B, max_new_tokens], greedy
    logits: list                    # each step's [B, V] logits, the prefill's first
    cache_lengths: list             # each decoder layer's cache length after the last step


def generate_onnx(directory: str, inputs: dict, max_new_tokens: int,
                  providers=("CPUExecutionProvider",)) -> OnnxGenerated:
    """Run prefill.onnx on `inputs` (input_ids, attention_mask (optional), the image inputs: tensors or arrays),
    then decode.onnx max_new_tokens - 1 times, feeding each step's present.* back as past_key_values.*."""
    import onnxruntime

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is out of range: generate at least one token")
    prefill, decode = (onnxruntime.InferenceSession(os.path.join(directory, name), providers=list(providers))
                       for name in (PREFILL_FILE, DECODE_FILE))
    feed = {name: np.asarray(value) for name, value in inputs.items()}
    feed.setdefault("attention_mask", np.ones_like(feed["input_ids"]))
    wanted = [value.name for value in prefill.get_inputs()]
    missing = [name for name in wanted if name not in feed]
    if missing:
        raise ValueError(f"inputs lack {missing}: {PREFILL_FILE} takes {wanted}")
    check_left_padding(torch.from_numpy(np.asarray(feed["attention_mask"])))   # what the graphs' masks assume
    metadata = prefill.get_modelmeta().custom_metadata_map
    shortest, *longest = metadata.get(PROMPT_LENGTHS_KEY, "1").split()
    length = feed["input_ids"].shape[1]
    if length < int(shortest) or (longest and length > int(longest[0])):
        raise ValueError(f"a prompt of {length} tokens is out of range: {PREFILL_FILE} was exported for prompts of "
                         f"{shortest} to {longest[0] if longest else 'any number of'} tokens (a policy's branch on "
                         f"the length, such as a KV budget, fixed it)")
    window = metadata.get(MAX_POSITIONS_KEY)
    if window is not None and length + max_new_tokens - 1 > int(window):
        raise ValueError(f"a prompt of {length} tokens and {max_new_tokens} new ones need "
                         f"{length + max_new_tokens - 1} positions, past the model's sliding window of {window}: "
                         f"the two graphs hold every position in full layers, so they are the model only while "
                         f"every position fits the window (generate at most {window} positions in all)")
    outputs = prefill.run(None, {name: feed[name] for name in wanted})
    names = [value.name for value in prefill.get_outputs()]
    mask = feed["attention_mask"]
    logits, tokens = [], []
    for step in range(max_new_tokens):
        last = outputs[0][:, -1]
        logits.append(torch.from_numpy(last.copy()))
        token = last.argmax(-1)[:, None].astype(feed["input_ids"].dtype)
        tokens.append(token)
        if step == max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=-1)
        past = {name.replace("present", "past_key_values"): value for name, value in zip(names[1:], outputs[1:])}
        outputs = decode.run(None, {"input_ids": token, "attention_mask": mask, **past})
        names = [value.name for value in decode.get_outputs()]
    return OnnxGenerated(torch.from_numpy(np.concatenate(tokens, axis=-1)), logits,
                         [value.shape[2] for name, value in zip(names, outputs) if name.endswith(".key")])
