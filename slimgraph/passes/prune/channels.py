"""Channel-dependency groups: which channels of an ONNX graph must be removed together.

Every channel of every traced tensor is an element of a union-find. Tracing starts at each
prunable producer (Conv/ConvTranspose with group 1, Gemm, MatMul with a constant 2-D weight): its
output channels are new elements. Forward through the consumers, each op either

- *passes* the channels on (elementwise ops, BatchNormalization, pools, Resize, Transpose, ...):
  output position q is united with input position p, possibly with an offset (Concat, Split,
  Slice) or several positions per channel (Flatten/Reshape into a Gemm: each channel owns H*W
  features); two computed operands of Add/Mul/Sub/... are united position by position (residuals);
  depthwise and grouped Conv unite all input and output channels of one conv group;
- *consumes* them (the next Conv/Gemm/MatMul: its weight's input axis is sliced);
- or *blocks* them, with the reason (graph outputs, excluded layers, ops not understood: never
  guess). Blocks at a consumer edge can be padded back instead (`pad=True`), blocks inside the
  traced structure cannot. A graph output is never padded unless it is named in
  `prunable_outputs`: a zero put back stands for a channel that is gone, and the channels of an
  output (class logits) mean something to the user.

How each op passes, consumes or blocks the channels is one `ChannelTracer` method per op family,
looked up in a table by op type (`_channel_handlers`; an op without an entry blocks). The weight
axes of the layers come from the one layout table (`slimgraph.ir.layout`). What the pruning
surgery must change besides the weights is recorded as typed rewrite records (frozen dataclasses:
`ConvGroupRewrite`, `ShapeEntryRewrite`, `ShapeChainRewrite`, `StaticReshapeRewrite`,
`SplitRewrite`, `SliceRewrite`) and every constant a channel axis indexes as a `WeightUse` with a
`Role` (`_channel_records`). Shapes are read at fixed symbolic sizes where the graph's own are
symbolic (`_shapes`); a constant several traced nodes read is one set of channels per axis
across its readers, or blocks them (`_shared`).

A connected component is one removable channel (it may span many tensors and positions); the
components touching exactly the same tensors form a `ChannelGroup`, the unit a ratio applies to.
Concepts follow Torch-Pruning's dependency groups; this is an independent implementation on the IR.

Example:
    >>> analysis = analyze_channels(model.graph)  # doctest: +SKIP
    >>> [g.size for g in analysis.groups if g.prunable]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BadOptionError
from slimgraph.passes.prune._channel_handlers import LAYER_OPS, ChannelTracer
from slimgraph.passes.prune._channel_records import (
    Block,
    ChannelAnalysis,
    ChannelGroup,
    Member,
    Role,
    WeightUse,
)
from slimgraph.passes.prune._shapes import reshape_channel_map
from slimgraph.passes.prune._shared import shared_constant_ties

# The analysis and what it returns; the rewrite records the surgery applies are in
# `_channel_records`.
__all__ = [
    "analyze_channels",
    "ChannelAnalysis",
    "ChannelGroup",
    "Member",
    "Block",
    "WeightUse",
    "Role",
    "LAYER_OPS",
    "reshape_channel_map",
]


def analyze_channels(
    graph: ir.Graph,
    *,
    excluded: Callable[[ir.Node], bool] | None = None,
    pad: bool = False,
    opset: int | None = None,
    prunable_outputs: Sequence[str] = (),
) -> ChannelAnalysis:
    """Trace channel-dependency groups through `graph` (shapes must be inferred first).

    Args:
        graph: the main graph; constants the tracing relies on must be folded (weights, shapes).
        excluded: nodes whose channels must not change (their edges block, or pad in pad mode).
        pad: whether blocks at consumer edges (excluded or unknown consumers, graph outputs named
            in `prunable_outputs`) are padded back to full size instead of blocking the group.
        opset: the default-domain opset (decides Slice/Reduce/Softmax conventions).
        prunable_outputs: names of graph outputs whose channels may be pruned (shrunk, or padded
            back with zeros in pad mode). Every other graph output blocks its group: its channels
            mean something to the user (class logits, embedding dimensions).
    """
    if opset is None:
        opset = graph.opset_imports.get("", 13)
    outputs = {v.name for v in graph.outputs}
    unknown = [name for name in prunable_outputs if name not in outputs]
    if unknown:
        raise BadOptionError(
            f"--prune-output {unknown[0]!r} is not a graph output"
            f" (outputs: {', '.join(sorted(n for n in outputs if n))})"
        )
    tracer = ChannelTracer(
        graph, excluded or (lambda node: False), opset, pad, frozenset(prunable_outputs)
    )
    tracer.run()
    ties, shared_blocks = shared_constant_ties(
        [(use.node, use.input_index, use.axis, use.slot) for use in tracer.weight_uses]
    )
    for a, b in ties:  # a shared constant: one kept set for all its readers
        if tracer.slots[a].size == tracer.slots[b].size:
            tracer.unite(tracer.slots[a], tracer.slots[b])
    for slot_id, reason in shared_blocks:
        tracer.block(tracer.slots[slot_id], reason)
    analysis = ChannelAnalysis(
        tracer.slots, tracer.parent, tracer.weight_uses, tracer.rewrites, tracer.blocks, [], pad
    )
    analysis.groups = _build_groups(analysis, tracer.producer_of_slot)
    return analysis


def _build_groups(
    analysis: ChannelAnalysis, producer_of_slot: dict[int, ir.Node]
) -> list[ChannelGroup]:
    """Group the components by the producer outputs they touch (all touched slots if none)."""
    producing = set(producer_of_slot) | {
        use.slot for use in analysis.weight_uses if use.role is Role.PRODUCER
    }
    slot_roots = [analysis.roots_of(slot) for slot in analysis.slots]
    touched: dict[int, set[int]] = {}
    first: dict[int, int] = {}
    for slot, roots in zip(analysis.slots, slot_roots, strict=True):
        for p, root in enumerate(roots.tolist()):
            touched.setdefault(root, set()).add(slot.id)
            first.setdefault(root, slot.base + p)
    by_key: dict[frozenset[int], list[int]] = {}
    for root, slots in touched.items():
        key = frozenset(slots & producing) or frozenset(slots)
        by_key.setdefault(key, []).append(root)
    blocks_by_slot: dict[int, list[Block]] = {}
    for block in analysis.blocks:
        blocks_by_slot.setdefault(block.slot, []).append(block)
    uses_by_slot: dict[int, list[WeightUse]] = {}
    for use in analysis.weight_uses:
        uses_by_slot.setdefault(use.slot, []).append(use)
    groups: list[ChannelGroup] = []
    for _, group_roots in sorted(by_key.items(), key=lambda item: min(first[r] for r in item[1])):
        group_roots.sort(key=lambda r: first[r])
        channel = {r: i for i, r in enumerate(group_roots)}
        members, producers, consumer_nodes = [], [], []
        reasons: list[str] = []
        pads: list[Block] = []
        group_slots = sorted(set().union(*(touched[r] for r in group_roots)))
        for slot_id in group_slots:
            slot = analysis.slots[slot_id]
            index_map = np.array([channel.get(r, -1) for r in slot_roots[slot_id].tolist()])
            members.append(Member(slot.value, slot.axis, index_map))
            if slot_id in producer_of_slot:
                producers.append(producer_of_slot[slot_id])
            for use in uses_by_slot.get(slot_id, []):
                if use.role is Role.PRODUCER and use.node not in producers:
                    producers.append(use.node)
                if use.role is Role.CONSUMER and use.node not in consumer_nodes:
                    consumer_nodes.append(use.node)
            for block in blocks_by_slot.get(slot_id, []):
                if block.padable and analysis.pad:
                    pads.append(block)
                elif block.reason not in reasons:
                    reasons.append(block.reason)
        groups.append(ChannelGroup(
            len(groups), group_roots, members, producers, consumer_nodes, reasons, pads
        ))
    return groups
