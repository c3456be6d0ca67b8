"""The image features a VLM hands its language model: the vision encoder layer they come from (its output
and its attention), the encoder's prefix tokens, and the rows cut off before the projector (CLS)."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from tokensparse.fx.patterns.attention import AttentionSite, find_attention_sites
from tokensparse.fx.patterns.blocks import block_path
from tokensparse.fx.patterns.graph import is_op, module_paths, shape_of
from tokensparse.pipeline import MatchFailure
from tokensparse.fx.patterns.language_model import LanguageModelMatch
from tokensparse.fx.patterns.tokens import find_prefix_tokens


@dataclass
class VisionFeatures:
    output: fx.Node          # [B, N, C] the feature layer's output
    layer_path: str
    site: AttentionSite      # that layer's attention
    prefix: int              # prefix tokens (CLS) of the encoder
    offset: int              # rows cut before the projector: features = output[:, offset:]
    user: fx.Node            # the one user of `output` on the way to the language model

    @property
    def tokens(self) -> int:
        return shape_of(self.output)[1]


def find_vision_features(gm: fx.GraphModule, lm: LanguageModelMatch) -> VisionFeatures:
    """The encoder layer whose output the merged image features come from; MatchFailure says why not."""
    if lm.span is None:
        raise MatchFailure("no image merge (masked_scatter) in the graph: the features cannot be traced back to "
                           "the vision encoder")
    decoder_paths = {layer.path for layer in lm.layers}
    encoder_sites: dict[str, AttentionSite] = {}
    for site in find_attention_sites(gm)[0]:
        path = block_path(site)
        if path is not None and path not in decoder_paths:
            encoder_sites[path] = site
    found, seen, todo = set(), set(), [lm.span.features]
    while todo:
        for node in todo.pop().all_input_nodes:
            if node in seen or node.op in ("placeholder", "get_attr"):
                continue
            seen.add(node)
            if _layer_of(node, encoder_sites):
                found.add(node)
            else:
                todo.append(node)
    if not found:
        raise MatchFailure("no vision-encoder layer in this graph produces the image features: the tower ran "
                           "outside it (generate() runs Qwen2-VL's and LLaVA-OneVision's before the prefill)")
    if len(found) != 1:
        names = ", ".join(sorted(node.name for node in found)) or "none"
        raise MatchFailure(f"the image features come from {len(found)} vision-encoder tensors ({names}); one "
                           f"encoder layer's output was expected")
    output = found.pop()
    path = _layer_of(output, encoder_sites)
    shape, prompts = shape_of(output), shape_of(lm.span.mask)[0]
    if shape is None or len(shape) != 3:
        raise MatchFailure(f"{output.name}, the output of {path}, is not [B, N, C]")
    if shape[0] != prompts:
        raise MatchFailure(f"{shape[0]} images for {prompts} prompts: one image per sample is supported")
    _refuse_grid_connector(output, seen | {lm.span.features}, path)
    users = [user for user in output.users if user in seen or user is lm.span.features]
    if len(users) != 1:
        raise MatchFailure(f"{output.name} reaches the projector through {len(users)} paths; one was expected")
    return VisionFeatures(output, path, encoder_sites[path], find_prefix_tokens(output, shape[1]),
                          _rows_cut(users[0], output), users[0])


_GRID_OPS = ("avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "max_pool2d",
             "adaptive_max_pool2d", "pixel_shuffle", "pixel_unshuffle", "unfold", "im2col")


def _refuse_grid_connector(output: fx.Node, between: set, layer_path: str) -> None:
    """The connector between the encoder layer and the language model must keep one image token per encoder
    row: one that lays the rows out as a grid to pool or pixel-shuffle them (Gemma3's average pooling, Idefics3's
    pixel shuffle) makes each image token from several rows, so the rows a tower policy keeps say nothing about
    which image tokens remain."""
    todo, reached = [output], set()
    while todo:
        for user in todo.pop().users:
            if user in reached or user not in between:
                continue
            reached.add(user)
            todo.append(user)
            shape = shape_of(user)
            grid = is_op(user, "reshape", "view", "_unsafe_view") and shape is not None and len(shape) >= 4
            if grid or is_op(user, *_GRID_OPS):
                where = module_paths(user)
                raise MatchFailure(f"{where[-1] if where else user.name} lays the image rows out as a grid "
                                   f"({user.name}{': ' + str(list(shape)) if grid else ''}) between {layer_path} and "
                                   f"the language model, as a pooling or pixel-shuffle connector does: each image "
                                   f"token is made from several rows, so the vision tower cannot be reduced in this "
                                   f"model (language-model policies, llm=, prune after the connector)")


def _layer_of(node: fx.Node, encoder_sites: dict):
    for path in module_paths(node):
        if path in encoder_sites:
            return path
    return None


def _rows_cut(user: fx.Node, output: fx.Node) -> int:
    """The rows the feature selection drops in front ([:, 1:] drops CLS); 0 when the projector reads it all."""
    if user.target is operator.getitem:
        index = user.args[1]
        if (isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None)
                and isinstance(index[1], slice) and index[1].stop is None and index[1].step in (None, 1)):
            return index[1].start or 0
        raise MatchFailure(f"{user.name} indexes the encoder output with {index!r}; only a token slice [:, s:] is "
                           f"understood")
    if is_op(user, "slice") and user.args[1] in (1, -2) and len(user.args) > 2:
        return user.args[2] or 0
    if is_op(user, "linear", "matmul", "addmm", "mm", "to", "_to_copy", "layer_norm", "native_layer_norm"):
        return 0
    raise MatchFailure(f"{user.name} ({user.target}) between {output.name} and the projector is not a token slice")
