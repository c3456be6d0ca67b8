"""Prune vision tokens of a VLM's sequence before chosen decoder layers (FastV, Chen et al., ECCV 2024;
PyramidDrop, Xing et al., CVPR 2025; DivPrune, Alvar et al., CVPR 2025; visual-token exit, DyVTE; VisionZip,
Yang et al., 2024; DTD, TimeChat-Online, Yao et al., 2025)."""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from tokensparse.flops import POLICY_NODE
from tokensparse.fx.passes.context import PassContext, original_node, replace_uses_except
from tokensparse.fx.passes.sizes import same_size
from tokensparse.fx.passes.static_slot_masks import attend_over_filled_slots
from tokensparse.fx.patterns.graph import arg, downstream, insert_call, is_op, meta_value, shape_of
from tokensparse.pipeline import MatchFailure
from tokensparse.fx.patterns.kv_cache import static_write
from tokensparse.fx.patterns.language_model import DecoderLayer, LanguageModelMatch
from tokensparse.policies.fastv import fastv_scores, kept_image_count
from tokensparse.policies.language import Stage
from tokensparse.runtime.ops import KEEP_CHANGED_VIDEO, KEEP_DIVERSE, KEEP_IMAGE_ROWS, KEEP_VISION
from tokensparse.runtime.sequence import gather_tokens, last_tokens, span_mask, vision_mask_2d
from tokensparse.runtime.static_cache import first_columns, first_slots, slot_padding

_VIEWS = ("to", "view", "reshape", "expand", "unsqueeze", "contiguous", "_to_copy", "clone", "type_as")


def prune_sequence_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Prune a VLM's vision tokens before chosen decoder layers (FastV, Chen et al. 2024; see above)."""
    # Before each stage's decoder layer, choose the kept positions (every text token and some vision tokens) and
    # gather every token-indexed tensor that the later layers read: the residual stream, RoPE cos/sin, attention
    # masks. Kept tokens keep their original positions, or with positions="compact" take consecutive ones (the RoPE
    # tables' last rows).
    policy = ctx.vlm.llm if ctx.vlm.tower_features is not None else ctx.policy
    stages = _tower_stage(ctx) + (policy.stages() if policy is not None and policy.stage == "llm" else [])
    if not stages:
        return gm
    lm: LanguageModelMatch = ctx.vlm.language
    graph = gm.graph
    static = any(is_op(node, "index_copy_") for layer in lm.layers for node in layer.nodes)
    if static and not ctx.caller.masks_follow_cache:
        raise MatchFailure("the decoder layers write a StaticCache, whose decode masks follow positions that the "
                           "pruned layers no longer hold; prune into a StaticCache through tokensparse.compile(model, "
                           "config), whose decode steps attend over each layer's filled slots")
    compact = getattr(policy, "positions", "original") == "compact"
    if compact and _find_mrope_positions(graph, lm) is not None:
        raise MatchFailure("positions='compact' renumbers 1-D RoPE positions; this language model reads 3-D M-RoPE "
                           "position ids (temporal, height, width), whose compact form is not defined: use "
                           "positions='original'")
    mask, image_tokens = None, _image_tokens_per_sample(ctx, lm, policy)
    for stage in stages:
        layer = lm.layers[stage.layer]
        inside = set().union(*(later.nodes for later in lm.layers[stage.layer:]))
        order = {node: position for position, node in enumerate(graph.nodes)}
        point = min(layer.nodes, key=order.__getitem__)
        riders = _riders(graph, inside, lm.sequence, lm.returns_cache and not ctx.caller.masks_follow_cache)
        stream = _stream_into(layer, riders)
        if mask is None:
            mask = _vision_mask(graph, point, lm, getattr(policy, "vision_span", None), stream)
        kept = _select(graph, point, stage, lm, layer, mask, stream, ctx.vlm.feature_rows, image_tokens,
                       ctx.caller.image_counts_checked)
        image_tokens = kept_image_count(image_tokens, stage.keep) if image_tokens is not None and \
            stage.score in _FRACTION_SCORES else None
        rotary = _rotary_tables(riders) if compact else set()
        for rider, axes in riders:
            follow = last_tokens if rider in rotary else gather_tokens
            moved = insert_call(graph, point, follow, (rider, kept, axes))
            replace_uses_except(rider, moved, keep={user for user in rider.users if user not in inside})
        mask = insert_call(graph, point, gather_tokens, (mask, kept, (1,)))
        ctx.acted_blocks.append(stage.layer)
        ctx.vlm.acted_layers.append(stage.layer)
        kept_what = {"encoder_attention": "the encoder's kept rows",
                     "temporal": f"those not within cosine {stage.keep:g} of their previous frame"}
        renumbered = f"; compact positions from {', '.join(node.name for node in rotary)}" if compact else ""
        ctx.record("prune_sequence", f"{layer.path}: keep {kept_what.get(stage.score, f'{stage.keep:g}')} of the "
                                     f"vision tokens ({stage.score}); gathered "
                                     f"{', '.join(node.name for node, _ in riders if node not in rotary)}{renumbered}")
    if static:
        for layer in lm.layers[min(stage.layer for stage in stages):]:
            _write_first_slots(graph, layer)
        ctx.record("prune_sequence", "StaticCache: each pruned layer writes its kept tokens to its first slots")
    return gm


