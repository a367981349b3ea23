"""Physical removal of channels: weights sliced, rewrite records applied, padding put back.

Given the channel components to remove, every traced tensor axis (slot) that shrinks keeps the
positions whose component stays. Each `WeightUse` on such a slot is sliced along its axis; each
rewrite record of `_channel_records` (conv groups, Reshape/Resize/Split/Slice constants) is
applied by type; in pad mode the pruned tensor is scattered back to full size (Pad by one zero,
then a constant-index Gather) at each padable edge (seed 001). Approximate in general, exact for
channels whose producing weights are zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

import slimgraph.passes.prune._channel_records as records
from slimgraph.errors import UnsupportedModelError
from slimgraph.passes._graph_utils import opset_version
from slimgraph.passes._kit import Names, add_initializer, set_constant
from slimgraph.passes.prune._channel_records import Block, ChannelAnalysis, Rewrite, Slot
from slimgraph.passes.prune._prepare import reinfer_shapes

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["remove_channels", "replace_constant"]


def remove_channels(
    model: ir.Model, analysis: ChannelAnalysis, removed_roots: set[int]
) -> dict[int, np.ndarray]:
    """Remove the channel components `removed_roots` from `model` (in place; the one analysed).

    Returns:
        The kept positions (ascending int64) of every slot that shrank, by slot id. Shapes are
        cleared and re-inferred.
    """
    kept: dict[int, np.ndarray] = {}
    for slot in analysis.slots:
        positions = analysis.kept_positions(slot, removed_roots)
        if len(positions) < slot.size:
            kept[slot.id] = positions
    surgery = _Surgery(model, analysis, kept)
    surgery.slice_weights()
    for rewrite in analysis.rewrites:
        if rewrite.slot in kept:
            surgery.apply(rewrite)
    if analysis.pad:
        surgery.insert_pads()
    reinfer_shapes(model)
    return kept


def replace_constant(
    node: ir.Node,
    index: int,
    array: np.ndarray,
    names: Names,
    also: Sequence[tuple[ir.Node, int]] = (),
) -> ir.Value:
    """Give input `index` of `node`, and each (node, input) of `also` (other readers of the same
    constant: a shared weight stays one tensor), the constant `array` (the kit's copy-on-share
    `set_constant`: a value read elsewhere too gets a `<name>_pruned` copy) and drop the old
    initializer when nothing reads it any more. Returns the value they read now."""
    old = node.inputs[index]
    base = f"{old.name}_pruned" if old is not None else None
    new = set_constant(node, index, array, base=base, names=names)
    for reader, reader_index in also:
        reader.replace_input_with(reader_index, new)
    graph = node.graph
    if old is not None and old is not new and graph is not None and old.name is not None:
        if old.is_initializer() and not old.uses() and not old.is_graph_output():
            graph.initializers.pop(old.name, None)
    return new


def _constant(node: ir.Node, index: int) -> np.ndarray:
    """A copy of constant input `index` of `node` (traced as constant by the analysis)."""
    value = node.inputs[index]
    if value is None or value.const_value is None:
        raise UnsupportedModelError(f"{node.op_type} {node.name}: input {index} is not constant")
    return value.const_value.numpy().copy()


class _Surgery:
    """One removal: the model, its channel analysis and the kept positions per shrunk slot."""

    def __init__(
        self, model: ir.Model, analysis: ChannelAnalysis, kept: dict[int, np.ndarray]
    ) -> None:
        self.model = model
        self.graph = model.graph
        self.analysis = analysis
        self.kept = kept
        self.names = Names(model.graph)  # every new value, node and initializer name

    def slice_weights(self) -> None:
        """Keep the kept positions of every weight use on a shrunk slot (all axes at once). A
        constant several traced nodes read (a shared weight) is sliced once and stays shared:
        the analysis gave all its readers one kept set per axis."""
        plans: dict[int, tuple[list[tuple[ir.Node, int]], dict[int, np.ndarray]]] = {}
        for use in self.analysis.weight_uses:
            if use.slot in self.kept:
                key = id(use.node.inputs[use.input_index])
                readers, axes = plans.setdefault(key, ([], {}))
                if (use.node, use.input_index) not in readers:
                    readers.append((use.node, use.input_index))
                axes[use.axis] = self.kept[use.slot]
        for readers, axes in plans.values():
            (node, index), *others = readers
            array = _constant(node, index)
            for axis, positions in axes.items():
                array = np.take(array, positions, axis=axis)
            replace_constant(node, index, array, self.names, others)

    def apply(self, rewrite: Rewrite) -> None:
        """Make the attribute or shape constant named by `rewrite` follow the kept count."""
        node = rewrite.node
        count = len(self.kept[rewrite.slot])
        match rewrite:
            case records.ConvGroupRewrite(out_per_group=out_per_group):
                node.attributes["group"] = ir.AttrInt64("group", count // out_per_group)
            case records.ShapeEntryRewrite(input=index, axis=axis):
                shape = _constant(node, index)
                if shape[axis] != -1:
                    shape[axis] = count
                replace_constant(node, index, shape, self.names)
            case records.StaticReshapeRewrite(axis=axis, skip=skip, dims=dims):
                shape = np.array([0] * skip + list(dims), dtype=np.int64)
                shape[axis] = count
                constant = add_initializer(
                    self.graph, f"{node.name}_shape", shape, names=self.names
                )
                node.replace_input_with(1, constant)
                node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
            case records.SliceRewrite(position=k):
                positions = self.kept[rewrite.slot]
                starts, ends = _constant(node, 1), _constant(node, 2)
                size = self.analysis.slots[rewrite.slot].size
                begin, stop, _ = slice(int(starts[k]), int(ends[k])).indices(size)
                starts[k] = int(np.sum(positions < begin))
                ends[k] = int(np.sum(positions < stop))
                replace_constant(node, 1, starts, self.names)
                replace_constant(node, 2, ends, self.names)
            case records.SplitRewrite():
                self._split_sizes(node)
            case records.ShapeChainRewrite(path=path, index=entry):
                holder, holder_index = self._private_chain(path)
                shape = _constant(holder, holder_index)
                shape.reshape(-1)[entry] = count
                replace_constant(holder, holder_index, shape, self.names)
            case _:
                raise TypeError(f"no surgery for {type(rewrite).__name__}")

    def _private_chain(self, path: Sequence[tuple[ir.Node, int]]) -> tuple[ir.Node, int]:
        """The node and input holding the constant at the end of `path` (the hops of a
        `ShapeChainRewrite`), after copying every node on it whose output others read too, so
        that changing the constant changes this Reshape's shape only."""
        reader, index = path[0]
        for hop, hop_index in path[1:]:
            value = reader.inputs[index]
            assert value is not None and value.producer() is hop
            if len(value.uses()) > 1:  # a shape computation CSE shared: this reader's own copy
                copy = ir.Node(
                    hop.domain, hop.op_type, list(hop.inputs), list(hop.attributes.values()),
                    name=self.names.fresh(f"{hop.name}_pruned"), version=hop.version,
                )  # fmt: skip
                copy.outputs[0].name = self.names.fresh(f"{value.name}_pruned")
                copy.outputs[0].type, copy.outputs[0].shape = value.type, value.shape
                self.graph.insert_after(hop, copy)
                reader.replace_input_with(index, copy.outputs[0])
                hop = copy
            reader, index = hop, hop_index
        return reader, index

    def _split_sizes(self, node: ir.Node) -> None:
        """The sizes of a Split on the channel axis: each output's kept count."""
        analysis, graph = self.analysis, self.graph
        sizes = []
        for out in node.outputs:
            slot_id = analysis.slot_index_of(out, None)
            if slot_id is None:
                raise UnsupportedModelError(f"Split {node.name}: an output is not traced")
            sizes.append(len(self.kept.get(slot_id, range(analysis.slots[slot_id].size))))
        opset = graph.opset_imports.get("", 13)
        array = np.array(sizes, dtype=np.int64)
        if opset >= 13:
            if "num_outputs" in node.attributes:
                del node.attributes["num_outputs"]
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                replace_constant(node, 1, array, self.names)
            else:
                node.resize_inputs(2)
                sizes_value = add_initializer(
                    graph, f"{node.name}_split", array, names=self.names
                )
                node.replace_input_with(1, sizes_value)
        else:
            node.attributes["split"] = ir.AttrInt64s("split", sizes)

    def insert_pads(self) -> None:
        """Scatter pruned tensors back to full size at padable edges: Pad by one zero, Gather."""
        opset = opset_version(self.model, default=13)
        padded: dict[int, ir.Value] = {}
        for block in self.analysis.blocks:
            if not block.padable or block.slot not in self.kept:
                continue
            slot = self.analysis.slots[block.slot]
            if block.slot not in padded:
                padded[block.slot] = self._pad_value(slot, self.kept[block.slot], opset)
            self._reconnect(block, slot.value, padded[block.slot])

    def _reconnect(self, block: Block, pruned: ir.Value, full: ir.Value) -> None:
        """Let the edge of `block` read `full` instead of `pruned` (a graph output: by name)."""
        if block.node is None:
            original = pruned.name
            pruned.name = self.names.fresh(f"{original}_pruned")
            full.name = original
            full.type = pruned.type
            self.graph.outputs[block.index] = full
        else:
            for index, value in enumerate(block.node.inputs):
                if value is pruned:
                    block.node.replace_input_with(index, full)

    def _pad_value(self, slot: Slot, positions: np.ndarray, opset: int) -> ir.Value:
        """`slot.value` with zeros at the removed positions of `slot.axis` (full size again)."""
        graph = self.graph
        value = slot.value
        assert value.shape is not None
        rank = len(value.shape)
        pads = [0] * (2 * rank)
        pads[rank + slot.axis] = 1
        name = value.name or "pruned"
        if opset >= 11:
            pads_array = np.array(pads, dtype=np.int64)
            pads_value = add_initializer(graph, f"{name}_pads", pads_array, names=self.names)
            pad = ir.Node("", "Pad", [value, pads_value], name=self.names.fresh(f"{name}_pad"))
        else:
            pad = ir.Node("", "Pad", [value], [ir.AttrInt64s("pads", pads)],
                          name=self.names.fresh(f"{name}_pad"))  # fmt: skip
        pad.outputs[0].name = self.names.fresh(f"{name}_padded_zero")
        index = np.full(slot.size, len(positions), dtype=np.int64)
        index[positions] = np.arange(len(positions))
        index_value = add_initializer(graph, f"{name}_scatter", index, names=self.names)
        gather = ir.Node(
            "", "Gather", [pad.outputs[0], index_value], [ir.AttrInt64("axis", slot.axis)],
            name=self.names.fresh(f"{name}_unprune"),
        )  # fmt: skip
        gather.outputs[0].name = self.names.fresh(f"{name}_full")
        producer = value.producer()
        if producer is not None:
            graph.insert_after(producer, [pad, gather])
        else:
            graph.insert_before(next(iter(graph)), [pad, gather])
        return gather.outputs[0]
