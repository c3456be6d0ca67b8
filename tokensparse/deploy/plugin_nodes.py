"""ONNX plugin nodes for the policy ops, in the "tokensparse" domain, carrying plugin_namespace and
plugin_version, which TensorRT's ONNX parser resolves to a registered plugin (tokensparse/deploy/trt_plugins.py).
Two ways to cut a policy step into plugins:
- "step": one node per policy step (TomeMerge, TopKPrune). Its TensorRT plugin runs the step's CUDA op
  from Python, so the engine needs Python at run time.
- "kernel": one node per Triton kernel (TomeMergeRows: ToMe's merge for matches the graph made;
  TopKSelect: top-k indices for any k; TopKSplit: those and the other indices, for ToMe's r best edges),
  the rest of the step in standard operators. Each plugin has an
  ahead-of-time implementation (PTX in the engine), so the engine runs from C++ alone."""

from __future__ import annotations

from onnxscript import values

from tokensparse.runtime.ops import MERGE_MATCHES, SELECT_TOP_K, SPLIT_TOP_K, TOME_MERGE, TOPK_PRUNE

PLUGIN_NAMESPACE = "tokensparse"
PLUGIN_VERSION = "1"
DOMAIN = values.Opset("tokensparse", 1)

# Plugin names (the node op_type and the TensorRT plugin registered under them).
TOME_MERGE_PLUGIN = "TomeMerge"
TOPK_PRUNE_PLUGIN = "TopKPrune"
MERGE_ROWS_PLUGIN = "TomeMergeRows"
TOPK_SELECT_PLUGIN = "TopKSelect"
TOPK_SPLIT_PLUGIN = "TopKSplit"
PLUGIN_MODES = ("step", "kernel")


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
        defs.OpSchema(MERGE_ROWS_PLUGIN, DOMAIN.domain, 1, doc="ToMe's merge for given matches (one kernel).",
                      inputs=[parameter("x", "T"), parameter("size", "T"), parameter("src_idx", "I"),
                              parameter("dst_idx", "I"), parameter("unm_idx", "I")],
                      outputs=[parameter("merged", "T"), parameter("merged_size", "T")],
                      type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                                        ("I", ["tensor(int64)"], "")],
                      attributes=[attribute("protected", kinds.INT, "prefix tokens"), *plugin]),
        defs.OpSchema(TOPK_SELECT_PLUGIN, DOMAIN.domain, 1, doc="Indices of the k best scores in token order.",
                      inputs=[parameter("scores", "T")], outputs=[parameter("kept", "I")],
                      type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                                        ("I", ["tensor(int64)"], "")],
                      attributes=[attribute("k", kinds.INT, "indices kept per row"), *plugin]),
        defs.OpSchema(TOPK_SPLIT_PLUGIN, DOMAIN.domain, 1, doc="The k best scores' indices and the others, "
                                                              "each in token order.",
                      inputs=[parameter("scores", "T")], outputs=[parameter("kept", "I"), parameter("rest", "I")],
                      type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                                        ("I", ["tensor(int64)"], "")],
                      attributes=[attribute("k", kinds.INT, "indices kept per row"), *plugin]),
    ]
    for schema in schemas:
        if not defs.has(schema.name, schema.domain):
            defs.register_schema(schema)


_register_schemas()
_TOME_MERGE = DOMAIN.TomeMerge
_TOPK_PRUNE = DOMAIN.TopKPrune
_MERGE_ROWS = DOMAIN.TomeMergeRows
_TOPK_SELECT = DOMAIN.TopKSelect
_TOPK_SPLIT = DOMAIN.TopKSplit


def tome_merge_node(x, size, keys, r: int, protected: int):
    return _TOME_MERGE(x, size, keys, r=r, protected=protected, plugin_namespace=PLUGIN_NAMESPACE,
                            plugin_version=PLUGIN_VERSION, _outputs=2)


def topk_prune_node(x, q, k, scale: float, keep: int, protected: int, fuse: bool, attn_mask=None):
    inputs = (x, q, k) if attn_mask is None else (x, q, k, attn_mask)
    return _TOPK_PRUNE(*inputs, scale=scale, keep=keep, protected=protected, fuse=int(fuse),
                            plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)


def merge_rows_node(x, size, src_idx, dst_idx, unm_idx, protected: int):
    return _MERGE_ROWS(x, size, src_idx, dst_idx, unm_idx, protected=protected, plugin_namespace=PLUGIN_NAMESPACE,
                       plugin_version=PLUGIN_VERSION, _outputs=2)


def topk_select_node(scores, k: int):
    return _TOPK_SELECT(scores, k=k, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)


def topk_split_node(scores, k: int):
    return _TOPK_SPLIT(scores, k=k, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION, _outputs=2)


PLUGIN_TRANSLATIONS = {TOME_MERGE: tome_merge_node, TOPK_PRUNE: topk_prune_node}
KERNEL_PLUGIN_TRANSLATIONS = {MERGE_MATCHES: merge_rows_node, SELECT_TOP_K: topk_select_node,
                              SPLIT_TOP_K: topk_split_node}
STEP_PLUGINS = (TOME_MERGE_PLUGIN, TOPK_PRUNE_PLUGIN)
KERNEL_PLUGINS = (MERGE_ROWS_PLUGIN, TOPK_SELECT_PLUGIN, TOPK_SPLIT_PLUGIN)


def plugin_mode(plugins) -> str | None:
    """None (standard operators only), "step" or "kernel"; True means "step"."""
    if plugins is None or plugins is False:
        return None
    if plugins is True:
        return "step"
    if plugins not in PLUGIN_MODES:
        raise ValueError(f"plugins={plugins!r} is not one of {PLUGIN_MODES} (or True for 'step', False for none)")
    return plugins


def plugin_translations(mode) -> dict:
    """The ONNX translations that write a mode's plugin nodes."""
    return {None: {}, "step": PLUGIN_TRANSLATIONS, "kernel": KERNEL_PLUGIN_TRANSLATIONS}[mode]
