"""The FX front end's driver: match, plan and rewrite one FX graph with the pass lists of tokensparse.fx.passes
(pipeline.run_passes); fall back to the unchanged graph (with one warning that says why) whenever a pattern
does not match or the rewrite cannot be verified."""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from tokensparse.config import NO_FACTS, CallerFacts, Config
from tokensparse.fx.passes import KV_CHECKS, KV_PASSES, PASSES, PRUNED_STATIC_DECODE_PASSES
from tokensparse.fx.passes.context import CacheState, CallerSide, LanguageModelState, PassContext
from tokensparse.fx.passes.fake import detect_fake_mode, fake_inputs
from tokensparse.fx.patterns import ModelMatch, match_vision_encoder
from tokensparse.pipeline import MatchFailure, run_passes
from tokensparse.fx.patterns.graph import is_op, op_name, output_shapes
from tokensparse.fx.patterns.kv_cache import continues_a_cache, find_cache_sites
from tokensparse.fx.patterns.language_model import LanguageModelMatch, has_image_input, match_language_model
from tokensparse.fx.patterns.vision_features import find_vision_features
from tokensparse.policies import KVPolicy
from tokensparse.warn import UNCHANGED, TokensparseWarning, warn_once, warnings_for  # noqa: F401 (re-exported)


@dataclass
class RewriteResult:
    gm: fx.GraphModule                      # the rewritten graph, or the original one
    changed: bool
    reason: Optional[str] = None            # why nothing was changed
    match: Optional[ModelMatch | LanguageModelMatch] = None
    context: Optional[PassContext] = None
    notes: list = field(default_factory=list)


def internal_error(error: Exception) -> str:
    """The reason to give for an unexpected exception inside a pass (a tokensparse bug): the graph then
    compiles unchanged, so the user's program still runs. TOKENSPARSE_STRICT=1 (the tests) raises it."""
    if os.environ.get("TOKENSPARSE_STRICT") == "1":
        raise error
    first_line = str(error).splitlines()[0] if str(error) else ""
    return (f"internal error while rewriting ({type(error).__name__}: {first_line}); this is a tokensparse bug, "
            f"please report it with the model and options")


class InternalError(MatchFailure):
    """An unexpected exception inside a pass (a tokensparse bug), its reason internal_error's."""


