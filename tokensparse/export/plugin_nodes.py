"""ONNX plugin nodes for the policy ops: instead of lowering a step to standard operators, emit one node
per step in the "tokensparse" domain, carrying plugin_namespace and plugin_version, which TensorRT's
ONNX parser resolves to a registered plugin (tokensparse/export/trt_plugins.py)."""

from __future__ import annotations

import torch
from onnxscript import values

from tokensparse.runtime.ops import TOME_MERGE, TOPK_PRUNE

PLUGIN_NAMESPACE = "tokensparse"
PLUGIN_VERSION = "1"
DOMAIN = values.Opset("tokensparse", 1)

# Plugin names (the node op_type and the TensorRT plugin registered under them).
TOME_MERGE_PLUGIN = "TomeMerge"
TOPK_PRUNE_PLUGIN = "TopKPrune"


def _register_schemas() -> None:
    """ONNX schemas for the plugin nodes, so that onnxscript can build them and checkers accept them."""
    from onnx import defs

    attribute = defs.OpSchema.Attribute
    kinds = defs.OpSchema.AttrType
    parameter = defs.OpSchema.FormalParameter
    option = defs.OpSchema.FormalParameterOption
    plugin = [attribute("plugin_namespace", kinds.STRING, "TensorRT plugin namespace"),
              attribute("plugin_version", kinds.STRING, "TensorRT plugin version")]
    schemas = [
        defs.OpSchema(TOME_MERGE_PLUGIN, DOMAIN.domain, 1, doc="ToMe merge step (tokensparse::tome_merge).",
                      inputs=[parameter("x", "T"), parameter("size", "T"), parameter("keys", "T")],
                      outputs=[parameter("merged", "T"), parameter("merged_size", "T")],
                      type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
                      attributes=[attribute("r", kinds.INT, "tokens merged"),
                                  attribute("protected", kinds.INT, "prefix tokens"), *plugin]),
        defs.OpSchema(TOPK_PRUNE_PLUGIN, DOMAIN.domain, 1, doc="Attention-rank pruning (tokensparse::topk_prune).",
                      inputs=[parameter("x", "T"), parameter("q", "T"), parameter("k", "T"),
                              parameter("attn_mask", "T", param_option=option.Optional)],
                      outputs=[parameter("kept", "T")],
                      type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
                      attributes=[attribute("scale", kinds.FLOAT, "attention scale"),
                                  attribute("keep", kinds.INT, "patch tokens kept"),
                                  attribute("protected", kinds.INT, "prefix tokens"),
                                  attribute("fuse", kinds.INT, "append the dropped tokens' mean"), *plugin]),
    ]
    for schema in schemas:
        if not defs.has(schema.name, schema.domain):
            defs.register_schema(schema)


_register_schemas()
_TOME_MERGE = DOMAIN.TomeMerge
_TOPK_PRUNE = DOMAIN.TopKPrune


def tome_merge_node(x, size, keys, r: int, protected: int):
    return _TOME_MERGE(x, size, keys, r=r, protected=protected, plugin_namespace=PLUGIN_NAMESPACE,
                            plugin_version=PLUGIN_VERSION, _outputs=2)


def topk_prune_node(x, q, k, scale: float, keep: int, protected: int, fuse: bool, attn_mask=None):
    inputs = (x, q, k) if attn_mask is None else (x, q, k, attn_mask)
    return _TOPK_PRUNE(*inputs, scale=scale, keep=keep, protected=protected, fuse=int(fuse),
                            plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)


PLUGIN_TRANSLATIONS = {TOME_MERGE: tome_merge_node, TOPK_PRUNE: topk_prune_node}


def plugin_ops_in(program: torch.export.ExportedProgram) -> int:
    return sum(1 for node in program.graph.nodes if node.target in PLUGIN_TRANSLATIONS)
