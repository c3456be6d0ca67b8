"""VisionZip (Yang et al., 2024): at the vision encoder's feature layer, choose the dominant and contextual
tokens and write the contextual ones into their targets' rows; the language-model pass then keeps only
the image positions those rows fill."""

from __future__ import annotations

import operator

import torch.fx as fx

from tokensparse.fx.passes.context import PassContext, replace_uses_except
from tokensparse.fx.patterns.graph import insert_call
from tokensparse.pipeline import MatchFailure
from tokensparse.fx.patterns.vision_features import find_vision_features
from tokensparse.runtime.ops import VISIONZIP


def zip_vision_features_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """VisionZip (Yang et al. 2024): tokensparse::visionzip on the feature layer's output."""
    # Insert tokensparse::visionzip on the feature layer's output, on the projector's side only (later encoder layers
    # still read the original), and leave its kept rows for the language-model pass.
    if ctx.policy.stage != "llm" or not ctx.policy.stage_in_tower:
        return gm
    features = find_vision_features(gm, ctx.vlm.language)
    tokens = features.tokens
    prefix_in_features = features.offset < features.prefix
    if features.offset not in (0, features.prefix):
        raise MatchFailure(f"the features drop {features.offset} leading rows of {features.layer_path}'s output, "
                           f"which has {features.prefix} prefix tokens")
    dominant = ctx.policy.patch_budget(features.prefix, prefix_in_features, tokens - features.prefix)
    graph = gm.graph
    site = features.site
    zipped = insert_call(graph, features.user, VISIONZIP, (features.output, site.q, site.k, site.scale, dominant,
                                                          ctx.policy.contextual, features.prefix))
    hidden = insert_call(graph, features.user, operator.getitem, (zipped, 0))
    rows = insert_call(graph, features.user, operator.getitem, (zipped, 1))
    replace_uses_except(features.output, hidden, keep={user for user in features.output.users
                                                       if user is not features.user})
    ctx.vlm.feature_rows = (rows, features.offset, tokens - features.offset)
    ctx.record("zip_vision_features", f"{features.layer_path}: {dominant} dominant + {ctx.policy.contextual} "
                                      f"contextual of {tokens - features.prefix} patch tokens")
    return gm
