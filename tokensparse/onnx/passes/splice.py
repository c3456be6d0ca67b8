"""Copy a policy graph into a model's graph after a given node, wiring its inputs to existing values."""

from __future__ import annotations

import onnx_ir as ir


def inline_graph(graph: ir.Graph, policy: ir.Model, inputs: list[ir.Value], after: ir.Node,
                 prefix: str) -> list[ir.Value]:
    """Insert copies of `policy`'s nodes after `after` (names prefixed), return its outputs' copies."""
    mapping: dict = dict(zip(policy.graph.inputs, inputs))
    for name, initializer in policy.graph.initializers.items():
        copy = ir.Value(name=prefix + name, shape=initializer.shape, type=initializer.type,
                        const_value=initializer.const_value)
        graph.register_initializer(copy)
        mapping[initializer] = copy
    nodes = []
    for node in policy.graph:
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            raise ValueError(f"policy graph node {node.name!r} holds a subgraph, which cannot be inlined")
        new = ir.Node(node.domain, node.op_type, [mapping[v] if v is not None else None for v in node.inputs],
                      attributes=list(node.attributes.values()), num_outputs=len(node.outputs),
                      name=prefix + (node.name or node.op_type), version=node.version)
        for old, value in zip(node.outputs, new.outputs):
            value.name, value.shape, value.type = prefix + old.name, old.shape, old.type
            mapping[old] = value
        nodes.append(new)
    graph.insert_after(after, nodes)
    return [mapping[value] for value in policy.graph.outputs]
