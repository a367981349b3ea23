"""An operand's chain back from the attention core: data movement, scales, rotary embeddings
and key/value caches, one `Link` per step (`trace`), and the layout at its end (`layout_along`).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes.transformer._cache import KVCache, grow, past_concat
from slimgraph.passes.transformer._layout import Layout, LayoutError, is_move, step
from slimgraph.passes.transformer._rotary import Rotary, match_rotary
from slimgraph.passes.transformer._symbolic import ShapeInfo, scalar

__all__ = ["Link", "trace", "layout_along"]

_MAX_CHAIN = 40


@dataclasses.dataclass
class Link:
    """One step of an operand's chain: a data movement ("move"), a scalar scale ("scale"), a
    rotary embedding in plain ops ("rotary") or as onnxruntime's op ("rotary-op"), or the
    concatenation of past and new keys/values of a cache ("cache": `source` is the new part,
    `past` the graph input; `layout_along` records the concatenation in `cache`)."""

    kind: str
    node: ir.Node
    value: ir.Value  # the link's output (toward the core)
    source: ir.Value  # the link's data input (away from the core)
    factor: float = 1.0
    rotary: Rotary | None = None
    past: ir.Value | None = None
    cache: KVCache | None = None


def trace(value: ir.Value, shapes: ShapeInfo, *, cache: bool = False) -> list[Link]:
    """The links from `value` back toward its source, nearest first; with `cache`, through a
    `Concat(past, new)` of a key/value cache to the new part (once)."""
    links: list[Link] = []
    current = value
    for _ in range(_MAX_CHAIN):
        node = current.producer()
        if node is None:
            break
        joined = past_concat(node) if cache else None
        if joined is not None and not any(link.kind == "cache" for link in links):
            links.append(Link("cache", node, current, joined[1], past=joined[0]))
            current = joined[1]
            continue
        if is_move(node) and node.inputs[0] is not None:
            links.append(Link("move", node, current, node.inputs[0]))
            current = node.inputs[0]
            continue
        if node.domain == "com.microsoft" and node.op_type == "RotaryEmbedding" and (
                node.inputs[0] is not None):
            links.append(Link("rotary-op", node, current, node.inputs[0]))
            current = node.inputs[0]
            continue
        if is_onnx_op(node, "Mul", "Div"):
            data = None
            for i in ((0, 1) if node.op_type == "Mul" else (0,)):
                factor = scalar(node.inputs[1 - i])
                rank = shapes.rank(node.inputs[1 - i])
                if factor is not None and node.inputs[i] is not None and (
                        rank is None or rank <= (shapes.rank(node.inputs[i]) or 0)):
                    data = node.inputs[i]
                    factor = 1.0 / factor if node.op_type == "Div" else factor
                    break
            if data is not None and factor is not None:
                links.append(Link("scale", node, current, data, factor=factor))
                current = data
                continue
        rotated = match_rotary(current, shapes)
        if rotated is not None:
            links.append(Link("rotary", node, current, rotated[0], rotary=rotated[1]))
            current = rotated[0]
            continue
        break
    return links


def layout_along(value: ir.Value, links: list[Link], upto: int, shapes: ShapeInfo) -> Layout:
    """Layout of `value` (the end of `links`) relative to the input of `links[upto - 1]`
    (upto=0: relative to itself).

    Raises:
        LayoutError: a move the layout cannot express.
    """
    start = links[upto - 1].source if upto else value
    dims = shapes.shape(start)
    if dims is None:
        raise LayoutError("shape unknown")
    layout = Layout.identity(dims)
    for link in reversed(links[:upto]):
        if link.kind == "move":
            layout = step(layout, link.node, link.value, shapes)
        elif link.kind == "cache":
            assert link.past is not None
            layout, grown, past_length, total = grow(layout, link.node, shapes)
            axis = link.node.attributes.get_int("axis", 0) % layout.rank
            link.cache = KVCache(link.past, link.value, link.node, axis, past_length, total,
                                 layout, grown)
        elif link.kind == "rotary":
            assert link.rotary is not None
            link.rotary.cos_layout = layout
    return layout
