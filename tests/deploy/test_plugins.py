"""Plugin nodes: to_onnx(..., plugins=True) writes one "tokensparse" node per policy step with TensorRT's
plugin attributes; the plugins' token arithmetic; a clear error without TensorRT."""

import importlib.util
import inspect
import sys
import typing

import onnx
import pytest
from onnx import helper

from tests.models import build
from tokensparse import Config, ToMe, TopK
from tokensparse.export import to_onnx
from tokensparse.deploy.trt_check import check_tensorrt
from tokensparse.deploy.trt_plugins import register_plugins, tome_merge_tokens, topk_prune_tokens


@pytest.mark.parametrize("policy, op_type, count", [(ToMe(r=3), "TomeMerge", 3),
                                                    (TopK(layers=(1,), keep=0.5, fuse=True), "TopKPrune", 1)],
                         ids=["tome", "topk"])
def test_plugin_nodes_replace_the_standard_lowering(policy, op_type, count, tmp_path):
    model, pixels = build("timm_vit", depth=3, width=32, heads=2, batch=2)
    result = to_onnx(model, (pixels,), Config(vision=policy), str(tmp_path / "m.onnx"), plugins=True)
    proto = onnx.load(result.path)
    nodes = [node for node in proto.graph.node if node.domain == "tokensparse"]
    assert [node.op_type for node in nodes] == [op_type] * count
    attributes = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attributes["plugin_namespace"] == b"tokensparse" and attributes["plugin_version"] == b"1"
    assert "TopK" not in {node.op_type for node in proto.graph.node if node.domain == ""}
    onnx.checker.check_model(proto)
    report = check_tensorrt(proto)
    assert report.ok and "tokensparse plugin node: register the plugin" in str(report)


def test_plugin_token_counts():
    assert tome_merge_tokens(197, 13) == 184
    assert topk_prune_tokens(keep=98, protected=1, fuse=1) == 100


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_register_plugins_names_what_is_missing():
    with pytest.raises(RuntimeError, match="TensorRT is not installed"):
        register_plugins()


class _Desc:
    """Stands in for tensorrt.plugin.TensorDesc: shapes as ints where TensorRT has shape expressions."""

    def __init__(self, shape, dtype):
        self.shape_expr, self.dtype = tuple(shape), dtype

    def like(self):
        copy = _Desc(self.shape_expr, self.dtype)
        copy.shape_expr = list(copy.shape_expr)
        return copy


def _checked(kind: str, name: str, function, registered: dict):
    """What tensorrt.plugin checks of a decorated function's signature, as its documentation states: the
    annotations are classes (it tells tensors from attributes by them), register() names the tensors first
    and declares its outputs, and the other functions take the tensors, some of the attributes in order,
    then `outputs` (and `stream` for impl, `tactic` for aot_impl)."""
    signature = inspect.signature(function)
    parameters = signature.parameters
    assert not any(isinstance(p.annotation, str) for p in parameters.values()), f"{name}: string annotations"
    if kind == "register":
        assert signature.return_annotation is not inspect.Signature.empty, f"{name}: register() declares no outputs"
        tensors = [n for n, p in parameters.items() if p.annotation is _Desc]
        attributes = [n for n, p in parameters.items() if p.annotation is not _Desc]
        assert list(parameters) == tensors + attributes, f"{name}: tensors must come before attributes"
        assert all(parameters[n].annotation in (int, float, bytes, bool, str) for n in attributes)
        registered[name] = (tensors, attributes)
        return
    tensors, attributes = registered[name]
    tail = {"impl": ["outputs", "stream"], "aot_impl": ["outputs", "tactic"], "autotune": ["outputs"]}[kind]
    names = list(parameters)
    if kind == "impl" and names[-1] == "tactic":
        names = names[:-1]
    assert names[:len(tensors)] == tensors and names[-len(tail):] == tail, f"{name} {kind}: {names}"
    middle = names[len(tensors):-len(tail)]
    assert middle == [n for n in attributes if n in middle], f"{name} {kind}: attributes {middle}"
    if kind == "aot_impl":
        assert len(typing.get_args(signature.return_annotation)) == 4, f"{name}: aot_impl declares no results"


def _stand_in_tensorrt(monkeypatch) -> dict:
    """Modules named tensorrt and tensorrt.plugin that record what register_plugins() registers, so that its
    own code (descriptors, ahead-of-time implementations) runs here; TensorRT itself cannot be installed."""
    import importlib.machinery
    import types

    import triton

    registry, registered = {}, {}

    def recorder(kind):
        def decorator_for(name):
            def record(function):
                _checked(kind, name, function, registered)
                registry[(kind, name)] = function
                return function
            return record
        return decorator_for

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    for dtype in ("float32", "float16", "bfloat16", "int64", "int32"):
        setattr(trt, dtype, f"trt.{dtype}")
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.register, trtp.impl, trtp.aot_impl = recorder("register"), recorder("impl"), recorder("aot_impl")
    trtp.autotune = recorder("autotune")
    trtp.AutoTuneCombination = lambda io_types, layouts: (io_types, layouts)
    trtp.TensorDesc, trtp.Tensor = _Desc, type("Tensor", (), {})
    trtp.from_shape_expr = lambda shape, dtype: _Desc(shape, dtype)
    trtp.KernelLaunchParams = type("KernelLaunchParams", (types.SimpleNamespace,), {})
    trtp.SymIntExprs = type("SymIntExprs", (list,),
                            {"__init__": lambda self, count: list.__init__(self, [None] * count)})
    trtp.SymInt32, trtp.cdiv = int, triton.cdiv
    trt.plugin = trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    return registry


