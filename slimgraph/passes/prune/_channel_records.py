"""The records of a channel analysis: traced tensor axes, weight uses, rewrites, blocks, groups.

`slimgraph.passes.prune.channels` builds them (`analyze_channels`); the selection and the
surgery read them. A `Slot` is one traced tensor axis whose positions are elements of a
union-find (`find_root`); every constant a channel axis indexes is a `WeightUse` with a `Role`;
what the surgery must change besides the weights is a typed `Rewrite` record; a `Block` says why
a slot cannot shrink; a `ChannelGroup` is the unit a ratio applies to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import onnx_ir as ir

from slimgraph.ir import display_name

__all__ = [
    "Role",
    "WeightUse",
    "Rewrite",
    "ConvGroupRewrite",
    "ShapeEntryRewrite",
    "StaticReshapeRewrite",
    "ShapeChainRewrite",
    "SplitRewrite",
    "SliceRewrite",
    "Block",
    "Slot",
    "Member",
    "ChannelGroup",
    "ChannelAnalysis",
    "find_root",
    "constant_of",
]


def constant_of(value: ir.Value | None) -> np.ndarray | None:
    """The array of a constant value (an initializer or folded constant), else None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


class Role(StrEnum):
    """What a constant input does for the channels its axis indexes (a `WeightUse`)."""

    PRODUCER = "producer"  # weights that compute the channel: importance reads them
    BIAS = "bias"
    BN_SCALE = "bn_scale"  # BatchNormalization gamma
    PARAM = "param"  # other per-channel constants (BatchNorm beta/mean/var, Add/Mul operands)
    CONSUMER = "consumer"  # the next layer's input channels


@dataclass(frozen=True)
class WeightUse:
    """A constant input of a node whose `axis` indexes the positions of slot `slot`.

    `role` is a `Role` (a `str`: it compares equal to "producer", "bias", ...).
    """

    node: ir.Node
    input_index: int
    axis: int
    slot: int
    role: Role

    def array(self) -> np.ndarray:
        """The constant this use indexes, as numpy.

        Raises:
            ValueError: the input is no longer a constant (the graph changed since tracing).
        """
        found = constant_of(self.node.inputs[self.input_index])
        if found is None:
            raise ValueError(f"input {self.input_index} of {self.node.name} is not a constant")
        return found


@dataclass(frozen=True)
class Rewrite:
    """An attribute or shape constant of `node` that depends on how many positions of slot
    `slot` stay. The subclasses below say which one; the pruning surgery applies each by type
    (`slimgraph.passes.prune`).

    Attributes:
        node: the node to rewrite.
        slot: the traced tensor axis whose kept count the new value follows.
    """

    node: ir.Node
    slot: int


@dataclass(frozen=True)
class ConvGroupRewrite(Rewrite):
    """A grouped Conv whose conv groups go whole: `group` becomes the kept count of its output
    channels divided by `out_per_group` (output channels per group, unchanged)."""

    out_per_group: int


@dataclass(frozen=True)
class ShapeEntryRewrite(Rewrite):
    """A constant shape-like input (Reshape's `shape`, Resize's `sizes`) whose entry `axis`
    counts the channels: it becomes the kept count (a Reshape's -1 stays -1).

    Attributes:
        input: the input index of the constant (Reshape 1, Resize 3).
        axis: the entry that holds the channel count.
    """

    input: int
    axis: int


@dataclass(frozen=True)
class StaticReshapeRewrite(Rewrite):
    """A Reshape with a computed shape (dynamic batch), rewritten as a constant.

    The new shape is `skip` zeros (copy the input's leading dims; allowzero=0) then `dims`, with
    entry `axis` set to the kept count.
    """

    axis: int
    skip: int
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ShapeChainRewrite(Rewrite):
    """A Reshape with a computed shape (`x.view(-1, c)` on a symbolic batch) whose channel entry
    is a constant reached through `path` ((node, input index) hops from the Reshape's shape input,
    `_shapes.shape_entry`): element `index` of the last hop's constant becomes the kept count;
    nodes on the path that others read too are copied first."""

    path: tuple[tuple[ir.Node, int], ...]
    index: int


@dataclass(frozen=True)
class SplitRewrite(Rewrite):
    """Output `output` of a Split on the channel axis: the split sizes become every output's
    kept count (one record per output; applying any of them sets all sizes)."""

    output: int


@dataclass(frozen=True)
class SliceRewrite(Rewrite):
    """A Slice of the channel axis (`slot` is its input): the bounds at `position` of its `axes`
    become the kept positions' bounds."""

    position: int


@dataclass(frozen=True)
class Block:
    """Why the channels of `slot` cannot shrink; `padable` ones sit at a consumer edge.

    A padable block names the edge: input `index` of `node`, or graph output `index` when `node`
    is None. Padding the pruned tensor back to its full size at that edge removes the block.
    """

    slot: int
    reason: str
    padable: bool
    node: ir.Node | None = None
    index: int = -1


@dataclass
class Slot:
    """One traced tensor axis: `size` positions, elements `base .. base+size-1`."""

    id: int
    value: ir.Value
    axis: int
    size: int
    base: int
    origin: str | None = None


@dataclass(frozen=True)
class Member:
    """A tensor axis in a group; `index_map[position]` is the group channel there, or -1."""

    value: ir.Value
    axis: int
    index_map: np.ndarray


@dataclass
class ChannelGroup:
    """Channels removed together, with the tensors, producers and consumers they touch."""

    id: int
    roots: list[int]  # union-find root of each group channel, in channel order
    members: list[Member]
    producers: list[ir.Node]
    consumers: list[ir.Node]
    reasons: list[str] = field(default_factory=list)  # why it cannot be pruned ([] = prunable)
    pads: list[Block] = field(default_factory=list)  # edges padded back (pad mode)

    @property
    def size(self) -> int:
        return len(self.roots)

    @property
    def prunable(self) -> bool:
        return not self.reasons and self.size > 1 and bool(self.producers)

    def describe(self) -> str:
        names = ", ".join(display_name(n) for n in self.producers[:4])
        more = f" +{len(self.producers) - 4}" if len(self.producers) > 4 else ""
        return f"group {self.id} ({self.size} ch): {names}{more}"


@dataclass
class ChannelAnalysis:
    """The result of `analyze_channels`: slots, union-find, weight uses, rewrites, groups."""

    slots: list[Slot]
    parent: list[int]
    weight_uses: list[WeightUse]
    rewrites: list[Rewrite]
    blocks: list[Block]
    groups: list[ChannelGroup]
    pad: bool

    def slot_index_of(self, value: ir.Value, axis: int | None) -> int | None:
        """The slot id of (value, axis); any axis of `value` when `axis` is None."""
        for slot in self.slots:
            if slot.value is value and (axis is None or slot.axis == axis):
                return slot.id
        return None

    def find(self, element: int) -> int:
        """The component root of position element `element`."""
        return find_root(self.parent, element)

    def roots_of(self, slot: Slot) -> np.ndarray:
        """The component root of every position of `slot`."""
        return np.array([self.find(slot.base + p) for p in range(slot.size)], dtype=np.int64)

    def kept_positions(self, slot: Slot, removed: set[int]) -> np.ndarray:
        """Positions of `slot` that stay when the components `removed` go."""
        roots = self.roots_of(slot)
        return np.array([p for p, r in enumerate(roots) if int(r) not in removed], dtype=np.int64)

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]


def find_root(parent: list[int], element: int) -> int:
    """The root of `element` in the union-find forest `parent`, halving the path on the way."""
    while parent[element] != element:
        parent[element] = parent[parent[element]]
        element = parent[element]
    return element
