"""A vision-encoder policy (ToMe, Bolya et al., ICLR 2023; TopK/EViT, Liang et al., ICLR 2022) in a VLM's
vision tower: follow the patch rows each surviving token came from, hand the projector the tokens at their
first source rows, and leave those rows for the language-model pass, which keeps the image positions they fill."""

from __future__ import annotations

import operator

import torch.fx as fx

from tokensparse.fx.passes.context import PassContext, replace_uses_except
from tokensparse.fx.patterns.graph import insert_call
from tokensparse.pipeline import MatchFailure
from tokensparse.policies.token_sources import token_sources
from tokensparse.runtime.ops import FEATURES_AT_SOURCE_ROWS, TOME_MERGE, TOPK_PRUNE


def tower_feature_rows_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """A VLM tower's ToMe/TopK steps (Bolya et al. 2023; Liang et al. 2022) on its tokens' patch rows."""
    # After each ToMe merge or TopK prune in the tower, the same step on a [B, N, N] identity (the tokens' source
    # rows); at the feature layer, tokensparse::features_at_source_rows on the projector's side only.
    features = ctx.vlm.tower_features
    if features is None:
        return gm
    graph = gm.graph
    steps = [node for node in graph.nodes if node.target in (TOME_MERGE, TOPK_PRUNE)]
    if not steps:
        raise MatchFailure(f"the vision policy left every token of the tower up to {features.layer_path}")
    if features.offset not in (0, features.prefix):
        raise MatchFailure(f"the features drop {features.offset} leading rows of {features.layer_path}'s output, "
                           f"which has {features.prefix} prefix tokens")
    sources = insert_call(graph, steps[0], token_sources, (steps[0].args[0],))
    for step in steps:
        if step.target is TOME_MERGE:
            twin = insert_call(graph, step.next, TOME_MERGE, (sources, *step.args[1:]))
            sources = insert_call(graph, twin.next, operator.getitem, (twin, 0))
        else:
            sources = insert_call(graph, step.next, TOPK_PRUNE, (sources, *step.args[1:]))
    placed = insert_call(graph, features.user, FEATURES_AT_SOURCE_ROWS, (features.output, sources))
    full = insert_call(graph, features.user, operator.getitem, (placed, 0))
    rows = insert_call(graph, features.user, operator.getitem, (placed, 1))
    replace_uses_except(features.output, full, keep={user for user in features.output.users
                                                     if user is not features.user})
    ctx.vlm.feature_rows = (rows, features.offset, features.tokens - features.offset)
    ctx.record("tower_feature_rows", f"{features.layer_path}: each of its tokens fills the image position of its "
                                     f"first source patch")
    return gm
