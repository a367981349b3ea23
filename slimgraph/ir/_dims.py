"""Symbolic dimension names (`batch`, `sequence`) kept across a rewrite, and the sizes the
export's example gave them.

A pass that clears and re-infers shapes gets fresh names from onnx's shape inference
(`unk__25`) where it cannot relate a dimension to the inputs' symbols; the user's names must
survive every pass. `io_shapes` records the graph inputs' and outputs' shapes before a pass,
`restore_dim_names` puts the recorded names back where the new shape has an anonymous or
`unk__` symbol at the same axis, renames that symbol everywhere in the graph, and leaves any other
`unk__N` anonymous (a name nobody chose). `example_dims` reads the sizes `from_torch` recorded
(`metadata.EXAMPLE_DIMS`): verification inputs and pruning's shape analysis use them, and
`mac_dims` gives the sizes MACs are counted at (the example's, the batch at 1).
"""

from __future__ import annotations

import json
import re
from typing import TypeGuard

import onnx_ir as ir

from slimgraph.ir.metadata import EXAMPLE_DIMS

__all__ = ["io_shapes", "restore_dim_names", "example_dims", "mac_dims"]

_ANONYMOUS_PREFIX = "unk__"
_LITERAL = re.compile(r"(?<![A-Za-z_0-9])[0-9]+(?![A-Za-z_0-9])")


def _restorable(name: object) -> TypeGuard[str]:
    """A recorded name that still means the same size after a pass: a symbol (`batch`) or an
    expression of symbols (`seq*batch`, `past + sequence`), never one with a number in it
    (`4*batch`, where pruning heads makes the 4 a 2) or an inferred `unk__N`."""
    return (isinstance(name, str) and not name.startswith(_ANONYMOUS_PREFIX)
            and _LITERAL.search(name) is None)


def _values(model: ir.Model) -> list[ir.Value]:
    graph = model.graph
    return [*graph.inputs, *graph.outputs, *(v for n in graph.all_nodes() for v in n.outputs)]


def io_shapes(model: ir.Model) -> dict[str, tuple[object, ...]]:
    """Shapes of the graph's values (inputs, outputs, node outputs) by name; dims as ints or
    symbol names."""
    shapes: dict[str, tuple[object, ...]] = {}
    for value in _values(model):
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
    """Give `model`'s values back the symbol names recorded in `before`.

    Where a value of the same name and rank now has an anonymous or `unk__N` dimension and had a
    named symbol at that axis, the symbol is restored, and `unk__N` is renamed to it on every
    other value of the graph. A name with a number in it (`4*batch`) is not restored: the pass
    may have changed the number (heads pruned from 4 to 2), and two values of one name and two
    sizes make onnxruntime refuse the model. Returns the number of dimensions renamed.
    """
    renames: dict[str, str] = {}
    changed = 0
    for value in _values(model):
        old = before.get(value.name or "")
        if old is None or value.shape is None or len(value.shape) != len(old):
            continue
        dims: list[int | str | None] = [
            d if isinstance(d, int) else d.value for d in value.shape
        ]
        fixed = 0
        for axis, (dim, was) in enumerate(zip(value.shape, old, strict=True)):
            # an old `unk__N` is no name of the user's (and may be one inference gives anew)
            if _restorable(was) and _anonymous(dim):
                if dims[axis]:
                    renames[str(dims[axis])] = was
                dims[axis] = was
                fixed += 1
        if fixed:
            value.shape = ir.Shape(dims)
            changed += fixed
    # an `unk__N` that maps to no name of the user's is an invented name: make it anonymous
    for value in _values(model):
        if value.shape is None or not any(
            not isinstance(d, int) and str(d.value or "").startswith(_ANONYMOUS_PREFIX)
            for d in value.shape
        ):
            continue
        new_dims: list[int | str | None] = []
        for d in value.shape:
            if isinstance(d, int):
                new_dims.append(d)
            elif d.value is not None and d.value in renames:
                new_dims.append(renames[d.value])
            else:
                new_dims.append(None if _anonymous(d) else d.value)
        value.shape = ir.Shape(new_dims)
        changed += 1
    return changed


def example_dims(model: ir.Model) -> dict[str, int]:
    """The sizes the export's example inputs gave the symbolic dimensions, by name
    (`metadata.EXAMPLE_DIMS`, written by `from_torch`); empty when not recorded."""
    text = model.metadata_props.get(EXAMPLE_DIMS)
    if not text:
        return {}
    try:
        recorded = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(recorded, dict):
        return {}
    return {str(k): int(v) for k, v in recorded.items() if isinstance(v, int) and v > 0}


def mac_dims(model: ir.Model) -> dict[str, int]:
    """The sizes prune counts MACs at: the export's example sizes (`from_torch` records them)
    for symbolic dimensions other than the batch (a leading input axis), which counts as 1;
    empty (all 1) when none are recorded. A sequence of 1 would hide what attention costs, and
    an audio model's sample count of 1 gives its convolutions negative lengths."""
    batch = {str(value.shape[0]) for value in model.graph.inputs
             if value.shape is not None and len(value.shape) and not isinstance(value.shape[0],
                                                                               int)}
    return {name: size for name, size in example_dims(model).items() if name not in batch}
