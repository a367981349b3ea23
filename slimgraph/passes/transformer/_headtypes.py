"""The records head pruning edits, and which positions of a layout survive once heads go.

Every edit is stated relative to a *reference* (`Ref`): a tensor whose one axis holds positions
that head pruning removes, with a mask of the positions kept computed once the heads to remove
are chosen. References: a projection's output ("proj", its feature axis), the scores [B, N, S, T]
("Z", axis 1), the merged heads [B, S, N * Hv] ("Y", axis 2), the heads themselves ("H", query
heads or key/value heads: axis 0), and constants read beside the heads ("C", the axis that runs
over them, such as DeBERTa's per-head relative-position keys).

- `Weight`: a constant input whose axis runs over a reference's positions (sliced to the kept
  ones);
- `Move`: a data movement between tensors laid out relative to one reference (its shape, split
  sizes or slice bounds restated);
- `VectorEdit`: an entry of a shape vector (an Expand target, Tile repeats) that states a size
  made of head positions;
- `alive` / `new_sizes`: the indices of each atom of a layout that still hold a kept position.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx_ir as ir

from slimgraph.passes._kit import constant_array
from slimgraph.passes.transformer._layout import Layout
from slimgraph.passes.transformer._match import NoMatch

__all__ = ["Ref", "Weight", "Move", "VectorEdit", "alive", "new_sizes", "axis_factors"]

# ("proj", id) | ("Z", id) | ("Y", id) | ("H", id, "q" | "kv") | ("C", id, id)
Ref = tuple[object, ...]


@dataclasses.dataclass(frozen=True)
class Weight:
    """Input `index` of `node`, a constant whose `axis` runs over some feature positions."""

    node: ir.Node
    index: int
    axis: int

    def array(self) -> np.ndarray:
        array = constant_array(self.node.inputs[self.index])
        assert array is not None
        return array


@dataclasses.dataclass
class Move:
    """A data movement whose shape constants may state a head count: its data input is laid out
    as `before`, its output as `after`, both relative to `ref`."""

    node: ir.Node
    ref: Ref
    before: Layout
    after: Layout


@dataclasses.dataclass(frozen=True)
class VectorEdit:
    """Entry `entry` of the shape-vector input `index` of `node` (an Expand target, a Tile's
    repeats) is a size whose head positions are the atoms `atoms` (indices into
    `layout.flat()`, `layout` relative to `ref`): it shrinks as they do."""

    node: ir.Node
    index: int
    entry: int
    ref: Ref
    layout: Layout
    atoms: tuple[int, ...]


def alive(layout: Layout, ref_axis: int, kept: np.ndarray) -> dict[int, np.ndarray]:
    """For each atom of `layout` on the reference's axis `ref_axis` (by index in
    `layout.flat()`), which of its indices still hold a kept position once only the `kept`
    positions of that axis remain.

    Raises:
        NoMatch: the kept positions are not a product of per-atom index sets (a move that
            mixes a pruned head with a kept one).
    """
    flat = layout.flat()
    mine = [(i, a) for i, a in enumerate(flat) if a.axis == ref_axis]
    if not mine:
        return {}
    if any(not a.size.static or not a.stride.static for _, a in mine):
        raise NoMatch("symbolic head positions")
    base = layout.offsets[ref_axis]
    grids = [range(a.size.coef) for _, a in mine]
    mask = np.zeros([a.size.coef for _, a in mine], bool)
    for index in itertools.product(*grids):
        position = base + sum(a.stride.coef * i for (_, a), i in zip(mine, index, strict=True))
        mask[index] = position < kept.size and kept[position]
    out: dict[int, np.ndarray] = {}
    product = np.ones((), bool)
    for k, (i, _) in enumerate(mine):
        others = tuple(j for j in range(len(mine)) if j != k)
        out[i] = np.asarray(mask.any(axis=others) if others else mask)
        product = np.multiply.outer(product, out[i])
    if not np.array_equal(product, mask):
        raise NoMatch("a data movement mixes pruned and kept heads")
    return out


def new_sizes(layout: Layout, ref_axis: int, kept: np.ndarray) -> dict[int, int]:
    """New sizes of the atoms of `layout` on the reference's axis `ref_axis` (by index in
    `layout.flat()`); see `alive`."""
    return {i: int(v.sum()) for i, v in alive(layout, ref_axis, kept).items()}


def axis_factors(layout: Layout, sizes: dict[int, int],
                 only: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
    """Per axis of `layout`: (old, new) product of the sizes of its atoms that `sizes` (from
    `new_sizes`) resizes, restricted to the flat atom indices `only` when given."""
    factors = []
    index = 0
    for atoms in layout.axes:
        old = new = 1
        for atom in atoms:
            if index in sizes and (only is None or index in only):
                old *= atom.size.coef
                new *= sizes[index]
            index += 1
        factors.append((old, new))
    return factors
