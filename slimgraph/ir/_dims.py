"""Symbolic dimension names (`batch`, `sequence`) kept across a rewrite.

A pass that clears and re-infers shapes gets fresh names from onnx's shape inference
(`unk__25`) where it cannot relate a dimension to the inputs' symbols; the user's names must
survive every pass. `io_shapes` records the graph inputs' and outputs' shapes before a pass,
`restore_dim_names` puts the recorded names back where the new shape has an anonymous or
`unk__` symbol at the same axis, and renames that symbol everywhere in the graph.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["io_shapes", "restore_dim_names"]

_ANONYMOUS_PREFIX = "unk__"


def io_shapes(model: ir.Model) -> dict[str, tuple[object, ...]]:
    """Shapes of the graph inputs and outputs by value name (dims as ints or symbol names)."""
    shapes: dict[str, tuple[object, ...]] = {}
    for value in (*model.graph.inputs, *model.graph.outputs):
        if value.name and value.shape is not None:
            shapes[value.name] = tuple(
                d if isinstance(d, int) else (d.value if d.value else None) for d in value.shape
            )
    return shapes


def _anonymous(dim: object) -> bool:
    if isinstance(dim, int):
        return False
    name = getattr(dim, "value", None)
    return name is None or str(name).startswith(_ANONYMOUS_PREFIX)


def restore_dim_names(model: ir.Model, before: dict[str, tuple[object, ...]]) -> int:
    """Give `model`'s inputs and outputs back the symbol names recorded in `before`.

    Where a graph input or output of the same name and rank now has an anonymous or `unk__N`
    dimension and had a named symbol at that axis, the symbol is restored, and `unk__N` is
    renamed to it on every value of the graph. Returns the number of dimensions renamed.
    """
    renames: dict[str, str] = {}
    changed = 0
    for value in (*model.graph.inputs, *model.graph.outputs):
        old = before.get(value.name or "")
        if old is None or value.shape is None or len(value.shape) != len(old):
            continue
        dims = list(value.shape)
        fixed = 0
        for axis, (dim, was) in enumerate(zip(dims, old, strict=True)):
            if isinstance(was, str) and _anonymous(dim):
                if getattr(dim, "value", None):
                    renames[str(dim.value)] = was
                dims[axis] = was
                fixed += 1
        if fixed:
            value.shape = ir.Shape(dims)
            changed += fixed
    if renames:
        for node in model.graph.all_nodes():
            for value in node.outputs:
                if value.shape is None or not any(
                    not isinstance(d, int) and d.value in renames for d in value.shape
                ):
                    continue
                value.shape = ir.Shape(
                    [renames.get(d.value, d.value) if not isinstance(d, int) else d
                     for d in value.shape]  # fmt: skip
                )
                changed += 1
    return changed