def _write_first_slots(graph: fx.Graph, layer: DecoderLayer) -> None:
    """A pruned layer's StaticCache update: its S' kept tokens go to the slots right after the filled ones, its
    length grows by S', and a masked attention sees the filled slots up to its own (top-left causal, as SDPA's
    is_causal already does over the buffer) but the padding of a padded batch, which it keeps first."""
    order = {node: position for position, node in enumerate(graph.nodes)}
    writes = sorted((node for node in layer.nodes if is_op(node, "index_copy_")), key=order.__getitem__)
    slots, new = writes[0].args[2], writes[0].args[3]
    if not is_op(slots, "add") or any(write.args[2] is not slots for write in writes):
        raise MatchFailure(f"{layer.path}: its StaticCache slots are not one arange(S) + cumulative_length")
    length = slots.args[1]
    grows = [node for node in layer.nodes if node.op == "call_method" and node.target == "add_"
             and node.args[0] is length]
    if len(grows) != 1:
        raise MatchFailure(f"{layer.path}: {len(grows)} updates of its StaticCache length; one was expected")
    kept_slots = insert_call(graph, writes[0], first_slots, (slots, new))
    for write in writes:
        write.args = (write.args[0], write.args[1], kept_slots, *write.args[3:])
    count = insert_call(graph, grows[0], torch.ops.aten.sym_size.int, (new, 2))
    grows[0].args = (length, count)
    for read in _buffer_reads(layer, writes):        # buffer[:, :, :S] -> buffer[:, :, :S']
        index = list(read.args[1])
        index[2] = slice(index[2].start, count, index[2].step)
        read.args = (read.args[0], tuple(index))
    mask = arg(layer.site.node, 3, "attn_mask")
    if mask is not None:        # the prompt's mask over positions: its padding is the layer's first slots
        padding = insert_call(graph, layer.site.node, slot_padding, (kept_slots, writes[0].args[0], mask, False))
        attend_over_filled_slots(graph, layer.site.node, kept_slots, writes[0].args[0], padding)


def _tower_stage(ctx: PassContext) -> list[Stage]:
    """Before layer 0, the image positions that the tokens left by a vision-encoder policy in the tower fill."""
    return [Stage(0, 1.0, "encoder_attention")] if ctx.vlm.tower_features is not None else []


