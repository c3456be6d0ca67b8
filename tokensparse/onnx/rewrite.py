"""rewrite_onnx (public as tokensparse.export.rewrite_onnx): token reduction for an ONNX model exported without
tokensparse, the ONNX front end's driver (match, run ONNX_PASSES, verify). The input file is only read (a model below opset 18 is upgraded in memory and written at 18); the result
is verified with ONNX Runtime before it is written."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from tokensparse.config import Config, config_from_options
from tokensparse.onnx.passes import ONNX_PASSES
from tokensparse.onnx.patterns.attention import find_attention
from tokensparse.onnx.patterns.blocks import find_blocks, find_prefix_tokens
from tokensparse.onnx.passes.context import OnnxPassContext
from tokensparse.onnx.passes.insert_policy import ONNX_NATIVE_NAMES
from tokensparse.onnx.passes.prepare import TARGET_OPSET, drop_no_op_casts, infer_shapes, upgrade_opset
from tokensparse.pipeline import check_prefix_override
from tokensparse.pipeline import MatchFailure, run_passes
from tokensparse.warn import TokensparseWarning

MIN_OPSET = TARGET_OPSET      # older models are upgraded to it first


@dataclass
class OnnxRewrite:
    """What rewrite_onnx found and did; str() is the --explain text."""

    source: str
    written: Optional[str] = None
    changed: bool = False
    reason: Optional[str] = None
    attentions: int = 0
    blocks: int = 0
    prefix_tokens: Optional[int] = None
    tokens_in: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.attentions} attention(s), {self.blocks} block(s), "
                 f"prefix tokens {self.prefix_tokens}"]
        if self.tokens_in:
            lines.append("tokens entering each block: " + " -> ".join(map(str, self.tokens_in)))
        lines += [f"  note: {note}" for note in self.notes]
        if self.changed:
            lines.append(f"wrote {self.written}")
        elif self.reason is None:
            lines.append("the rewrite matched and ran in ONNX Runtime; nothing written (no output path)")
        else:
            lines.append(f"not rewritten: {self.reason}")
        return "\n".join(lines)


def is_same_file(path: str, other: str) -> bool:
    """Whether writing `path` would write `other`: the same path, a symbolic link or a hard link to it."""
    if os.path.realpath(path) == os.path.realpath(other):
        return True
    try:
        return os.path.samefile(path, other)
    except OSError:     # one of them does not exist: not the same file
        return False


def load_onnx(path: str) -> ir.Model:
    """The model in `path` with its shapes annotated (as exported: no opset upgrade), or a
    ValueError/FileNotFoundError that says what is wrong with the file."""
    proto, _ = infer_shapes(_read_onnx(path))
    return ir.serde.deserialize_model(proto)


def _read_onnx(path: str):
    """The checked ModelProto in `path`, or a ValueError/FileNotFoundError that says what is wrong."""
    import onnx

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(path)
    except Exception as error:  # noqa: BLE001 - protobuf raises several kinds for a bad file
        raise ValueError(f"{path} is not an ONNX model ({type(error).__name__}: {error})") from error
    if not proto.graph.node:
        raise ValueError(f"{path} is not an ONNX model: it holds no graph nodes (empty or truncated file?)")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as error:
        raise ValueError(f"{path} is not a valid ONNX model: {str(error).splitlines()[0]}") from error
    return proto


def rewrite_onnx(in_path: str, out_path: Optional[str], config, explain: bool = False,
                 verify: bool = True) -> OnnxRewrite:
    """Apply config's vision policy to the ONNX model at `in_path` and write it to `out_path`. A model
    below opset 18 is upgraded in memory with onnx's version converter and written at opset 18; sizes the
    exporter left symbolic are inferred. A model that does not match is not written: the result says why
    (and one TokensparseWarning)."""
    config = config_from_options(config) if not isinstance(config, Config) else config
    if config.vision is None:
        given = next((policy.name for policy in (config.policy, config.kv) if policy is not None), "no vision policy")
        raise ValueError(f"rewrite_onnx rewrites vision transformers with {' or '.join(ONNX_NATIVE_NAMES)}; the config "
                         f"has {given} (a language model is exported with its policy by tokensparse export --model)")
    if out_path is not None and is_same_file(out_path, in_path):
        raise ValueError(f"the output {out_path} is the input file {in_path} (or a link to it): write the rewritten "
                         f"model elsewhere")
    proto = _read_onnx(in_path)
    report = OnnxRewrite(in_path)
    try:
        upgraded, report.notes = upgrade_opset(proto)
        annotated, notes = infer_shapes(upgraded)
        report.notes += notes
        model = ir.serde.deserialize_model(annotated)
        report.notes += drop_no_op_casts(model)
        _rewrite(model, config.policy, report)
        if verify:
            _verify(in_path, model, upgraded if upgraded is not proto else None)
    except MatchFailure as failure:
        report.reason = failure.reason
        if not explain:
            warnings.warn(f"tokensparse: {in_path}: {failure.reason}; nothing written", TokensparseWarning,
                          stacklevel=2)
        return report
    if out_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        ir.save(model, out_path)
        report.written, report.changed = out_path, True
    return report


def _rewrite(model: ir.Model, policy, report: OnnxRewrite) -> None:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset < MIN_OPSET:
        raise MatchFailure(f"the model uses opset {opset}; the ONNX-native rewrite needs opset >= {MIN_OPSET}")
    attentions, notes = find_attention(model)
    report.attentions, report.notes = len(attentions), report.notes + notes
    if not attentions:
        raise MatchFailure("no attention found (MatMul-Softmax-MatMul with optional scale, mask and NaN guard)")
    blocks, skipped = find_blocks(attentions)
    report.blocks, report.notes = len(blocks), report.notes + skipped
    policy.check_depth(len(blocks))
    prefix = policy.prefix_tokens
    if prefix is None:
        prefix = find_prefix_tokens(model.graph, blocks[0].tokens)
    else:
        try:
            model_prefix = find_prefix_tokens(model.graph, blocks[0].tokens)
        except MatchFailure:
            model_prefix = None         # no grid to count patches by: the override stands as given
        if model_prefix is not None:
            check_prefix_override(prefix, model_prefix, blocks[0].tokens)
    report.prefix_tokens = prefix
    if policy.is_identity(len(blocks)):
        raise MatchFailure("nothing to reduce with these options")
    ctx = OnnxPassContext(model, policy, blocks, prefix)
    model = run_passes(ONNX_PASSES, model, ctx)
    report.tokens_in, report.notes = ctx.tokens_in, report.notes + ctx.notes
    _forget_stale_shapes(ctx)
    RemoveUnusedNodesPass()(model)      # what the rewrite bypassed, and initializers nothing reads any more


def _forget_stale_shapes(ctx: OnnxPassContext) -> None:
    """Shapes annotated before the rewrite no longer hold downstream of the cut: drop them (outputs keep
    their rank with the token axis made symbolic)."""
    positions = ctx.positions()
    cut = positions[ctx.first_cut]
    outputs = set(ctx.graph.outputs)
    for node in ctx.graph:
        if positions[node] < cut or node in ctx.inserted:
            continue
        for value in node.outputs:
            if value in outputs and value.shape is not None:
                value.shape = ir.Shape([ir.SymbolicDim(f"tokens_{value.name}") if d == ctx.tokens else d
                                        for d in value.shape])
            elif value not in outputs:
                value.shape = None


def _verify(in_path: str, model: ir.Model, upgraded=None) -> None:
    """Run the original and the rewritten model in ONNX Runtime on one random batch of two: the rewrite
    must run, give finite outputs, and change output shapes only where the original had the token count.
    An opset upgrade (`upgraded`, before the rewrite) must give the original's outputs."""
    import onnxruntime

    original = onnxruntime.InferenceSession(in_path, providers=["CPUExecutionProvider"])
    rewritten = onnxruntime.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                             providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for value in original.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in value.shape]
        dtype = np.float32 if "float" in value.type else np.int64
        feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    want = original.run(None, feeds)
    if upgraded is not None:
        _check_upgrade(want, onnxruntime.InferenceSession(upgraded.SerializeToString(),
                                                          providers=["CPUExecutionProvider"]).run(None, feeds))
    try:
        got = rewritten.run(None, feeds)
    except Exception as error:  # noqa: BLE001 - report ORT's failure as the reason
        raise MatchFailure(f"the rewritten model does not run in ONNX Runtime: {error}") from error
    for index, (a, b) in enumerate(zip(want, got)):
        if a.ndim != b.ndim or not np.all(np.isfinite(b)):
            raise MatchFailure(f"output {index}: the rewritten model gives shape {b.shape} (original {a.shape}) "
                               f"or non-finite values")


def _check_upgrade(want: list, got: list) -> None:
    """The upgraded copy must compute what the original does: a converter error would be silent."""
    for index, (a, b) in enumerate(zip(want, got)):
        if a.shape != b.shape:
            raise MatchFailure(f"output {index}: the model upgraded by onnx's version converter gives shape "
                               f"{b.shape}, the original {a.shape}")
        if np.issubdtype(a.dtype, np.floating) and not np.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True):
            raise MatchFailure(f"output {index}: the model upgraded by onnx's version converter differs from the "
                               f"original by up to {np.nanmax(np.abs(a - b)):.3g}")
