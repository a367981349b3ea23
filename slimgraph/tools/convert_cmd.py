"""`slimgraph convert MODEL -o OUT --fp16 [--keep-op OP ...]`: precision conversion.

float32 weights and internal values become float16; model inputs and outputs stay float32 unless
`--fp16-io`; ops that overflow in fp16 stay float32 (`--keep-op` replaces that list). Prints the
sizes and what was converted; `--json` prints one object. Written atomically, never over the input.
"""

from __future__ import annotations

import argparse
from typing import cast

import slimgraph.ir as sg_ir
from slimgraph._tables import emit, format_bytes, render_fields, to_json
from slimgraph.errors import BadOptionError
from slimgraph.passes.precision import DEFAULT_KEEP_OPS, Fp16Pass, Fp16Result
from slimgraph.tools._common import add_json_option, add_model_arguments, output_paths

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="precision conversion: --fp16 (float32 I/O kept, overflow-prone ops kept float32)",
        description=(
            "Convert float32 weights and internal values to float16. Model inputs and outputs "
            "stay float32 (Casts at the boundaries); ops that overflow in fp16 stay float32: "
            f"{', '.join(DEFAULT_KEEP_OPS)} unless --keep-op names others."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument("--fp16", action="store_true", help="convert to float16 (required)")
    parser.add_argument("--keep-op", dest="keep_ops", action="append", default=None, metavar="OP",
                        help="op type kept in float32 (repeatable; replaces the default list; "
                             "--keep-op none keeps nothing)")  # fmt: skip
    parser.add_argument("--fp16-io", dest="fp16_io", action="store_true",
                        help="make float32 model inputs and outputs float16 too")  # fmt: skip
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not args.fp16:
        raise BadOptionError("say which precision to convert to: --fp16")
    source, target = output_paths(args)
    keep_ops: tuple[str, ...] = DEFAULT_KEEP_OPS
    if args.keep_ops is not None:
        names = [name for entry in args.keep_ops for name in entry.split(",") if name]
        keep_ops = () if [n.lower() for n in names] == ["none"] else tuple(names)
    model = sg_ir.load(source)
    size_before = sg_ir.size_on_disk(source, model)
    result = cast(Fp16Result, Fp16Pass(keep_io_types=not args.fp16_io, keep_ops=keep_ops)(model))
    sg_ir.save(result.model, target)
    size_after = sg_ir.size_on_disk(target)
    kept = sorted(set(result.kept_nodes))
    summary = {
        "input": str(source),
        "output": str(target),
        "size_bytes_before": size_before,
        "size_bytes_after": size_after,
        "size_ratio": size_after / size_before if size_before else None,
        "converted_nodes": result.converted_nodes,
        "converted_initializers": result.converted_initializers,
        "kept_float32": kept,
        "keep_ops": list(keep_ops),
        "casts_inserted": result.casts_inserted,
        "clipped_values": result.clipped_values,
    }
    if args.json:
        emit(to_json(summary))
        return 0
    emit(
        f"wrote {target}\n"
        + render_fields(
            [
                ("size", f"{format_bytes(size_before)} -> {format_bytes(size_after)} "
                         f"({size_after / size_before:.3f}x)"),  # fmt: skip
                ("converted", f"{result.converted_nodes} nodes, "
                              f"{result.converted_initializers} initializers"),  # fmt: skip
                ("kept float32", f"{len(kept)} nodes ({', '.join(keep_ops) or 'no op types'})"),
                ("casts inserted", result.casts_inserted),
                ("clipped to +-65504", result.clipped_values),
            ]
        )
    )
    return 0