def _riders(graph: fx.Graph, inside: set, sequence, refuse_padding: bool) -> list[tuple[fx.Node, tuple]]:
    """Tensors made before the cut and read inside it that are indexed by token, with their token axes. An
    attention mask [B, 1, S, S] (a padded batch) is gathered on both axes, unless `refuse_padding`: the graph
    returns a KV cache whose decode steps would get masks as long as the unpruned layers' caches."""
    riders = []
    for node in graph.nodes:
        if node in inside or node.op in ("placeholder", "get_attr", "output"):
            continue
        if not any(user in inside for user in node.users):
            continue
        shape = shape_of(original_node(node))
        if shape is None or not shape:
            continue
        axes = tuple(d for d in range(1, len(shape)) if same_size(shape[d], sequence))
        if len(shape) == 1 and same_size(shape[0], sequence):
            raise MatchFailure(f"{node.name} {list(shape)} is indexed by token but has no batch axis; the kept "
                               f"positions differ per sample")
        if len(axes) > 1 and not (axes == (len(shape) - 2, len(shape) - 1) and _is_attention_mask(node)):
            raise MatchFailure(f"{node.name} {list(shape)}: cannot tell which axis holds the {sequence} tokens "
                               f"(another size equals the sequence length)")
        if len(axes) > 1 and refuse_padding:
            # Gathering the prefill mask is right, but generate() builds every decode step's mask from layer
            # 0's cache length, which the pruned layers no longer have; tokensparse.compile() cuts those masks.
            raise MatchFailure(f"{node.name} {list(shape)} is a padding attention mask: pruning padded prompts in a "
                               f"graph that returns the KV cache needs tokensparse.compile(model, config), whose "
                               f"decode steps follow the pruned cache")
        if axes:
            riders.append((node, axes))
    if not riders:
        raise MatchFailure("no token-indexed tensor enters the pruned layers")
    return riders


def _rotary_tables(riders: list) -> set:
    """The riders that are RoPE cos/sin tables: a cos or sin op reached through scaling, casts, views and
    earlier cuts only (never through a layer's computation). Under positions="compact" they take the
    prompt's last positions instead of following the kept tokens."""
    tables = {rider for rider, _ in riders if _made_from_cos_or_sin(rider)}
    if not tables:
        raise MatchFailure("positions='compact' renumbers RoPE positions, but no RoPE cos/sin table enters the "
                           "pruned layers (positions added to the embeddings, or rotated inside each layer): use "
                           "positions='original'")
    return tables


_TABLE_STEPS = _VIEWS + ("mul", "float", "type", "last_tokens", "gather_tokens")


def _made_from_cos_or_sin(node: fx.Node) -> bool:
    todo, seen = [node], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if is_op(current, "cos", "sin"):
            return True
        if is_op(current, *_TABLE_STEPS):
            todo.extend(current.all_input_nodes)
        elif is_op(current, "getitem"):
            todo.extend(_submodule_result(current))
    return False


def _submodule_result(getitem: fx.Node) -> list:
    """What a getitem of a higher-order op returns, inside the op's subgraph (torch.export computes RoPE tables
    in a wrap_with_set_grad_enabled or wrap_with_autocast region); [] for any other getitem."""
    call, index = getitem.args[0], getitem.args[1]
    if not isinstance(call, fx.Node) or call.op != "call_function" or not isinstance(index, int):
        return []
    owner = getitem.graph.owning_module
    for candidate in call.args:
        if isinstance(candidate, fx.Node) and candidate.op == "get_attr" and owner is not None:
            subgraph = getattr(owner, candidate.target, None)
            if isinstance(subgraph, fx.GraphModule):
                results = next(n for n in reversed(subgraph.graph.nodes) if n.op == "output").args[0]
                if isinstance(results, (tuple, list)) and isinstance(results[index], fx.Node):
                    return [results[index]]
    return []


def _is_attention_mask(node: fx.Node, hops: int = 6) -> bool:
    """A bool tensor, or one that reaches an attention's mask argument through view-like ops."""
    value = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        return True
    frontier = [node]
    for _ in range(hops):
        following = []
        for current in frontier:
            for user in current.users:
                if is_op(user, "scaled_dot_product_attention") and arg(user, 3, "attn_mask") is current:
                    return True
                if is_op(user, *_VIEWS):
                    following.append(user)
        frontier = following
    return False


