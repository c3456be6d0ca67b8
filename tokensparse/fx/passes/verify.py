"""Verify a rewritten graph: it lints, the sizes pass has run every node on FakeTensors, and outputs
differ from the original only along token axes."""

from __future__ import annotations

import torch.fx as fx

from tokensparse.fx.passes.context import PassContext
from tokensparse.fx.passes.fake import fake_propagation
from tokensparse.fx.passes.sizes import same_size
from tokensparse.fx.patterns.graph import op_name, output_shapes
from tokensparse.pipeline import MatchFailure
from tokensparse.runtime.ops import KEEP_DIVERSE, KEEP_VISION, TOME_MERGE, TOPK_PRUNE, static_token_counts


def verify_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The rewritten graph lints, ran on fake tensors, and its outputs change only along token axes."""
    # The rewritten graph lints, every node was run on fake tensors (by the sizes pass, which runs first and fails on
    # any shape mismatch), and outputs change only along token axes.
    gm.graph.lint()
    gm.recompile()
    if not ctx.propagated:
        raise RuntimeError("verify_pass needs rederive_sizes_pass to run before it (see fx/passes/__init__.py)")
    _check_attention_masks(ctx)
    _check_reduced_counts(gm)
    _check_static_counts(gm, ctx)
    tokens = ctx.tokens
    old = ctx.original_output_shapes
    new = output_shapes(gm)
    if old is not None:
        if len(old) != len(new):
            raise MatchFailure(f"the rewritten graph returns {len(new)} outputs instead of {len(old)}")
        for index, (before, after) in enumerate(zip(old, new)):
            if before is None or after is None or (len(before) == len(after) and all(map(same_size, before, after))):
                continue
            bad = len(before) != len(after) or any(not same_size(b, a) and not same_size(b, tokens)
                                                   for b, a in zip(before, after))
            if bad:
                raise MatchFailure(f"output {index} changed shape from {list(before)} to {list(after)} "
                                   f"outside the token axis")
    return gm



def verify_cache_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """After a KV eviction: the graph lints, ran on fake tensors, outputs change only along the cache axis."""
    # After a KV-cache eviction: the graph lints, ran on fake tensors, and its outputs changed only along the cache
    # axis (dim 2) of the stored keys and values [B, H_kv, L, d] and scores [B, H_kv, L].
    gm.graph.lint()
    gm.recompile()
    if not ctx.propagated:
        raise RuntimeError("verify_cache_pass needs rederive_sizes_pass to run before it (see fx/passes/__init__.py)")
    old, new = ctx.original_output_shapes, output_shapes(gm)
    if len(old) != len(new):
        raise MatchFailure(f"the rewritten graph returns {len(new)} outputs instead of {len(old)}")
    for index, (before, after) in enumerate(zip(old, new)):
        if before is None or after is None or (len(before) == len(after) and all(map(same_size, before, after))):
            continue
        if len(before) != len(after) or len(before) not in (3, 4) or any(
                not same_size(before[d], after[d]) for d in range(len(before)) if d != 2):
            raise MatchFailure(f"output {index} changed shape from {list(before)} to {list(after)} outside the "
                               f"cache axis")
    return gm


def _check_attention_masks(ctx: PassContext) -> None:
    """A mask made for the original token count cannot serve attention over fewer tokens (under
    unbacked sizes FakeTensor broadcasting would assume they agree)."""
    for block in ctx.blocks:
        mask, keys = block.site.mask, block.site.k
        if mask is None or "val" not in mask.meta or "val" not in keys.meta:
            continue
        columns, tokens = mask.meta["val"].shape[-1], keys.meta["val"].shape[-2]
        if not same_size(columns, 1) and not same_size(columns, tokens):
            raise MatchFailure(f"{block.path}: its attention mask has {columns} key columns but the keys hold "
                               f"{tokens} tokens after the cut; a mask computed before the cut would have to "
                               f"follow the kept tokens, which is not supported yet")


def _check_static_counts(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Run the graph once more on fake tensors whose reduced token counts are the numbers they will be (the
    sizes pass runs them as fresh symbols, which broadcasting may unify with a tensor sized for the original
    count): a tensor made for the traced count (`torch.arange(x.shape[1])`) then fails to meet the tokens."""
    if not ctx.blocks:
        return              # language-model cuts keep a data-dependent count (the image tokens)
    interpreter = _NodeTracking(gm)
    with static_token_counts(), fake_propagation(ctx.fake_mode):
        try:
            interpreter.run(*ctx.fake_inputs)
        except Exception as error:  # noqa: BLE001 - any failure here is a tensor sized for the traced count
            node = interpreter.last
            raise MatchFailure(f"a tensor sized for the traced token count meets the reduced tokens at "
                               f"{node.name} ({op_name(node)}): {type(error).__name__}: "
                               f"{str(error).splitlines()[0]}") from None


class _NodeTracking(fx.Interpreter):
    """fx.Interpreter that remembers the node it ran last (the one that failed)."""

    last: fx.Node = None

    def run_node(self, node: fx.Node):
        self.last = node
        return super().run_node(node)


def _check_reduced_counts(gm: fx.GraphModule) -> None:
    """Each policy op must leave fewer tokens than it got. If FakeTensor propagation unified its fresh
    count with the old one, some tensor sized for the old count (a mask made before the cut, say) met
    the reduced tokens downstream, and the graph would fail or be wrong at run time."""
    for node in gm.graph.nodes:
        if node.target not in (TOME_MERGE, TOPK_PRUNE, KEEP_VISION, KEEP_DIVERSE) or "val" not in node.meta:
            continue
        out = node.meta["val"][0] if node.target is TOME_MERGE else node.meta["val"]
        tokens_in = node.args[0].meta["val"].shape[1]
        if node.target is TOME_MERGE:
            reduces = node.args[3] > 0
        elif node.target in (KEEP_VISION, KEEP_DIVERSE):
            reduces = node.args[2] < 1
        else:
            keep = node.args[4].meta["val"] if isinstance(node.args[4], fx.Node) else node.args[4]
            reduces = not same_size(node.args[5] + keep + int(node.args[6]), tokens_in)
        if reduces and same_size(out.shape[1], tokens_in):
            raise MatchFailure(f"{node.name}: the reduced token count was unified with the {tokens_in} tokens it "
                               f"started from; a tensor sized for the original tokens (such as an attention mask "
                               f"computed before the cut) meets the reduced tokens downstream")
