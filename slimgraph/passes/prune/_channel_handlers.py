"""How channels cross each op: the tracer's walk from the producers and its per-op handlers.

`ChannelTracer` builds the union-find over channel positions: it opens the output channels of
each prunable producer (`LAYER_OPS` with a constant weight; axes from `slimgraph.ir.layout`) and
follows the consumers, one method per op family looked up by op type in `_HANDLERS` (an op
without an entry blocks). Each handler passes the channels on, consumes them, or returns why
not. `slimgraph.passes.prune.channels.analyze_channels` runs it and builds the groups.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.ir import display_name
from slimgraph.ir.layout import LAYOUTS, layout
from slimgraph.passes.prune._channel_records import (
    Block,
    ConvGroupRewrite,
    Rewrite,
    Role,
    ShapeChainRewrite,
    ShapeEntryRewrite,
    SliceRewrite,
    Slot,
    SplitRewrite,
    StaticReshapeRewrite,
    WeightUse,
    constant_of,
    find_root,
)
from slimgraph.passes.prune._shapes import dims, reshape_channel_map, shape_entry, static_dim

__all__ = ["LAYER_OPS", "ChannelTracer"]

# Ops that act on every element alone: channels pass unchanged through input 0.
_UNARY = frozenset(
    {
        "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu", "Erf", "Tanh",
        "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "Swish", "ThresholdedRelu", "Abs",
        "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin",
        "Cos", "Identity", "Cast", "Not", "IsNaN", "IsInf", "Shrink",
    }
)  # fmt: skip
# Elementwise ops with broadcasting over several operands.
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu"})
# Ops that keep channel axis 1 and only touch the spatial axes.
_SPATIAL = frozenset(
    {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
)
# What the second output of an op that keeps the channels in place is (it must be unused).
_SECOND_OUTPUT = {"Dropout": "mask", "MaxPool": "indices output"}
_REDUCE = frozenset(
    {
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    }
)  # fmt: skip
# Layers: ops whose weight has an output- and an input-channel axis (Conv, ConvTranspose, Gemm,
# MatMul). The tracer opens their output channels and consumes their input channels.
LAYER_OPS = frozenset(
    op for op, found in LAYOUTS.items() if found.out_axis is not None and found.in_axis is not None
)
# Reduce ops whose axes moved from an attribute to input 1 at this opset.
_REDUCE_AXES_INPUT_SINCE = {"ReduceSum": 13}


def _known(dims: Sequence[int | ir.SymbolicDim]) -> list[int] | None:
    """`dims` as integers, or None when any of them is symbolic."""
    known = [d for d in dims if isinstance(d, int)]
    return known if len(known) == len(dims) else None


def _static_dims_from(value: ir.Value | None, start: int) -> list[int] | None:
    """The dims of `value` from axis `start` on, if all are known integers."""
    found = dims(value)
    return None if found is None else _known(found[start:])


def _common_prefix_dims(
    source: ir.Value | None, target: ir.Value | None, axis: int, *, own: bool = False
):
    """Static dims of `source` and `target` after their common leading dims (symbolic batch).

    Dims are those `_shapes.dims` reads (static at fixed symbolic sizes where
    recorded), or with `own` the values' own shapes. Returns (source dims, target dims, number
    of dims skipped); dims are None when unknown.
    """
    shape_of = (lambda v: None if v.shape is None else list(v.shape)) if own else dims
    a = shape_of(source) if source is not None else None
    b = shape_of(target) if target is not None else None
    if a is None or b is None:
        return None, None, 0
    skip = 0
    while skip < min(len(a), len(b), axis) and a[skip] == b[skip]:
        skip += 1
    rest_a, rest_b = _known(a[skip:]), _known(b[skip:])
    if rest_a is None or rest_b is None:
        return None, None, skip
    return rest_a, rest_b, skip


def _rank(value: ir.Value | None) -> int | None:
    found = dims(value)
    return None if found is None else len(found)


def _dim(value: ir.Value | None, axis: int) -> int | None:
    return static_dim(value, axis)


def _int_list(node: ir.Node, attr: str, input_index: int | None) -> list[int] | None:
    """An int list given either as attribute `attr` or as constant input `input_index`."""
    if attr in node.attributes:
        return [int(x) for x in node.attributes.get_ints(attr, [])]
    if input_index is not None and input_index < len(node.inputs):
        array = constant_of(node.inputs[input_index])
        if array is not None:
            return [int(x) for x in np.asarray(array).reshape(-1)]
    return None


class _Stop(Exception):
    """A consumer edge the channels cannot be followed through (message: the reason)."""


def _data_rank(node: ir.Node, index: int, what: str) -> int:
    """The rank of input 0 of `node` (Split, Slice, Reduce*), which must carry the channels.

    Raises:
        _Stop: the channels arrive on another input (read as `what`), or the rank is unknown.
    """
    where = f"{node.op_type} {node.name}"
    if index != 0:
        raise _Stop(f"{where} reads the channels as {what}")
    rank = _rank(node.inputs[0])
    if rank is None:
        raise _Stop(f"{where} has an unknown rank")
    return rank


def _weight_axes(node: ir.Node) -> tuple[int, int] | None:
    """(output, input) channel axes of the constant weight of a Conv, ConvTranspose, Gemm or
    MatMul (2-D weight), from `slimgraph.ir.layout`; None for other ops or a computed weight."""
    found = layout(node)
    if found is None or node.op_type not in LAYER_OPS or found.weight >= len(node.inputs):
        return None
    weight = constant_of(node.inputs[found.weight])
    if weight is None or (node.op_type == "MatMul" and weight.ndim != 2):
        return None
    assert found.out_axis is not None and found.in_axis is not None
    return found.out_axis, found.in_axis


class ChannelTracer:
    """Builds the union-find over channel positions by a forward walk from the producers."""

    def __init__(
        self,
        graph: ir.Graph,
        excluded: Callable[[ir.Node], bool],
        opset: int,
        pad: bool,
        prunable_outputs: frozenset[str] = frozenset(),
    ) -> None:
        self.graph = graph
        self.prunable_outputs = prunable_outputs
        self.excluded = excluded
        self.opset = opset
        self.pad = pad
        self.slots: list[Slot] = []
        self.slot_index: dict[tuple[int, int], int] = {}
        self.parent: list[int] = []
        self.weight_uses: list[WeightUse] = []
        self.rewrites: list[Rewrite] = []
        self.blocks: list[Block] = []
        self.queue: deque[int] = deque()
        self.producer_of_slot: dict[int, ir.Node] = {}
        self.outputs = {id(v): i for i, v in enumerate(graph.outputs)}

    # -- union-find -------------------------------------------------------------------------
    def find(self, element: int) -> int:
        return find_root(self.parent, element)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    # -- slots --------------------------------------------------------------------------------
    def slot(self, value: ir.Value, axis: int, size: int, origin: str | None) -> Slot:
        """The slot of (value, axis), created and queued when new; origin set when known."""
        key = (id(value), axis)
        if key in self.slot_index:
            existing = self.slots[self.slot_index[key]]
            if existing.origin is None and origin is not None:
                existing.origin = origin
            if existing.size != size:
                self.block(existing, f"{value.name} traced with {size} and {existing.size} ch")
            return existing
        slot = Slot(len(self.slots), value, axis, size, len(self.parent), origin)
        self.parent.extend(range(slot.base, slot.base + size))
        self.slots.append(slot)
        self.slot_index[key] = slot.id
        self.queue.append(slot.id)
        return slot

    def block(self, slot: Slot, reason: str, node: ir.Node | None = None, index: int = -1,
              padable: bool = False) -> None:  # fmt: skip
        self.blocks.append(Block(slot.id, reason, padable, node, index))

    def unite(self, a: Slot, b: Slot, positions: np.ndarray | None = None, offset: int = 0) -> None:
        """Unite position p of `a` with `positions[p]` (or p + offset) of `b`."""
        for p in range(a.size):
            if positions is None:
                self.union(a.base + p, b.base + p + offset)
            else:
                for q in np.atleast_1d(positions[p]):
                    self.union(a.base + p, b.base + int(q))

    def passthrough(self, slot: Slot, node: ir.Node, out: ir.Value, axis: int) -> Slot:
        """Output `out` holds the same channels at `axis` (raises `_Stop` on a mismatch)."""
        size = _dim(out, axis)
        if size is not None and size != slot.size:
            raise _Stop(f"{node.op_type} {node.name} changes the channel count")
        target = self.slot(out, axis, slot.size, f"{node.op_type} {node.name}")
        self.unite(slot, target)
        return target

    def use(self, node: ir.Node, index: int, axis: int, slot: Slot, role: Role) -> None:
        self.weight_uses.append(WeightUse(node, index, axis, slot.id, role))

    # -- walk -----------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.graph:
            self.start(node)
        while self.queue:
            slot = self.slots[self.queue.popleft()]
            self.visit(slot)
        for slot in self.slots:
            if slot.origin is None:
                source = slot.value.producer()
                where = f"{source.op_type} {source.name}" if source else "a graph input"
                self.block(slot, f"{slot.value.name} comes from {where}, which is not traced")

    def start(self, node: ir.Node) -> None:
        """Open a slot for the output channels of a prunable producer."""
        if node.domain not in ("", "ai.onnx") or self.excluded(node):
            return
        op = node.op_type
        inputs = list(node.inputs)
        weight = constant_of(inputs[1]) if len(inputs) > 1 else None
        if weight is None or not node.outputs:
            return
        out = node.outputs[0]
        label = f"{op} {node.name}"
        axes = _weight_axes(node)
        if axes is None:
            return
        if op in ("Conv", "ConvTranspose"):
            if node.attributes.get_int("group", 1) != 1 or weight.ndim < 3:
                return
            out_axis = 1
        elif weight.ndim != 2:
            return
        elif op == "Gemm":
            out_axis = 1
        else:  # MatMul: the channels are the last axis of the product
            rank = _rank(out) or _rank(inputs[0])
            if rank is None or rank < 2:
                return
            out_axis = rank - 1
        slot = self.slot(out, out_axis, weight.shape[axes[0]], label)
        self.use(node, 1, axes[0], slot, Role.PRODUCER)
        if op != "MatMul" and len(inputs) > 2 and inputs[2] is not None:
            self.bias(node, 2, slot)
        self.producer_of_slot[slot.id] = node

    def bias(self, node: ir.Node, index: int, slot: Slot) -> None:
        bias = constant_of(node.inputs[index])
        if bias is None:
            self.block(slot, f"{node.op_type} {node.name} has a computed bias")
        elif bias.ndim >= 1 and bias.shape[-1] == slot.size:
            self.use(node, index, bias.ndim - 1, slot, Role.BIAS)
        elif bias.size != 1 and (bias.ndim == 0 or bias.shape[-1] != 1):
            self.block(slot, f"{node.op_type} {node.name} has a bias of shape {bias.shape}")

    def visit(self, slot: Slot) -> None:
        value = slot.value
        if value.is_graph_output() and value.name not in self.prunable_outputs:
            # the channels of a graph output mean something to the user (class logits, an
            # embedding): never pruned, and never padded back as zeros, unless named explicitly
            self.block(slot, f"{value.name} is a graph output", None,
                       self.outputs.get(id(value), -1), padable=False)  # fmt: skip
        elif value.is_graph_output() and self.pad:
            self.block(slot, f"{value.name} is a graph output named to prune", None,
                       self.outputs.get(id(value), -1), padable=True)  # fmt: skip
        for use in value.uses():
            node, index = use.node, use.idx
            if node.graph is not self.graph:
                self.block(slot, f"{value.name} is read inside a subgraph", node, index)
                continue
            if self.excluded(node):
                self.block(slot, f"{display_name(node)} is excluded", node, index, padable=True)
                continue
            try:
                reason = self.follow(slot, node, index)
            except _Stop as stop:
                reason = str(stop)
            if reason:
                self.block(slot, reason, node, index, padable=True)

    def follow(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        """Handle one consumer edge; returns a reason when the channels cannot be followed.

        The op's handler comes from `_HANDLERS`; an op without one blocks the channels.
        """
        where = f"{node.op_type} {node.name}"
        if node.domain in ("", "ai.onnx"):
            handler = _HANDLERS.get(node.op_type)
        elif node.domain == "com.microsoft":
            handler = _MS_HANDLERS.get(node.op_type)
        else:
            handler = None
        if not node.outputs:
            return f"{where} has no output"
        if handler is None and node.domain not in ("", "ai.onnx"):
            return f"{where} ({node.domain}) is not understood"
        if handler is None:
            return f"{where} is not understood"
        return handler(self, slot, node, index)

    # -- channel handlers, one per op family (registered in `_HANDLERS`) ---------------------------
    def in_place(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        """Ops that keep the channels where they are: elementwise on input 0 (activations,
        Clip, Dropout) and pools (channel axis 1, only the spatial axes change). A second output
        (Dropout's mask, MaxPool's indices) must be unused."""
        where = f"{node.op_type} {node.name}"
        if index != 0:
            return f"{where} reads the channels as a parameter"
        if node.op_type in _SPATIAL and slot.axis != 1:
            return f"{where} pools over the channel axis"
        if len(node.outputs) > 1 and node.outputs[1].uses():
            return f"{where} uses its {_SECOND_OUTPUT.get(node.op_type, 'second output')}"
        self.passthrough(slot, node, node.outputs[0], slot.axis)
        return None

    def normalization(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        """BatchNormalization/InstanceNormalization on axis 1: per-channel parameters sliced."""
        where = f"{node.op_type} {node.name}"
        inputs = list(node.inputs)
        if index != 0 or slot.axis != 1:
            return f"{where} normalizes another axis"
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return f"{where} runs in training mode"
        params = range(1, min(5 if node.op_type == "BatchNormalization" else 3, len(inputs)))
        if any(constant_of(inputs[i]) is None for i in params):
            return f"{where} has computed parameters"
        target = self.passthrough(slot, node, node.outputs[0], slot.axis)
        for i in params:
            self.use(node, i, 0, target, Role.BN_SCALE if i == 1 else Role.PARAM)
        return None

    def layer_norm(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        """LayerNormalization: channels pass when they sit before the normalized axes."""
        where = f"{node.op_type} {node.name}"
        rank = _data_rank(node, index, "a scale or bias")
        if slot.axis >= node.attributes.get_int("axis", -1) % rank:
            return f"{where} normalizes over the channels"
        if any(o.uses() for o in node.outputs[1:]):
            return f"{where} uses its mean or inverse deviation"
        self.passthrough(slot, node, node.outputs[0], slot.axis)
        return None

    def resize(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        """Resize/Upsample: channels pass; constant `sizes` get the kept count."""
        where = f"{node.op_type} {node.name}"
        inputs = list(node.inputs)
        if index != 0:
            return f"{where} reads the channels as scales"
        sizes = node.op_type == "Resize" and len(inputs) > 3 and inputs[3] is not None
        if sizes and constant_of(inputs[3]) is None:
            return f"{where} has computed sizes"
        target = self.passthrough(slot, node, node.outputs[0], slot.axis)
        if sizes:
            self.rewrites.append(ShapeEntryRewrite(node, target.id, 3, slot.axis))
        return None

    def gemm_input(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        """Gemm reading the channels on its K axis: the weight's input axis is sliced."""
        where = f"{node.op_type} {node.name}"
        if index != 0:
            return f"{where} multiplies two computed tensors"
        axes = _weight_axes(node)
        if axes is None:
            return f"{where} has a computed weight"
        trans_a = node.attributes.get_int("transA", 0)
        if slot.axis != (0 if trans_a else 1):
            return f"{where} reads the channels on its M axis"
        self.use(node, 1, axes[1], slot, Role.CONSUMER)
        return None

    def matmul_input(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        """MatMul by a constant matrix: K axis consumed, batch axes passed through."""
        where = f"{node.op_type} {node.name}"
        axes = _weight_axes(node)
        rank = _rank(node.inputs[0])
        if index != 0 or axes is None or rank is None:
            return f"{where} multiplies two computed tensors"
        if slot.axis == rank - 1:
            self.use(node, 1, axes[1], slot, Role.CONSUMER)
            return None
        if slot.axis < rank - 2 or (slot.axis == rank - 2 and rank > 2):
            self.passthrough(slot, node, node.outputs[0], slot.axis)
            return None
        return f"{where} reads the channels on its row axis"

    def transpose(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        perm = node.attributes.get_ints("perm", None)
        if perm is None:
            rank = _rank(node.inputs[0])
            if rank is None:
                return f"{node.op_type} {node.name} has an unknown rank"
            perm = list(reversed(range(rank)))
        self.passthrough(slot, node, node.outputs[0], list(perm).index(slot.axis))
        return None

    def gather(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        """Gather/GatherND with constant indices on other axes than the channels' (the window
        gathers torch exports for an adaptive pool whose size does not divide the input): the
        channels pass, moved by the axes the indices replace."""
        where = f"{node.op_type} {node.name}"
        if index != 0:
            return f"{where} reads the channels as indices"
        indices = constant_of(node.inputs[1]) if len(node.inputs) > 1 else None
        rank = _rank(node.inputs[0])
        if indices is None or rank is None:
            return f"{where} gathers computed indices"
        if node.op_type == "Gather":
            axis = node.attributes.get_int("axis", 0) % rank
            if slot.axis == axis:
                return f"{where} selects channels"
            shift = indices.ndim - 1 if slot.axis > axis else 0
            self.passthrough(slot, node, node.outputs[0], slot.axis + shift)
            return None
        batch_dims = node.attributes.get_int("batch_dims", 0)
        depth = indices.shape[-1] if indices.ndim else 0
        if batch_dims <= slot.axis < batch_dims + depth:
            return f"{where} selects channels"
        out_axis = slot.axis
        if slot.axis >= batch_dims + depth:  # after the gathered axes: indices' leading dims
            out_axis = indices.ndim - 1 + slot.axis - batch_dims - depth
        self.passthrough(slot, node, node.outputs[0], out_axis)
        return None

    def reshape_input(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        if index != 0:
            return f"{node.op_type} {node.name} reads the channels as a shape"
        return self.reshape(slot, node)

    def softmax(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        """Softmax-like ops: channels pass unless they are the normalized axis."""
        where = f"{node.op_type} {node.name}"
        rank = _rank(node.inputs[0])
        default = -1 if self.opset >= 13 else 1
        softmax_axis = node.attributes.get_int("axis", default)
        if rank is None:
            return f"{where} has an unknown rank"
        softmax_axis %= rank
        if self.opset < 13 and softmax_axis <= slot.axis:
            return f"{where} normalizes over the channels"
        if softmax_axis == slot.axis:
            return f"{where} normalizes over the channels"
        self.passthrough(slot, node, node.outputs[0], slot.axis)
        return None

    def elementwise(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        """Broadcasting ops: constants sliced per channel, computed operands coupled."""
        where = f"{node.op_type} {node.name}"
        out = node.outputs[0]
        out_rank = _rank(out)
        in_rank = _rank(node.inputs[index])
        if out_rank is None or in_rank is None:
            return f"{where} has unknown ranks"
        out_axis = slot.axis + out_rank - in_rank
        if node.op_type == "Pow" and index != 0:
            return f"{where} uses the channels as exponents"
        constants, coupled = [], []  # decide every operand first: a refusal changes nothing
        for other_index, other in enumerate(node.inputs):
            if other_index == index or other is None or other is node.inputs[index]:
                continue
            rank = _rank(other)
            if rank is None:
                return f"{where} has an operand of unknown rank"
            other_axis = out_axis - (out_rank - rank)
            if other_axis < 0:
                continue  # broadcast over the channel axis
            array = constant_of(other)
            size = array.shape[other_axis] if array is not None else _dim(other, other_axis)
            if size == 1:
                continue
            if size != slot.size:
                return f"{where} broadcasts {other.name} against {slot.size} channels"
            if array is not None:
                constants.append((other_index, other_axis))
            else:
                coupled.append((other, other_axis))
        target = self.passthrough(slot, node, out, out_axis)
        for other_index, other_axis in constants:
            self.use(node, other_index, other_axis, target, Role.PARAM)
        for other, other_axis in coupled:
            self.unite(target, self.slot(other, other_axis, slot.size, None))
        return None

    def conv_input(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        """Conv/ConvTranspose input: consumed (group 1) or coupled per conv group (grouped)."""
        where = f"{node.op_type} {node.name}"
        inputs = list(node.inputs)
        weight = constant_of(inputs[1]) if len(inputs) > 1 else None
        axes = _weight_axes(node)
        if index != 0 or weight is None or axes is None:
            return f"{where} has a computed weight"
        if slot.axis != 1:
            return f"{where} reads the channels on a non-channel axis"
        group = node.attributes.get_int("group", 1)
        if group == 1:
            self.use(node, 1, axes[1], slot, Role.CONSUMER)
            return None
        if node.op_type != "Conv":
            return f"{where} is a grouped ConvTranspose"
        out = node.outputs[0]
        c_out = weight.shape[0]
        if slot.size % group or c_out % group:
            return f"{where} has {group} groups for {slot.size} channels"
        in_per, out_per = slot.size // group, c_out // group
        target = self.slot(out, 1, c_out, f"{node.op_type} {node.name}")
        for g in range(group):
            first = slot.base + g * in_per
            for p in range(in_per):
                self.union(first, slot.base + g * in_per + p)
            for q in range(out_per):
                self.union(first, target.base + g * out_per + q)
        self.use(node, 1, axes[0], target, Role.PRODUCER)
        if len(inputs) > 2 and inputs[2] is not None:
            self.bias(node, 2, target)
        self.rewrites.append(ConvGroupRewrite(node, target.id, out_per))
        return None

    def concat(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        where = f"Concat {node.name}"
        out = node.outputs[0]
        rank = _rank(out)
        if rank is None:
            return f"{where} has an unknown rank"
        concat_axis = node.attributes.get_int("axis", 0) % rank
        if concat_axis != slot.axis:
            target = self.passthrough(slot, node, out, slot.axis)
            for other in node.inputs:
                if other is not None and other is not slot.value:
                    self.unite(target, self.slot(other, slot.axis, slot.size, None))
            return None
        sizes = [_dim(v, concat_axis) for v in node.inputs]
        total = _dim(out, concat_axis)
        if any(s is None for s in sizes) or total is None:
            return f"{where} has inputs of unknown size on the channel axis"
        target = self.slot(out, concat_axis, total, f"Concat {node.name}")
        offsets = np.cumsum([0, *sizes])
        for i, value in enumerate(node.inputs):
            if value is slot.value:
                self.unite(slot, target, offset=int(offsets[i]))
        return None

    def split(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        where = f"Split {node.name}"
        rank = _data_rank(node, index, "split sizes")
        split_axis = node.attributes.get_int("axis", 0) % rank
        if split_axis != slot.axis:
            for out in node.outputs:
                self.passthrough(slot, node, out, slot.axis)
            return None
        found = [_dim(o, split_axis) for o in node.outputs]
        sizes = [size for size in found if size is not None]
        if len(sizes) < len(found) or sum(sizes) != slot.size:
            return f"{where} has outputs of unknown size"
        start = 0
        for k, (out, size) in enumerate(zip(node.outputs, sizes, strict=True)):
            target = self.slot(out, split_axis, size, where)
            for q in range(size):
                self.union(slot.base + start + q, target.base + q)
            self.rewrites.append(SplitRewrite(node, target.id, k))
            start += size
        return None

    def slice(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        where = f"Slice {node.name}"
        rank = _data_rank(node, index, "bounds")
        out = node.outputs[0]
        if self.opset >= 10:
            starts, ends = _int_list(node, "", 1), _int_list(node, "", 2)
            axes = _int_list(node, "", 3) if len(node.inputs) > 3 and node.inputs[3] else None
            steps = _int_list(node, "", 4) if len(node.inputs) > 4 and node.inputs[4] else None
        else:
            starts, ends = _int_list(node, "starts", None), _int_list(node, "ends", None)
            axes, steps = _int_list(node, "axes", None), None
        if starts is None or ends is None:
            return f"{where} has computed bounds"
        axes = list(range(len(starts))) if axes is None else [a % rank for a in axes]
        if slot.axis not in axes:
            self.passthrough(slot, node, out, slot.axis)
            return None
        k = axes.index(slot.axis)
        if steps is not None and steps[k] != 1:
            return f"{where} slices the channels with a step"
        begin, stop, _ = slice(starts[k], ends[k]).indices(slot.size)
        size = max(0, stop - begin)
        target = self.slot(out, slot.axis, size, where)
        for q in range(size):
            self.union(slot.base + begin + q, target.base + q)
        self.rewrites.append(SliceRewrite(node, slot.id, k))
        return None

    def reshape(self, slot: Slot, node: ir.Node) -> str | None:
        where = f"{node.op_type} {node.name}"
        out = node.outputs[0]
        in_dims, out_dims, skip = _common_prefix_dims(node.inputs[0], out, slot.axis)
        if node.op_type == "Flatten":
            rank = _rank(node.inputs[0])
            start = node.attributes.get_int("axis", 1) % (rank or 1) if rank else None
            tail = _static_dims_from(node.inputs[0], start) if start is not None else None
            if start is not None and tail is not None and slot.axis >= start:
                in_dims, out_dims, skip = tail, [math.prod(tail)], start
                out_skip = 1
            else:
                out_skip = skip
        else:
            out_skip = skip
        if in_dims is None or out_dims is None:
            return f"{where} has unknown shapes"
        mapped = reshape_channel_map(in_dims, slot.axis - skip, out_dims)
        if mapped is None:
            return f"{where} splits or mixes the channel axis (channel shuffle or heads)"
        out_axis, positions = mapped
        out_axis += out_skip
        width = int(positions.size)
        own = out.shape[out_axis] if out.shape is not None and len(out.shape) > out_axis else None
        if isinstance(own, ir.SymbolicDim) and own.value and not own.value.startswith("unk__"):
            return f"{where} gives the channel axis the symbolic size {own.value}"
        record: Callable[[int], Rewrite | None] = lambda target: None  # noqa: E731
        if node.op_type == "Reshape":
            found = self.shape_rewrite(slot, node, out_axis, width)
            if isinstance(found, str):
                return found
            record = found
        target = self.slot(out, out_axis, width, where)
        self.unite(slot, target, positions)
        if (rewrite := record(target.id)) is not None:
            self.rewrites.append(rewrite)
        return None

    def shape_rewrite(
        self, slot: Slot, node: ir.Node, out_axis: int, width: int
    ) -> Callable[[int], Rewrite | None] | str:
        """How the shape of Reshape `node` follows the kept count at `out_axis` (a maker of the
        rewrite record, given the target slot), or why it cannot: a constant shape's entry is
        rewritten; a computed shape's entry is followed to its source (`shape_entry`)."""
        where = f"Reshape {node.name}"
        if constant_of(node.inputs[1]) is not None:
            return lambda target: ShapeEntryRewrite(node, target, 1, out_axis)
        entry = shape_entry(node, 1, out_axis)
        copies = slot.axis == out_axis and width == slot.size  # the input's dim is the count
        if entry.constant == width:
            return lambda target: ShapeChainRewrite(node, target, entry.path, entry.index)
        copied = entry.constant == 0 and not node.attributes.get_int("allowzero", 0)
        if entry.constant == -1 or (copied and copies):
            return lambda target: None  # inferred or copied: follows the kept count
        if entry.source is node.inputs[0] and entry.axis == slot.axis and copies:
            return lambda target: None
        # a computed entry: spell the static rest out as a constant (copying the common
        # leading dims, 0 with allowzero=0), when the shapes are static after the batch
        _, rest, skip = _common_prefix_dims(node.inputs[0], node.outputs[0], slot.axis, own=True)
        if rest is not None and skip <= out_axis:
            return lambda target: StaticReshapeRewrite(node, target, out_axis, skip, tuple(rest))
        if entry.constant is not None:
            return f"{where} states {entry.constant} for {width} channels"
        if entry.source is not None:
            return f"{where} takes its channel count from {entry.source.name}"
        return f"{where} computes its channel count ({entry.reason})"

    def reduce(self, slot: Slot, node: ir.Node, index: int) -> str | None:
        where = f"{node.op_type} {node.name}"
        rank = _data_rank(node, index, "axes")
        since = _REDUCE_AXES_INPUT_SINCE.get(node.op_type, 18)
        axes = _int_list(node, "axes", 1 if self.opset >= since else None)
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            return f"{where} has computed axes"
        if not axes:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                self.passthrough(slot, node, node.outputs[0], slot.axis)
                return None
            return f"{where} reduces over all axes"
        axes = [a % rank for a in axes]
        if slot.axis in axes:
            return f"{where} reduces over the channels"
        keep = node.attributes.get_int("keepdims", 1)
        out_axis = slot.axis if keep else slot.axis - sum(a < slot.axis for a in axes)
        self.passthrough(slot, node, node.outputs[0], out_axis)
        return None


# How the channels cross each op: a `ChannelTracer` method per op type (an op without one blocks).
_Handler = Callable[[ChannelTracer, Slot, ir.Node, int], str | None]
_HANDLERS: dict[str, _Handler] = {
    **dict.fromkeys(_UNARY | {"Dropout", "Clip"} | _SPATIAL, ChannelTracer.in_place),
    **dict.fromkeys(_BINARY, ChannelTracer.elementwise),
    **dict.fromkeys(("BatchNormalization", "InstanceNormalization"), ChannelTracer.normalization),
    **dict.fromkeys(("Resize", "Upsample"), ChannelTracer.resize),
    "LayerNormalization": ChannelTracer.layer_norm,
    **dict.fromkeys(("Conv", "ConvTranspose"), ChannelTracer.conv_input),
    "Gemm": ChannelTracer.gemm_input,
    "MatMul": ChannelTracer.matmul_input,
    "Concat": ChannelTracer.concat,
    "Split": ChannelTracer.split,
    "Slice": ChannelTracer.slice,
    "Transpose": ChannelTracer.transpose,
    **dict.fromkeys(("Gather", "GatherND"), ChannelTracer.gather),
    **dict.fromkeys(("Flatten", "Reshape", "Squeeze", "Unsqueeze"), ChannelTracer.reshape_input),
    **dict.fromkeys(_REDUCE, ChannelTracer.reduce),
    **dict.fromkeys(("Softmax", "LogSoftmax", "Hardmax"), ChannelTracer.softmax),
}
# onnxruntime's contrib ops the transformer preset writes that act element by element: the
# activations (one input) keep the channels in place; BiasGelu(X, bias), FastGelu(X, bias) and
# BiasAdd(X, bias, skip) broadcast their operands like Add (a bias of the channels is sliced).
_MS_HANDLERS: dict[str, _Handler] = {
    **dict.fromkeys(("Gelu", "QuickGelu"), ChannelTracer.in_place),
    **dict.fromkeys(("BiasGelu", "FastGelu", "BiasAdd"), ChannelTracer.elementwise),
}