def _stream_into(layer: DecoderLayer, riders: list) -> fx.Node:
    """The residual stream entering `layer`: the rider that the layer adds to its attention output."""
    after = downstream([layer.site.node], within=layer.nodes)
    for rider, _ in riders:
        # torch.export records a no-op .to(dtype) as the node that later reads of the same tensor use
        dtype = getattr(meta_value(rider), "dtype", None)
        aliases = [rider] + [user for user in rider.users if is_op(user, "to") and same_size(
            shape_of(user), shape_of(rider)) and getattr(meta_value(user), "dtype", None) == dtype]
        for alias in aliases:
            if any(user in after and is_op(user, "add", "iadd", "add_") for user in alias.users):
                return rider
    raise MatchFailure(f"{layer.path}: no residual add of the layer input and its attention output")


def _vision_mask(graph, point, lm: LanguageModelMatch, vision_span, stream) -> fx.Node:
    if vision_span is not None:
        return insert_call(graph, point, span_mask, (stream, *vision_span))
    return insert_call(graph, point, vision_mask_2d, lm.span.masks)


def _image_tokens_per_sample(ctx: PassContext, lm: LanguageModelMatch, policy) -> int | None:
    """Each sample's image-token count when the forward checked that the samples hold equally many
    (CallerSide.image_counts_checked) and one merge's static feature rows give it (rows / batch); else None."""
    if not ctx.caller.image_counts_checked or getattr(policy, "vision_span", None) is not None or \
            lm.span is None or len(lm.span.masks) != 1:
        return None
    features, embeddings = shape_of(lm.span.features), shape_of(lm.span.embeddings)
    if features is None or embeddings is None or not all(isinstance(size, int) for size in (*features, *embeddings)):
        return None
    batch, channels = embeddings[0], embeddings[-1]
    elements = math.prod(features)
    if elements % (batch * channels):
        return None
    return elements // (batch * channels)


# The stages that keep kept_image_count(n, keep) of n image tokens, by score (the others choose their own counts).
_FRACTION_SCORES = ("none", "previous_attention", "next_projection", "diversity")


def _select(graph, point, stage: Stage, lm: LanguageModelMatch, layer: DecoderLayer, mask, stream,
            feature_rows, image_tokens: int | None, counts_checked: bool) -> fx.Node:
    """The kept positions [B, S'] of this stage (`image_tokens`: each sample's count, where known;
    `counts_checked`: the forward checked that the samples hold equally many)."""
    if stage.score == "encoder_attention":    # VisionZip: the image positions its kept encoder rows fill
        return insert_call(graph, point, KEEP_IMAGE_ROWS, (mask, *feature_rows, counts_checked))
    if stage.score == "diversity":
        return insert_call(graph, point, KEEP_DIVERSE, (stream, mask, stage.keep, image_tokens))
    if stage.score == "temporal":
        return insert_call(graph, point, KEEP_CHANGED_VIDEO, (stream, mask, _mrope_positions(graph, lm), stage.keep))
    if stage.score == "none":
        return insert_call(graph, point, KEEP_VISION, (mask, mask, stage.keep, image_tokens))
    if stage.score == "previous_attention":
        scored = lm.layers[stage.layer - 1]
        q, k = scored.site.q, scored.site.k
        query = stage.query
    else:                                   # next_projection: this layer's own norm, q/k projections and RoPE
        scored = layer
        q, k = _copy_projections(graph, point, layer)
        query = "last"
    site, attn_mask = scored.site, arg(scored.site.node, 3, "attn_mask")
    if attn_mask is not None and any(is_op(node, "index_copy_") for node in scored.nodes):
        # a masked StaticCache prefill reads the whole buffer, and masks it: the prompt is in its first slots
        k, attn_mask = (insert_call(graph, point, first_columns, (tensor, q, dim)) for tensor, dim in ((k, 2),
                                                                                                      (attn_mask, 3)))
    scores = insert_call(graph, point, fastv_scores, (q, k, site.scale, mask, query, attn_mask))
    return insert_call(graph, point, KEEP_VISION, (scores, mask, stage.keep, image_tokens))


