"""Selecting nodes by user-given name patterns: one rule for every pass's include/exclude.

A pattern (fnmatch, case-sensitive) selects a node when it matches the node's torch layer name
(`layer1.0.conv1`, see `layer_name`) or its ONNX node name (`node_conv2d_3`). Every pattern a
user gives must select something (`check_patterns`; `check_exclusions` with op types too): a typo
is an error, never a silent no-op.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import onnx_ir as ir

from slimgraph.errors import BadOptionError, Term
from slimgraph.ir.names import layer_name

__all__ = [
    "node_names", "matching_pattern", "check_patterns", "check_exclusions", "exact_pattern",
]


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


def check_patterns(
    nodes: Iterable[ir.Node],
    patterns: Iterable[str],
    *,
    label: str | Term = ("exclude pattern", "--exclude"),
    tensors: bool = False,
) -> None:
    """Raise when a pattern selects no node (by layer or node name, or, with `tensors`, by the
    name of a value a node outputs: quantization's report prints tensor names).

    Raises:
        BadOptionError: "<label> '<pattern>' matches no layer or node of the model" (a `Term`
            label: its Python wording in `str(error)`, its flag in `error.cli_message`).
    """
    listed = list(nodes)
    for pattern in patterns:
        if any(matching_pattern(node, (pattern,)) is not None for node in listed):
            continue
        if tensors and any(
            value.name and fnmatch.fnmatchcase(value.name, pattern)
            for node in listed
            for value in node.outputs
        ):
            continue
        raise BadOptionError.worded("{label} {pattern} matches no layer or node of the model",
                                    label=label, pattern=repr(pattern))


def check_exclusions(
    nodes: Iterable[ir.Node],
    exclude: Iterable[str],
    exclude_ops: Iterable[str] = (),
    *,
    tensors: bool = False,
) -> None:
    """Every `--exclude` pattern must select a node (`check_patterns`; with `tensors`, also by an
    output tensor's name) and every `--exclude-op` must be an op type of one of `nodes`.

    Raises:
        BadOptionError: a pattern or op type that selects nothing (it would be a silent no-op).
    """
    listed = list(nodes)
    check_patterns(listed, exclude, tensors=tensors)
    present = {node.op_type for node in listed}
    for op in exclude_ops:
        if op not in present:
            raise BadOptionError.worded("{option} {op}: the model has no {name} node",
                                        option=("exclude_ops", "--exclude-op"), op=repr(op),
                                        name=op)


def exact_pattern(name: str) -> str:
    """A pattern that matches exactly `name` (fnmatch's special characters escaped)."""
    return "".join(f"[{char}]" if char in "*?[" else char for char in name)
