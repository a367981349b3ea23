"""`slimgraph diff A B [--json]`: what changed between two models, structurally.

Compares the summaries (no weight values are read): op counts, nodes, parameters, size and MACs
with ratios B/A, inputs/outputs, opsets, and initializers added, removed or reshaped by name.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import slimgraph.ir as sg_ir
from slimgraph._tables import (
    format_bytes,
    format_count,
    format_ratio,
    format_shape,
    render_table,
)
from slimgraph.ir.summary import IOSpec, ModelSummary, parse_dims, summarize
from slimgraph.tools._common import add_json_option, print_result

__all__ = ["register", "ModelDiff", "diff_summaries", "render_diff"]

# Metrics compared before -> after; all but size count as structural changes.
_METRICS = ("nodes", "parameters", "macs", "size_bytes")

# Initializer changes listed in the text report (all of them in --json).
_MAX_ROWS = 20


@dataclass(frozen=True)
class ModelDiff:
    """The differences between summaries `a` (before) and `b` (after); empty lists mean none."""

    a: ModelSummary
    b: ModelSummary
    ops: dict[str, tuple[int, int]]
    inputs: dict[str, list]
    outputs: dict[str, list]
    opset: dict[str, tuple[int | None, int | None]]
    initializers: dict[str, list]

    @property
    def changed(self) -> bool:
        """Any structural change (size alone does not count: re-saving changes it)."""
        metric_change = any(getattr(self.a, m) != getattr(self.b, m) for m in _METRICS[:-1])
        parts = (self.inputs, self.outputs, self.initializers)
        return (
            metric_change
            or bool(self.ops)
            or bool(self.opset)
            or any(entries for part in parts for entries in part.values())
        )

    def metrics(self) -> dict[str, dict[str, float | int | None]]:
        result: dict[str, dict[str, float | int | None]] = {}
        for name in _METRICS:
            before, after = getattr(self.a, name), getattr(self.b, name)
            ratio = after / before if before else (None if after else 1.0)
            result[name] = {"before": before, "after": after, "ratio": ratio}
        return result

    def to_dict(self) -> dict[str, object]:
        return {
            "a": self.a.path,
            "b": self.b.path,
            "changed": self.changed,
            "metrics": self.metrics(),
            "ops": {op: {"before": a, "after": b} for op, a, b in _op_rows(self.ops)},
            "inputs": _io_dict(self.inputs),
            "outputs": _io_dict(self.outputs),
            "opset": {d: {"before": a, "after": b} for d, (a, b) in self.opset.items()},
            "initializers": {
                "added": [_tensor_dict(n, d, s) for n, d, s in self.initializers["added"]],
                "removed": [_tensor_dict(n, d, s) for n, d, s in self.initializers["removed"]],
                "reshaped": [
                    {
                        "name": n,
                        "before": _tensor_dict(None, da, sa),
                        "after": _tensor_dict(None, db, sb),
                    }
                    for n, (da, sa), (db, sb) in self.initializers["reshaped"]
                ],
            },
        }


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "diff",
        help="what changed between two models",
        description="Compare two ONNX models structurally (weights are not read).",
    )
    for name, when in (("a", "before"), ("b", "after")):
        parser.add_argument(name, metavar=name.upper(), help=f"the model {when}")
    add_json_option(parser)
    parser.add_argument(
        "--dim", action="append", metavar="NAME=VALUE", help="symbolic dimension value for MACs"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    dims = parse_dims(args.dim)
    a = summarize(sg_ir.load(args.a), args.a, dims=dims)
    b = summarize(sg_ir.load(args.b), args.b, dims=dims)
    result = diff_summaries(a, b)
    return print_result(args, result.to_dict(), render_diff(result))


def diff_summaries(a: ModelSummary, b: ModelSummary) -> ModelDiff:
    """Everything that differs between `a` and `b`."""
    ops = {
        op: (a.ops.get(op, 0), b.ops.get(op, 0))
        for op in a.ops.keys() | b.ops.keys()
        if a.ops.get(op, 0) != b.ops.get(op, 0)
    }
    opset = {
        domain: (a.opset.get(domain), b.opset.get(domain))
        for domain in sorted(a.opset.keys() | b.opset.keys())
        if a.opset.get(domain) != b.opset.get(domain)
    }
    before, after = a.initializers, b.initializers
    initializers: dict[str, list] = {
        "added": [
            (n, after[n].dtype, after[n].shape) for n in sorted(after.keys() - before.keys())
        ],
        "removed": [
            (n, before[n].dtype, before[n].shape) for n in sorted(before.keys() - after.keys())
        ],
        "reshaped": [
            (n, (before[n].dtype, before[n].shape), (after[n].dtype, after[n].shape))
            for n in sorted(before.keys() & after.keys())
            if before[n] != after[n]
        ],
    }
    return ModelDiff(
        a=a,
        b=b,
        ops=ops,
        inputs=_io_changes(a.inputs, b.inputs),
        outputs=_io_changes(a.outputs, b.outputs),
        opset=opset,
        initializers=initializers,
    )


def _io_changes(before: tuple[IOSpec, ...], after: tuple[IOSpec, ...]) -> dict[str, list]:
    old = {spec.name: spec for spec in before}
    new = {spec.name: spec for spec in after}
    return {
        "added": [new[n] for n in new if n not in old],
        "removed": [old[n] for n in old if n not in new],
        "changed": [(old[n], new[n]) for n in old if n in new and old[n] != new[n]],
    }


def _io_dict(changes: dict[str, list]) -> dict[str, list]:
    return {
        "added": [spec.to_dict() for spec in changes["added"]],
        "removed": [spec.to_dict() for spec in changes["removed"]],
        "changed": [
            {"name": old.name, "before": old.to_dict(), "after": new.to_dict()}
            for old, new in changes["changed"]
        ],
    }


def _tensor_dict(name: str | None, dtype: str, shape: tuple[int, ...]) -> dict[str, object]:
    found: dict[str, object] = {"dtype": dtype, "shape": [int(d) for d in shape]}
    return found if name is None else {"name": name, **found}


def _op_rows(ops: dict[str, tuple[int, int]]) -> list[tuple[str, int, int]]:
    """Changed ops, biggest change first."""
    rows = [(op, a, b) for op, (a, b) in ops.items()]
    return sorted(rows, key=lambda row: (-abs(row[2] - row[1]), row[0]))


def render_diff(result: ModelDiff) -> str:
    """The readable report: a metrics table, then only the sections that changed."""
    a, b = result.a, result.b
    formats = {
        "nodes": lambda v: f"{v:,}",
        "parameters": lambda v: f"{v:,} ({format_count(v)})",
        "macs": lambda v: f"{v:,} ({format_count(v)})",
        "size_bytes": format_bytes,
    }
    labels = {"nodes": "nodes", "parameters": "parameters", "macs": "MACs", "size_bytes": "size"}
    metric_rows = [
        [labels[name], formats[name](m["before"]), formats[name](m["after"]),
         format_ratio(m["ratio"])]
        for name, m in result.metrics().items()
    ]
    sections = [
        f"A: {a.path}\nB: {b.path}",
        render_table(["", "A", "B", "B/A"], metric_rows, align="lrrr"),
    ]
    if result.ops:
        rows = [[op, x, y, _signed(y - x)] for op, x, y in _op_rows(result.ops)]
        table = render_table(["op", "A", "B", "change"], rows, indent="  ", align="lrrr")
        sections.append("ops changed\n" + table)
    for title, changes in (("inputs", result.inputs), ("outputs", result.outputs)):
        rows = [["added", s.name, "-", _spec_text(s)] for s in changes["added"]]
        rows += [["removed", s.name, _spec_text(s), "-"] for s in changes["removed"]]
        rows += [["changed", o.name, _spec_text(o), _spec_text(n)] for o, n in changes["changed"]]
        if rows:
            sections.append(
                f"{title} changed\n" + render_table(["", "name", "A", "B"], rows, indent="  ")
            )
    if result.opset:
        rows = [[d or "ai.onnx", x, y] for d, (x, y) in result.opset.items()]
        sections.append("opset changed\n" + render_table(["domain", "A", "B"], rows, indent="  "))
    init = result.initializers
    rows = [["added", n, "-", f"{d}{format_shape(s)}"] for n, d, s in init["added"]]
    rows += [["removed", n, f"{d}{format_shape(s)}", "-"] for n, d, s in init["removed"]]
    rows += [
        ["reshaped", n, f"{da}{format_shape(sa)}", f"{db}{format_shape(sb)}"]
        for n, (da, sa), (db, sb) in init["reshaped"]
    ]
    if rows:
        counts = ", ".join(f"{len(init[kind])} {kind}" for kind in ("added", "removed", "reshaped"))
        shown = render_table(["", "name", "A", "B"], rows[:_MAX_ROWS], indent="  ")
        if len(rows) > _MAX_ROWS:
            shown += f"\n  ... and {len(rows) - _MAX_ROWS} more (--json lists all)"
        sections.append(f"initializers changed ({counts})\n{shown}")
    if not result.changed:
        sections.append("no structural change")
    return "\n\n".join(sections)


def _spec_text(spec: IOSpec) -> str:
    return f"{spec.dtype}{format_shape(spec.shape)}"


def _signed(value: int) -> str:
    return f"{value:+,}"
