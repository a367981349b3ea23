"""Which layers a factorization pass touches: op types, name patterns, constant weights."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx_ir as ir

from slimgraph.errors import BadOptionError
from slimgraph.ir.select import check_patterns, matching_pattern

__all__ = ["SUPPORTED_OPS", "LayerFilter"]

SUPPORTED_OPS = ("Gemm", "MatMul", "Conv")


def _as_tuple(patterns: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return (patterns,)
    return tuple(patterns)


@dataclass(frozen=True)
class LayerFilter:
    """Layers selected by op type and by fnmatch patterns on the layer name or the node name.

    A node is selected when its op type is in `op_types`, it matches an `include` pattern (or
    `include` is None) and matches no `exclude` pattern. `explicit(node)` tells whether an include
    pattern named it, which turns a skip (non-constant weight) into an error.
    """

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] = SUPPORTED_OPS

    @classmethod
    def create(
        cls,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        op_types: str | Sequence[str] = SUPPORTED_OPS,
    ) -> LayerFilter:
        ops = _as_tuple(op_types) or ()
        unknown = [op for op in ops if op not in SUPPORTED_OPS]
        if unknown:
            raise BadOptionError(
                f"cannot factorize op type '{unknown[0]}' (supported: {', '.join(SUPPORTED_OPS)})"
            )
        if not ops:
            raise BadOptionError("op_types is empty: nothing to factorize")
        include_t = _as_tuple(include)
        if include_t is not None and not include_t:
            include_t = None
        return cls(include_t, _as_tuple(exclude) or (), ops)

    @staticmethod
    def _matches(node: ir.Node, pattern: str) -> bool:
        return matching_pattern(node, (pattern,)) is not None

    def explicit(self, node: ir.Node) -> bool:
        return self.include is not None and any(self._matches(node, p) for p in self.include)

    def selects(self, node: ir.Node) -> bool:
        if node.op_type not in self.op_types or node.domain not in ("", "ai.onnx"):
            return False
        if self.include is not None and not self.explicit(node):
            return False
        return not any(self._matches(node, pattern) for pattern in self.exclude)

    def check_names(self, graph: ir.Graph) -> None:
        """Every include/exclude pattern must name at least one node of the graph."""
        nodes = list(graph)
        for kind, patterns in (("include", self.include or ()), ("exclude", self.exclude)):
            check_patterns(nodes, patterns, label=f"{kind} pattern")