def _find_mrope_positions(graph: fx.Graph, lm: LanguageModelMatch):
    """The 3-D M-RoPE position ids [3, B, S] (temporal, height, width; Qwen2-VL) that the rotary embedding
    reads, made before the decoder layers, or None."""
    inside = set().union(*(layer.nodes for layer in lm.layers))
    for node in graph.nodes:
        if node in inside:
            break
        shape, value = shape_of(node), meta_value(node)
        if (shape is not None and len(shape) == 3 and same_size(shape[0], 3) and same_size(shape[2], lm.sequence)
                and getattr(value, "dtype", None) in (torch.int64, torch.int32)):
            return node
    return None


def _mrope_positions(graph: fx.Graph, lm: LanguageModelMatch) -> fx.Node:
    """The 3-D M-RoPE position ids [3, B, S] that DTD reads to find each patch's previous frame."""
    positions = _find_mrope_positions(graph, lm)
    if positions is not None:
        return positions
    raise MatchFailure("dtd finds each patch's previous frame from 3-D M-RoPE position ids ([3, B, S], as Qwen2-VL "
                       "passes them); this graph has none")


def _copy_projections(graph: fx.Graph, point: fx.Node, layer: DecoderLayer) -> tuple[fx.Node, fx.Node]:
    """Copies, placed before `point`, of the layer's nodes that compute its attention q and k from what
    enters the layer (so they see every token, before the cut)."""
    keys = _keys_before_cache(layer)
    needed, todo = set(), [layer.site.q, keys]
    while todo:
        node = todo.pop()
        if node in needed or node not in layer.nodes:
            continue
        needed.add(node)
        todo.extend(node.all_input_nodes)
    copies: dict = {}
    for node in [n for n in graph.nodes if n in needed]:
        with graph.inserting_before(point):
            copy = graph.node_copy(node, lambda n: copies.get(n, n))
        copy.meta.pop("nn_module_stack", None)
        copy.meta[POLICY_NODE] = True
        copies[node] = copy
    return copies[layer.site.q], copies[keys]


def _buffer_reads(layer: DecoderLayer, writes: list) -> list:
    """The layer's reads of its StaticCache buffers up to a length, buffer[:, :, :L] (L the prompt length: SDPA's
    unmasked prefill). A masked attention (a padded batch) reads the whole buffer, through its new mask over the
    buffer's slots, which hides the slots past its own: such reads (buffer[:, :, None] for grouped KV heads) need
    no cut."""
    written = {write.args[0] for write in writes} | set(writes)
    masked = arg(layer.site.node, 3, "attn_mask") is not None
    reads = []
    for node in layer.nodes:
        if node.target is operator.getitem and node.args[0] in written:
            index = node.args[1]
            if masked and isinstance(index, tuple) and all(part is None or part == slice(None) for part in index):
                continue
            if not (isinstance(index, tuple) and len(index) == 4 and isinstance(index[2], slice)
                    and index[2].stop is not None and all(part == slice(None) for part in index[:2] + index[3:])):
                raise MatchFailure(f"{layer.path}: reads its StaticCache buffer as {index!r}; only [:, :, :L] "
                                   f"(and whole reads by a masked attention) are understood")
            reads.append(node)
    return reads


def _keys_before_cache(layer: DecoderLayer) -> fx.Node:
    """The keys the layer's attention reads, or, when it reads them back from a StaticCache's buffer, the new
    keys it writes there (a copy must not write the buffer again)."""
    write = static_write(layer.site.k)
    return layer.site.k if write is None else write.args[3]
