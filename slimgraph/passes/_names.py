"""Fresh names for new values, nodes and initializers: the one allocator (`Names`).

A leaf module (onnx_ir only): the rewiring helpers (`_graph_utils`) and the editing kit
(`_kit`, which re-exports it) both hand out names through it.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["Names"]


class Names:
    """Fresh value, node and initializer names for `graph`: none clashes with a name already in
    the graph, its subgraphs (ONNX forbids an inner name shadowing an outer one) or handed out.

    Args:
        graph: the graph whose names are taken.
        node_names: also count node names as taken (default). Values and nodes have separate
            namespaces in ONNX; an allocator that hands out both keeps them apart, one that
            names only values (`add_initializer` without `names`) need not.
    """

    def __init__(self, graph: ir.Graph, *, node_names: bool = True) -> None:
        self.used: set[str] = set(graph.initializers)
        self.used.update(value.name for value in graph.inputs if value.name)
        for node in graph.all_nodes():
            if node.name and node_names:
                self.used.add(node.name)
            self.used.update(value.name for value in node.outputs if value.name)

    def fresh(self, base: str) -> str:
        """`base`, or `base_1`, `base_2`, ... : the first one not used yet (now used)."""
        name, index = base, 1
        while name in self.used:
            name, index = f"{base}_{index}", index + 1
        self.used.add(name)
        return name
