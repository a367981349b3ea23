"""Selecting nodes by user-given name patterns: one rule for every pass's include/exclude.

A pattern (fnmatch, case-sensitive) selects a node when it matches the node's torch layer name
(`layer1.0.conv1`, see `layer_name`) or its ONNX node name (`node_conv2d_3`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import onnx_ir as ir

from slimgraph.ir._torch import layer_name

__all__ = ["node_names", "matching_pattern"]


def node_names(node: ir.Node) -> tuple[str, ...]:
    """The names a pattern can select a node by: its layer name and its node name (non-empty)."""
    return tuple(name for name in dict.fromkeys((layer_name(node), node.name or "")) if name)


def matching_pattern(node: ir.Node, patterns: Iterable[str]) -> str | None:
    """The first pattern matching one of the node's names, else None."""
    names = node_names(node)
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            return pattern
    return None
