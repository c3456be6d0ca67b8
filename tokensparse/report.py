"""tokensparse.explain(): what the patterns found and what a policy would do, without compiling."""

from __future__ import annotations

import dataclasses

import io
from dataclasses import dataclass, field
from typing import Optional

from tokensparse.capture import capture_graphs, capture_prefill_graphs
from tokensparse.config import CallerFacts, Config, config_from_options
from tokensparse.flops import flops_by_block, flops_by_block_running
from tokensparse.fx.passes.fake import detect_fake_mode, fake_inputs
from tokensparse.fx.patterns.language_model import LanguageModelMatch
from tokensparse.fx.rewrite import RewriteResult, rewrite_graph
from tokensparse.runtime.hf_model import is_generative, tower_splits_graph


@dataclass
class BlockRow:
    index: int
    path: str
    attention: str
    attention_kind: str
    tokens_before: int        # entering the block, unmodified model
    tokens_after: int         # entering the block, rewritten model
    tokens_out: int           # leaving the block, rewritten model
    flops_before: int
    flops_after: int
    acted: bool


@dataclass
class Report:
    """The blocks and attention sites found, tokens and FLOPs per block before and after, and why
    anything did not match. str(report) is a table; save_png() draws the surviving patches."""

    model: str
    options: dict
    changed: bool
    reason: Optional[str]
    prefix_tokens: Optional[int]
    grid: Optional[tuple]
    blocks: list[BlockRow] = field(default_factory=list)
    flops_other: int = 0
    flops_other_after: Optional[int] = None     # when the rewrite changes work outside the blocks (LM head)
    flops_policy: int = 0
    notes: list[str] = field(default_factory=list)
    found: list[str] = field(default_factory=list)    # what the patterns found beyond the blocks
    graphs: int = 1
    _result: Optional[RewriteResult] = field(default=None, repr=False)
    _inputs: Optional[list] = field(default=None, repr=False)

    @property
    def flops_before(self) -> int:
        return sum(row.flops_before for row in self.blocks) + self.flops_other

    @property
    def flops_after(self) -> int:
        other = self.flops_other if self.flops_other_after is None else self.flops_other_after
        return sum(row.flops_after for row in self.blocks) + other + self.flops_policy

    @property
    def flops_ratio(self) -> float:
        """Total FLOPs before / after, the policy's own ops included."""
        return self.flops_before / self.flops_after if self.flops_after else 1.0

    @property
    def flops_ideal_ratio(self) -> float:
        """Model FLOPs before / after, leaving out the policy's own ops: the speedup a perfect
        implementation would reach."""
        model_after = self.flops_after - self.flops_policy
        return self.flops_before / model_after if model_after else 1.0

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"tokensparse: {self.model}, {self.options}", title_justify="left")
        for name in ("block", "attention", "tokens in", "in (reduced)", "out (reduced)", "GFLOPs", "GFLOPs (reduced)"):
            table.add_column(name, justify="left" if name in ("block", "attention") else "right")
        for row in self.blocks:
            table.add_row(row.path, f"{row.attention} ({row.attention_kind})", str(row.tokens_before),
                          str(row.tokens_after), str(row.tokens_out), f"{row.flops_before / 1e9:.3f}", f"{row.flops_after / 1e9:.3f}")
        lines = []
        if self.reason:
            lines.append(f"unchanged: {self.reason}")
        lines += self.found
        if self.prefix_tokens is not None:
            lines.append(f"prefix tokens: {self.prefix_tokens}; patch grid: {self.grid}; graphs captured: {self.graphs}")
        lines.append(f"outside blocks {self.flops_other / 1e9:.3f} GFLOPs; policy ops {self.flops_policy / 1e9:.4f} GFLOPs")
        lines.append(f"total {self.flops_before / 1e9:.3f} -> {self.flops_after / 1e9:.3f} GFLOPs "
                     f"(FLOPs-ideal speedup {self.flops_ideal_ratio:.2f}x; {self.flops_ratio:.2f}x with the "
                     f"policy's own ops)")
        lines += [f"not matched: {note}" for note in self.notes]
        buffer = io.StringIO()
        console = Console(file=buffer, width=120, color_system=None)
        console.print(table)
        return buffer.getvalue() + "\n".join(lines) + "\n"

    def save_png(self, path) -> None:
        """Draw, per block, which patches survive (each token a colour; dropped patches black)."""
        from tokensparse.viz import draw_token_groups

        if self._result is None or not self._result.changed:
            raise ValueError(f"nothing to draw: the graph was not rewritten ({self.reason})")
        draw_token_groups(self, path)


