"""Small graph-rewiring helpers: op tests, bypassing a node, and the output-signature guard.

Weight and constant mechanics (layouts, constants, names, initializers) live in
`slimgraph.passes._kit`.
"""

from __future__ import annotations

import onnx_ir as ir

from slimgraph.passes._names import Names

__all__ = [
    "is_onnx_op",
    "single_consumer",
    "bypass",
    "replace_output",
    "opset_version",
    "OutputSignature",
    "output_signature",
    "restore_outputs",
]

_ONNX_DOMAINS = ("", "ai.onnx")


def is_onnx_op(node: ir.Node, *op_types: str) -> bool:
    return node.domain in _ONNX_DOMAINS and node.op_type in op_types


def single_consumer(value: ir.Value) -> ir.Node | None:
    """The only node reading `value` (exactly one use), unless `value` is also a graph output."""
    if value.is_graph_output():
        return None
    uses = list(value.uses())
    if len(uses) != 1:
        return None
    return uses[0].node


def opset_version(model_or_graph: ir.Model | ir.Graph, default: int = 1) -> int:
    graph = model_or_graph.graph if isinstance(model_or_graph, ir.Model) else model_or_graph
    return int(graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", default)))


def replace_output(old: ir.Value, new: ir.Value) -> None:
    """Make every reader of `old` (graph outputs included) read `new`.

    When `old` is a graph output, `new` takes its name, so the model's outputs keep their names.
    """
    name = old.name
    was_output = old.is_graph_output()
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if was_output and name is not None and new.name != name and not new.is_initializer():
        old.name = None
        new.name = name


def bypass(node: ir.Node, source: ir.Value, output_index: int = 0) -> None:
    """Route the readers of `node.outputs[output_index]` to `source` and drop `node`.

    If that output is a graph output and `source` is a graph input or initializer (whose name
    cannot change), an Identity is kept in its place instead.
    """
    old = node.outputs[output_index]
    graph = node.graph
    assert graph is not None
    if old.is_graph_output() and (source.is_graph_input() or source.is_initializer()):
        identity = ir.node("Identity", [source], name=node.name)
        graph.insert_after(node, identity)
        replace_output(old, identity.outputs[0])
    else:
        replace_output(old, source)
    graph.remove(node, safe=True)


# A graph output as the user sees it: its name, and its type and shape when they were known.
OutputSignature = tuple[str | None, ir.TypeProtocol | None, ir.Shape | None]


def output_signature(graph: ir.Graph) -> list[OutputSignature]:
    """The names, types and shapes of `graph`'s outputs, in order (see `restore_outputs`)."""
    return [(value.name, value.type, value.shape) for value in graph.outputs]


def restore_outputs(graph: ir.Graph, signature: list[OutputSignature]) -> bool:
    """Give `graph`'s outputs back the names (and, where lost, types) listed in `signature`.

    Exact rewrites (identity elimination, CSE, Dropout or one-input Sum removal, ...) may leave
    one value behind two outputs, or a graph input or initializer (or, in a Scan/Loop/If body, a
    value of the enclosing graph) as an output, or a renamed value. Each output position gets
    its original name back: the value is renamed when nothing else needs its name, otherwise an
    Identity carries the name (two outputs stay two names).
    Types and shapes the rewrite dropped (values made by If/Loop, say) are copied back.

    Args:
        graph: the graph after a pass, edited in place.
        signature: `output_signature(graph)` taken before the pass.

    Returns:
        True when something was changed.
    """
    if len(graph.outputs) != len(signature):
        return False  # a pass that changed the outputs on purpose (none does today)
    changed = False
    claimed: dict[int, str] = {}  # value id -> the output name it carries
    for index, (name, type_, shape) in enumerate(signature):
        value = graph.outputs[index]
        if name is None:
            continue
        if value.name == name and claimed.get(id(value), name) == name:
            claimed[id(value)] = name  # (a model may list one value twice under one name)
            _restore_type(value, type_, shape)
            continue
        producer = value.producer()
        renamable = (
            id(value) not in claimed
            and producer is not None
            and producer.graph is graph  # not a value of an enclosing graph (in a body)
            and not _needed_elsewhere(signature, value, index)
        )
        holder = _value_named(graph, name)
        if holder is not None and holder is not value:
            # Another value took the name (an inner value renamed by a rewrite): move it aside.
            if holder.is_graph_input() or holder.is_initializer():
                continue  # cannot happen in a valid graph; leave it for the checker to name
            holder.name = Names(graph).fresh(f"{name}_inner")
        if renamable:
            value.name = name
            claimed[id(value)] = name
            _restore_type(value, type_, shape)
        else:
            identity = ir.node("Identity", [value])
            identity.outputs[0].name = name
            producer = value.producer()
            if producer is not None and producer.graph is graph:
                graph.insert_after(producer, identity)
            elif len(graph):
                graph.insert_before(graph[0], identity)
            else:
                graph.append(identity)
            graph.outputs[index] = identity.outputs[0]
            _restore_type(identity.outputs[0], type_ or value.type, shape or value.shape)
        changed = True
    return changed


def _needed_elsewhere(signature: list[OutputSignature], value: ir.Value, index: int) -> bool:
    """Whether `value`'s current name is the original name of another output position."""
    for other, (name, _, _) in enumerate(signature):
        if other != index and name == value.name:
            return True
    return False


def _value_named(graph: ir.Graph, name: str) -> ir.Value | None:
    for value in graph.inputs:
        if value.name == name:
            return value
    if name in graph.initializers:
        return graph.initializers[name]
    for node in graph:
        for value in node.outputs:
            if value.name == name:
                return value
    return None


def _restore_type(value: ir.Value, type_: ir.TypeProtocol | None, shape: ir.Shape | None) -> None:
    if value.type is None and type_ is not None:
        value.type = type_
    if value.shape is None and shape is not None:
        value.shape = shape
