"""Constants read by several nodes: what sharing asks of channel pruning.

ALBERT runs one layer's weights in every layer: after export, one initializer (or one folded
transpose of it) feeds a MatMul per layer. Slicing it separately for each reader would store one
pruned copy per reader, and the pruned model would grow. So a shared constant is pruned once and
stays shared: every axis that several readers index is one set of channels, united position by
position across the readers' channel slots (its channels are scored over all uses and one kept
set is chosen). When a reader does not take part in the tracing (it is excluded, or the channels
do not reach it), the constant cannot shrink for the others alone: their slots are blocked, and
the report says why.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from slimgraph.ir.names import display_name

__all__ = ["shared_constant_ties"]


def shared_constant_ties(
    uses: Sequence[tuple[ir.Node, int, int, int]],
) -> tuple[list[tuple[int, int]], list[tuple[int, str]]]:
    """What sharing requires of traced constant uses.

    Args:
        uses: one (node, input index, axis, slot id) per traced use of a constant input: the
            constant `node.inputs[input index]`'s axis `axis` indexes the positions of `slot`.

    Returns:
        (ties, blocks): slot pairs whose positions must be united one by one (the same axis of
        one constant), and (slot id, reason) for slots whose constant is also read where the
        channels are not traced.
    """
    by_axis: dict[tuple[int, int], tuple[ir.Value, list[tuple[ir.Node, int, int]]]] = {}
    for node, index, axis, slot in uses:
        value = node.inputs[index]
        if value is not None:
            by_axis.setdefault((id(value), axis), (value, []))[1].append((node, index, slot))
    ties: list[tuple[int, int]] = []
    blocks: list[tuple[int, str]] = []
    for value, traced in by_axis.values():
        readers = {(u.node, u.idx) for u in value.uses()}
        if len(readers) < 2 and not value.is_graph_output():
            continue
        # every reader must index this axis with traced channels, or it cannot shrink
        untraced = readers - {(node, index) for node, index, _ in traced}
        if untraced or value.is_graph_output():
            other = min(untraced, key=lambda r: r[0].name or "")[0] if untraced else None
            where = "a graph output" if other is None else display_name(other)
            reason = f"{value.name} is shared with {where}, which is not pruned with it"
            blocks += [(slot, reason) for _, _, slot in traced]
            continue
        first = traced[0][2]
        ties += [(first, slot) for _, _, slot in traced[1:] if slot != first]
    return ties, blocks
