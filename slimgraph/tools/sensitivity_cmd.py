"""`slimgraph sensitivity`: how much the metric moves when one layer alone is compressed.

`slimgraph sensitivity MODEL --data D [--method quantize|prune|factorize] [--calib C] [--json]
[--report DIR]` (docs/architecture.md, "Metrics, budgets, sensitivity and search").

Compresses one layer at a time and measures the model on `--data` (top-1 accuracy with labels,
else the output cosine to MODEL); prints the layers most sensitive first, each with the node name
`--exclude` takes. `--report DIR` writes report.json/report.txt and a bar chart per layer.
"""

from __future__ import annotations

import argparse

import slimgraph.ir as sg_ir
from slimgraph.api.sensitivity import METHODS, sensitivity
from slimgraph.errors import BadOptionError
from slimgraph.runtime.metrics import DEFAULT_LABELS, load_data
from slimgraph.tools._common import add_json_option, add_model_arguments, print_result
from slimgraph.tools.report import add_report_option, check_report_dir, command_line, write_report

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sensitivity",
        help="per-layer sensitivity: the metric when only one layer is compressed",
        description=(
            "Compress each layer alone (int8 quantization, channel pruning or low-rank) and "
            "measure the model on --data: top-1 accuracy with labels, else the output cosine. "
            "Layers are listed most sensitive first; the node column is what --exclude takes."
        ),
    )
    add_model_arguments(parser, "the float .onnx model", output=False)
    parser.add_argument("--data", metavar="VAL.npz", required=True,
                        help="validation data: input names stacked on axis 0, optional labels")
    parser.add_argument("--labels", metavar="KEY", default=DEFAULT_LABELS,
                        help="key of the class labels in --data (default 'labels')")
    parser.add_argument("--method", choices=METHODS, default="quantize",
                        help="compression applied to one layer at a time (default quantize)")
    parser.add_argument("--calib", metavar="DATA.npz", default=None,
                        help="quantize: calibration data (default: the inputs of --data)")
    parser.add_argument("--ratio", type=float, default=0.5,
                        help="prune: fraction of a group's channels removed (default 0.5)")
    parser.add_argument("--rank-ratio", dest="rank_ratio", type=float, default=0.25,
                        help="factorize: rank ratio of a layer (default 0.25)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="PAT",
                        help="layer or node names (fnmatch patterns) left out")
    add_report_option(parser, "the per-layer sensitivity table and bar chart")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    folder = check_report_dir(args.report)
    if args.calib and args.method != "quantize":
        raise BadOptionError(f"--calib is only used by --method quantize, not {args.method}")
    model = sg_ir.load(args.model)
    data = load_data(args.data, model, labels=args.labels)
    calibration = None
    if args.calib:
        calibration = load_data(args.calib, model, labels=args.labels).feeds
    table = sensitivity(
        model, data, method=args.method, calibration=calibration, ratio=args.ratio,
        rank_ratio=args.rank_ratio, exclude=args.exclude,
    )
    text = table.render()
    if folder is not None:
        report = {**table.report(), "command": command_line(args), "model": args.model,
                  "data": args.data}
        write_report(folder, report, text=text)
    return print_result(args, {"model": args.model, "data": args.data, **table.to_dict()}, text)