def test_kernel_plugins_hand_tensorrt_a_launch_that_computes_the_merge(monkeypatch):
    """register_plugins()' descriptor and aot_impl for TomeMergeRows, called as TensorRT would: the declared
    output shapes, and the PTX, grid, block and int32 scalars it returns. Launching the kernel with exactly
    those values (under the interpreter here) gives the policy's merge."""
    import torch

    from tokensparse.deploy.kernel_plugins import MERGE_ROWS
    from tokensparse.policies.tome import bipartite_soft_matching, merge_tokens

    registry = _stand_in_tensorrt(monkeypatch)
    names = register_plugins(arch=80)
    assert names == ["tokensparse::TomeMerge", "tokensparse::TopKPrune", "tokensparse::TomeMergeRows",
                     "tokensparse::TopKSelect", "tokensparse::TopKSplit"]
    assert ("impl", "tokensparse::TomeMergeRows") not in registry  # ahead of time only: no Python at run time
    # the I/O types TensorRT may choose: every float I/O in the same one of float32, float16, bfloat16
    [(types, _)] = registry[("autotune", "tokensparse::TomeMergeRows")](*[_Desc((1,), "trt.float32")] * 5, ())
    assert [choice.split("|")[1] for choice in types.split(",")] == ["FP16", "FP16", "INT64", "INT64", "INT64",
                                                                      "FP16", "FP16"]
    generator = torch.Generator().manual_seed(0)
    x, size = torch.randn(2, 45, 70, generator=generator), torch.rand(2, 45, 1, generator=generator) + 1
    src, dst, unm = bipartite_soft_matching(torch.randn(2, 45, 8, generator=generator), 17, 1)
    inputs = tuple(t.contiguous() for t in (x, size, src, dst, unm))  # TensorRT's tensors are dense
    descs = [_Desc(t.shape, {torch.float32: "trt.float32", torch.int64: "trt.int64"}[t.dtype]) for t in inputs]
    outputs = registry[("register", "tokensparse::TomeMergeRows")](*descs, 1)
    assert [(o.shape_expr, o.dtype) for o in outputs] == [((2, 28, 70), "trt.float32"), ((2, 28, 1), "trt.float32")]
    name, ptx, params, scalars = registry[("aot_impl", "tokensparse::TomeMergeRows")](*descs, 1, outputs, 0)
    compiled = MERGE_ROWS.compile([t.dtype for t in inputs], {"protected": 1}, 80)
    assert (name, ptx) == (compiled.name, compiled.ptx) and f".entry {name}" in ptx
    assert (params.block_x, params.shared_mem) == (compiled.threads, compiled.shared_memory)
    merged, merged_size = (torch.empty(o.shape_expr) for o in outputs)
    MERGE_ROWS.kernel[(params.grid_x, params.grid_y, params.grid_z)](
        *inputs, *scalars, merged, merged_size, **MERGE_ROWS.constants({"protected": 1}))
    want, want_size = merge_tokens(x, size, src, dst, unm, 1)
    torch.testing.assert_close(merged_size, want_size)
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)


def test_topk_select_declares_k_indices_and_launches_one_program_per_row(monkeypatch):
    registry = _stand_in_tensorrt(monkeypatch)
    register_plugins()
    scores = _Desc((3, 5000), "trt.float16")
    [kept] = [registry[("register", "tokensparse::TopKSelect")](scores, 4000)]
    assert (kept.shape_expr, kept.dtype) == ((3, 4000), "trt.int64")
    name, ptx, params, scalars = registry[("aot_impl", "tokensparse::TopKSelect")](scores, 4000, (kept,), 0)
    assert (params.grid_x, params.grid_y, params.grid_z) == (3, 1, 1) and scalars == [5000, 4000]
    [(types, layouts)] = registry[("autotune", "tokensparse::TopKSelect")](scores, (kept,))
    assert (types, layouts) == ("FP32|FP16|BF16,INT64|INT64|INT64", "LINEAR")
    kept, rest = registry[("register", "tokensparse::TopKSplit")](scores, 4000)
    assert (kept.shape_expr, rest.shape_expr, rest.dtype) == ((3, 4000), (3, 1000), "trt.int64")


def test_step_plugins_declare_their_token_counts(monkeypatch):
    registry = _stand_in_tensorrt(monkeypatch)
    register_plugins()
    x, size, keys = _Desc((2, 197, 768), "trt.float16"), _Desc((2, 197, 1), "trt.float16"), _Desc((2, 12, 197, 64),
                                                                                                    "trt.float16")
    merged, merged_size = registry[("register", "tokensparse::TomeMerge")](x, size, keys, 13, 1)
    assert list(merged.shape_expr) == [2, 184, 768] and list(merged_size.shape_expr) == [2, 184, 1]
    q = _Desc((2, 12, 197, 64), "trt.float16")
    kept = registry[("register", "tokensparse::TopKPrune")](x, q, keys, 0.125, 98, 1, 1)
    assert list(kept.shape_expr) == [2, 100, 768] and ("impl", "tokensparse::TopKPrune") in registry