def explain(model, *inputs, config: Optional[Config] = None, **options) -> Report:
    """Report what `options` (or `config`) would do to `model` on `inputs`, without compiling. A single dict
    of inputs is passed as keyword arguments (a VLM's input_ids and pixel_values)."""
    config = config_from_options(config if config is not None else options)
    # What tokensparse.compile does: its decode steps follow the pruned cache, so a prompt with an attention mask
    # (padded or not) is pruned too.
    facts = CallerFacts(decode_masks_follow_cache=is_generative(model) and config.policy is not None)
    if len(inputs) == 1 and isinstance(inputs[0], dict) and is_generative(model) and tower_splits_graph(model):
        graphs = capture_prefill_graphs(model, inputs[0])
    elif len(inputs) == 1 and isinstance(inputs[0], dict):
        graphs = capture_graphs(model, **inputs[0])
    else:
        graphs = capture_graphs(model, *inputs)
    results = [(rewrite_graph(gm, example, config, warn=False, facts=facts), gm, example) for gm, example in graphs]
    matched = [entry for entry in results if entry[0].match is not None]
    result, original, example = (matched or results)[0]
    report = Report(type(model).__name__, config.policy.options(), result.changed, result.reason,
                    getattr(result.match, "prefix_tokens", None), getattr(result.match, "grid", None), graphs=len(graphs),
                    _result=result, _inputs=example)
    if result.match is None:
        report.notes.append(result.reason)
        return report
    report.notes += result.match.notes
    if isinstance(result.match, LanguageModelMatch):
        return _explain_language_model(report, result, original, example)
    if result.context is not None and result.context.vlm.language is not None:   # vision= in a VLM's tower
        report.found += [f"vision tower: {message}" for name, message in result.context.changes
                         if name in ("merge_tokens", "prune_tokens", "tower_feature_rows")]
        tower_result = dataclasses.replace(result, match=result.context.vlm.language)
        return _explain_language_model(report, tower_result, original, example)
    paths = [block.path for block in result.match.blocks]
    fake_mode = detect_fake_mode(example)
    before = flops_by_block(original, fake_inputs(example, fake_mode), fake_mode, paths)
    after = before
    if result.changed:
        fake_mode = detect_fake_mode(example)
        after = flops_by_block(result.gm, fake_inputs(example, fake_mode), fake_mode, paths)
    ctx = result.context
    for block in result.match.blocks:
        tokens_in = ctx.tokens_in.get(block.index, block.tokens) if ctx else block.tokens
        tokens_out = ctx.tokens_in.get(block.index + 1, block.tokens) if ctx else block.tokens
        report.blocks.append(BlockRow(block.index, block.path, block.site.module_path, block.site.kind,
                                      block.tokens, tokens_in, tokens_out, before.get(block.path, 0),
                                      after.get(block.path, 0), bool(ctx) and block.index in ctx.acted_blocks))
    report.flops_other = before.get("other", 0)
    report.flops_policy = after.get("tokensparse", 0)
    return report


def _explain_language_model(report: Report, result: RewriteResult, original, example) -> Report:
    """Decoder layers as rows: tokens entering each (counted on the example, since the kept count depends
    on the data) and FLOPs, before and after."""
    match: LanguageModelMatch = result.match
    paths = [layer.path for layer in match.layers]
    queries = [layer.site.q for layer in match.layers]
    before, _ = flops_by_block_running(original, example, paths)
    after, shapes = (flops_by_block_running(result.gm, example, paths, queries) if result.changed
                     else (before, {q: (0, 0, match.sequence) for q in queries}))
    tokens = [shapes[q][2] for q in queries] + [None]
    acted = set(result.context.vlm.acted_layers) if result.context else set()
    for layer in match.layers:
        site = layer.site
        report.blocks.append(BlockRow(layer.index, layer.path, site.module_path, site.kind, match.sequence,
                                      tokens[layer.index], tokens[layer.index + 1] or tokens[layer.index],
                                      before.get(layer.path, 0), after.get(layer.path, 0), layer.index in acted))
    report.flops_other = before.get("other", 0)
    report.flops_other_after = after.get("other", 0)
    report.flops_policy = after.get("tokensparse", 0)
    if match.image_mask is not None:
        report.found.append(f"vision span: {match.span.merge.name} merges image features into {match.sequence} "
                               f"positions; {len(match.layers)} decoder layers in {match.list_path}")
    return report