def run_fx_passes(passes, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """pipeline.run_passes over an FX graph. MatchFailure and ValueError (bad options) raise through; any other
    exception is a bug in a pass and raises as an InternalError (under TOKENSPARSE_STRICT=1, the exception itself),
    so that each entry point falls back to the unchanged graph with the reason."""
    try:
        return run_passes(passes, gm, ctx)
    except (MatchFailure, ValueError):
        raise
    except Exception as error:  # noqa: BLE001 (a bug in a pass must not break the user's program)
        raise InternalError(internal_error(error)) from error


def mutates(node: fx.Node) -> bool:
    """Whether dead-code elimination must keep `node` although nothing reads it: FX's own impure nodes, and
    in-place methods and ops (a StaticCache's index_copy_ writes and cumulative_length.add_)."""
    if node.is_impure() or _changes_functorch_state(node):
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


_FUNCTORCH_STATE = ("_vmap_increment_nesting", "_vmap_decrement_nesting", "_jvp_increment_nesting",
                    "_jvp_decrement_nesting", "_enter_dual_level", "_exit_dual_level")


def _changes_functorch_state(node: fx.Node) -> bool:
    """vmap/jvp level changes that dynamo records when a model builds a mask with vmap (transformers' Gemma3
    image-block mask): their results go unused, but deleting them unbalances functorch's levels."""
    return node.op == "call_function" and getattr(node.target, "__name__", None) in _FUNCTORCH_STATE


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy with its own graph (node meta copied shallowly) sharing the original's parameters."""
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def rewrite_graph(gm: fx.GraphModule, example_inputs, config: Config, warn: bool = True,
                  facts: CallerFacts = NO_FACTS) -> RewriteResult:
    """Apply config's policy to a dynamo or torch.export graph. Bad options raise ValueError; anything
    that does not match returns the original graph with the reason. `facts`: what the caller does around the
    graph (config.CallerFacts)."""
    policy = config.policy
    if policy is None:
        return RewriteResult(gm, False, "no policy configured")
    # With kv= beside it, the KV policy may still change this graph.
    consequence = UNCHANGED if config.kv is None else f"{policy.name} is not applied to this graph"
    work = copy_graph_module(gm)
    language = policy.stage == "llm"
    tower = None
    if not language and not has_image_input(gm) and _holds_kv_cache(work):
        # Decode steps and text-only prompts of a VLM: no vision encoder here, nothing to warn about.
        return _without_image(gm, example_inputs, config, "no image in this language-model graph", warn, facts)
    if language and policy.vision_span is not None and not has_image_input(gm) and continues_a_cache(work):
        # The explicit span is the prefill's: a decode step has no vision tokens of its own.
        return _without_image(gm, example_inputs, config, "a decode step (vision_span= is the prompt's)", warn,
                              facts)
    try:
        if language:
            match = match_language_model(work, policy.vision_span)
        else:
            tower = _vision_language_model(work, config)
            match = match_vision_encoder(work, getattr(policy, "prefix_tokens", None))
            if tower is not None:
                match = _tower_blocks(match, *tower)
    except MatchFailure as failure:
        language_policy = policy if language else config.llm
        if language_policy is not None and language_policy.vision_span is None and not has_image_input(gm):
            # Text-only prompts and decode steps of a VLM: nothing to prune, nothing to warn about.
            return _without_image(gm, example_inputs, config, f"no image in this graph ({failure.reason})", warn,
                                  facts)
        return _unchanged(gm, example_inputs, failure.reason, warn, consequence=consequence, unmatched=True)
    try:
        policy.check_depth(match.depth)
    except ValueError as error:
        if tower is None:
            raise
        raise ValueError(f"{error}: the vision tower's blocks up to {tower[1].layer_path}, whose output the "
                         f"language model receives") from None
    if tower is not None and config.llm is not None:
        config.llm.check_depth(tower[0].depth)
    if policy.is_identity(match.depth):
        if tower is not None and config.llm is not None:
            return rewrite_graph(gm, example_inputs, dataclasses.replace(config, vision=None), warn, facts)
        return RewriteResult(gm, False, "nothing to reduce with these options", match)
    fake_mode = detect_fake_mode(example_inputs)
    ctx = PassContext(policy, [] if language else match.blocks, 0 if language else match.prefix_tokens,
                      fake_inputs(example_inputs, fake_mode), fake_mode,
                      CallerSide(masks_follow_cache=facts.decode_masks_follow_cache,
                                 compiled_by_regions=facts.compiled_by_regions,
                                 image_counts_checked=facts.image_counts_checked),
                      LanguageModelState(language=match if language else None))
    if tower is not None:
        ctx.vlm.language, ctx.vlm.tower_features, ctx.vlm.llm = tower[0], tower[1], config.llm
    ctx.original_output_shapes = output_shapes(work)
    try:
        work = run_fx_passes(PASSES, work, ctx)
    except MatchFailure as failure:                 # an InternalError too
        return _unchanged(gm, example_inputs, failure.reason, warn, match, consequence)
    work.graph.eliminate_dead_code(is_impure_node=mutates)
    work.recompile()
    return RewriteResult(work, True, None, match, ctx, match.notes)


def _without_image(gm: fx.GraphModule, example_inputs, config: Config, reason: str, warn: bool,
                   facts: CallerFacts) -> RewriteResult:
    """A VLM graph without an image (a decode step, a text-only prompt): unchanged, except decode steps into a
    StaticCache under tokensparse.compile(), whose pruned layers' slots no longer follow positions."""
    if not facts.decode_masks_follow_cache or not any(is_op(node, "index_copy_") for node in gm.graph.nodes):
        return RewriteResult(gm, False, reason)             # no StaticCache write: nothing to mask
    work = copy_graph_module(gm)
    fake_mode = detect_fake_mode(example_inputs)
    ctx = PassContext(config.policy, [], 0, fake_inputs(example_inputs, fake_mode), fake_mode,
                      CallerSide(masks_follow_cache=True))
    ctx.original_output_shapes = output_shapes(work)
    try:
        work = run_fx_passes(PRUNED_STATIC_DECODE_PASSES, work, ctx)
    except InternalError as error:
        return _unchanged(gm, example_inputs, error.reason, warn)
    except MatchFailure:
        return RewriteResult(gm, False, reason)
    work.recompile()
    return RewriteResult(work, True, None, None, ctx)


def _vision_language_model(gm: fx.GraphModule, config: Config):
    """(the language model, the vision features it receives) when a vision-encoder policy meets a VLM's graph
    (an image merge, or a language-model policy beside it); None for a plain vision encoder."""
    if config.llm is None and not any(op_name(node) == "masked_scatter" for node in gm.graph.nodes):
        return None
    lm = match_language_model(gm, config.llm.vision_span if config.llm is not None else None)
    return lm, find_vision_features(gm, lm)


def _holds_kv_cache(gm: fx.GraphModule) -> bool:
    try:
        find_cache_sites(gm)
    except MatchFailure:
        return False
    return True


def _tower_blocks(match: ModelMatch, lm: LanguageModelMatch, features) -> ModelMatch:
    """The vision-encoder match cut to the tower's blocks up to the layer the features come from (the decoder
    layers are the language-model pass's, not a block list left out)."""
    paths = [block.path for block in match.blocks]
    if features.layer_path not in paths:
        raise MatchFailure(f"the image features come from {features.layer_path}, which is not one of the vision "
                           f"encoder blocks found ({match.list_path})")
    blocks = match.blocks[:paths.index(features.layer_path) + 1]
    notes = [note for note in match.notes if not note.startswith(f"block list {lm.list_path} ")]
    return dataclasses.replace(match, blocks=blocks, notes=notes)


def rewrite_with_kv(gm: fx.GraphModule, example_inputs, config: Config,
                    facts: CallerFacts = NO_FACTS) -> RewriteResult:
    """The token policy's rewrite (rewrite_graph), then the KV policy's (rewrite_kv_cache); `facts`: what the
    caller does around the graph (config.CallerFacts)."""
    result = rewrite_graph(gm, example_inputs, config, facts=facts)
    if config.kv is not None:
        # tokensparse.compile() manages the decode masks of a pruned cache too (and refuses what it cannot)
        follows = facts.kv_masks_follow_cache or facts.decode_masks_follow_cache
        evicted = rewrite_kv_cache(result.gm, example_inputs, config.kv, kv_masks_follow_cache=follows,
                                   pruned=facts.decode_masks_follow_cache, sliding_windows=facts.sliding_windows)
        if evicted.changed:
            result = RewriteResult(evicted.gm, True, None, result.match, result.context or evicted.context,
                                   result.notes)
    return result


def rewrite_kv_cache(gm: fx.GraphModule, example_inputs, policy: KVPolicy, warn: bool = True,
                     kv_masks_follow_cache: bool = False, pruned: bool = False,
                     sliding_windows: tuple = ()) -> RewriteResult:
    """Apply a KV-cache policy to a decoder graph (the result of rewrite_graph, or a plain one). A forward
    whose cache is still within the budget comes back unchanged without a warning. `kv_masks_follow_cache`:
    the caller manages the decode masks as CallerFacts.kv_masks_follow_cache says (tokensparse.compile does), so a
    StaticCache's can be rebuilt over the buffer's slots and a padded batch's cut to each evicted cache.
    `pruned`: a language-model policy pruned the layers first (tokensparse.compile() manages those masks too).
    `sliding_windows`: each decoder layer's sliding window (0: full), as CallerFacts.sliding_windows says."""
    consequence = f"kv={policy.name} is not applied to this graph"
    work = copy_graph_module(gm)
    try:
        sites = find_cache_sites(work)
    except MatchFailure as failure:
        return _unchanged(gm, example_inputs, failure.reason, warn, consequence=consequence, unmatched=True)
    fake_mode = detect_fake_mode(example_inputs)
    ctx = PassContext(policy, [], 0, fake_inputs(example_inputs, fake_mode), fake_mode,
                      CallerSide(kv_masks_follow_cache, sliding_windows, pruned), kv=CacheState(sites))
    ctx.original_output_shapes = output_shapes(work)
    try:
        work = run_fx_passes(KV_PASSES, work, ctx)
        if not ctx.acted_blocks:
            return RewriteResult(gm, False, "the cache is within the budget")
        work = run_fx_passes(KV_CHECKS, work, ctx)
    except MatchFailure as failure:                 # an InternalError too
        return _unchanged(gm, example_inputs, failure.reason, warn, consequence=consequence)
    work.graph.eliminate_dead_code(is_impure_node=mutates)
    work.recompile()
    return RewriteResult(work, True, None, None, ctx)


def _unchanged(gm, example_inputs, reason: str, warn: bool, match=None, consequence: str = UNCHANGED,
               unmatched: bool = False) -> RewriteResult:
    """The graph as it was, with the reason (warn_once: once per model; `unmatched`, the graph holds nothing the
    policy acts on, quiet when another graph of the same call was rewritten)."""
    if warn:
        warn_once(reason, example_inputs, consequence, unmatched)
    return RewriteResult(gm, False, reason, match)

