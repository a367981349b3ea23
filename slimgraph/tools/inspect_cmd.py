"""`slimgraph inspect MODEL [--json]`: nodes, op histogram, parameters, size, MACs, io, opset.

Reads the graph and shapes only: weights stored in external-data files are never opened.
"""

from __future__ import annotations

import argparse

import slimgraph.ir as sg_ir
from slimgraph._tables import (
    format_bytes,
    format_count,
    format_shape,
    render_fields,
    render_table,
)
from slimgraph.errors import BadInputError
from slimgraph.ir.analysis import NegativeSizeError
from slimgraph.ir.summary import ModelSummary, parse_dims, summarize
from slimgraph.tools._common import add_json_option, add_model_arguments, print_result

__all__ = ["register", "render_summary"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="nodes, op histogram, parameters, size, MACs, inputs/outputs, opset",
        description="Summarize an ONNX model without reading its weights.",
    )
    add_model_arguments(parser, "the .onnx file", output=False)
    add_json_option(parser)
    parser.add_argument(
        "--dim",
        action="append",
        metavar="NAME=VALUE",
        help="value of a symbolic dimension for MACs (default: the export's example size, "
        "batch 1, else 1), e.g. --dim batch=8",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    dims = parse_dims(args.dim)
    model = sg_ir.load(args.model)
    try:
        summary = summarize(model, args.model, dims=dims)
    except NegativeSizeError as error:
        raise BadInputError(f"{error}; give larger sizes with --dim NAME=VALUE") from None
    return print_result(args, summary.to_dict(), render_summary(summary))


def render_summary(summary: ModelSummary) -> str:
    """The readable report: header fields, then io, ops, top layers and dtype tables."""
    dims = ", ".join(f"{k}={v}" for k, v in summary.dims.items())
    notes = [f"{dims}, other symbolic dims 1" if dims else "symbolic dims 1"]
    if summary.macs_unknown:
        notes.append(f"{summary.macs_unknown} node(s) with unknown shapes left out")
    opset = ", ".join(f"{domain or 'ai.onnx'} {ver}" for domain, ver in summary.opset.items())
    fields: list[tuple[str, object]] = [
        ("model", summary.path or "(in memory)"),
        ("producer", summary.producer or "-"),
        ("ir version", summary.ir_version),
        ("opset", opset),
        ("nodes", summary.nodes),
        ("parameters", f"{summary.parameters:,} ({format_count(summary.parameters)})"),
        ("size", f"{summary.size_bytes:,} bytes ({format_bytes(summary.size_bytes)})"),
        ("MACs", f"{summary.macs:,} ({format_count(summary.macs)}; {'; '.join(notes)})"),
    ]
    if summary.external_data:
        fields.append(("external data", ", ".join(summary.external_data)))
    sections = [render_fields(fields)]
    for title, specs in (("inputs", summary.inputs), ("outputs", summary.outputs)):
        rows = [[s.name, s.dtype, format_shape(s.shape)] for s in specs]
        sections.append(f"{title}\n" + render_table(["name", "dtype", "shape"], rows, indent="  "))
    op_rows = [[op, count] for op, count in summary.ops.items()]
    sections.append("ops\n" + render_table(["op", "count"], op_rows, indent="  "))
    if summary.top_layers:
        layer_rows = [
            [layer.layer, "+".join(layer.ops), layer.macs, f"{layer.share:.1%}"]
            for layer in summary.top_layers
        ]
        sections.append(
            "top layers by MACs\n"
            + render_table(["layer", "op", "MACs", "share"], layer_rows, indent="  ", align="llrr")
        )
    if summary.initializer_bytes:
        dtype_rows = [
            [g.dtype, g.count, g.elements, g.bytes, format_bytes(g.bytes)]
            for g in summary.initializer_bytes
        ]
        headers = ["dtype", "tensors", "elements", "bytes", "size"]
        table = render_table(headers, dtype_rows, indent="  ", align="lrrrr")
        sections.append("initializers by dtype\n" + table)
    return "\n\n".join(sections)
