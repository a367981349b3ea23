"""Where a model keeps its tensors: the one walk over initializers and tensor attributes.

Loading (external-data checks) and saving (inlining external data) both need every tensor of a
model, in the main graph, its subgraphs, its functions and their subgraphs; this module is the
one place that knows where to look.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import onnx_ir as ir

__all__ = ["TensorSite", "tensor_sites"]

_TENSOR_ATTRS = (ir.AttributeType.TENSOR, ir.AttributeType.TENSORS)


@dataclass(frozen=True)
class TensorSite:
    """One place holding tensors: an initializer, or a TENSOR/TENSORS attribute of a node.

    Attributes:
        value: the initializer (None for an attribute).
        node: the node whose attribute it is (None for an initializer).
        key: the attribute's name (None for an initializer).
        tensors: the tensors held there (one, except for a TENSORS attribute).
    """

    value: ir.Value | None
    node: ir.Node | None
    key: str | None
    tensors: tuple[ir.TensorProtocol, ...]


def tensor_sites(model: ir.Model) -> Iterator[TensorSite]:
    """Every initializer and tensor attribute of `model`, subgraphs and functions included.

    Attribute references (`ref_attr_name` in functions) hold no tensor and are skipped. The
    attributes of a node are listed before they are yielded, so a caller may replace them.
    """
    graphs: list[ir.Graph | ir.Function] = [*model.graphs()]
    for function in model.functions.values():
        graphs.extend([function, *function.subgraphs()])
    for graph in graphs:
        if isinstance(graph, ir.Graph):
            for value in graph.initializers.values():
                if value.const_value is not None:
                    yield TensorSite(value, None, None, (value.const_value,))
        for node in graph:
            for key, attr in list(node.attributes.items()):
                if attr.is_ref() or attr.type not in _TENSOR_ATTRS:
                    continue
                items = attr.value if isinstance(attr.value, (list, tuple)) else [attr.value]
                yield TensorSite(None, node, key, tuple(items))
