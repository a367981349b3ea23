"""`slimgraph bench MODEL [MODEL ...] [--batch N] [--json]`: latency side by side.

Models run interleaved in shuffled order each round (`slimgraph.runtime.benchmark`); the table
gives each model's median and p90 per run and its median as a ratio to the first model's. Each
model gets random inputs fit to its own input spec (symbolic batch dimensions take N), drawn with
the same seed, so models with the same inputs see the same values.
"""

from __future__ import annotations

import argparse
from typing import cast

import slimgraph.ir as sg_ir
import slimgraph.runtime as runtime
from slimgraph._tables import emit, format_ratio, format_shape, to_json
from slimgraph.errors import BadDataError, BadOptionError, first_line
from slimgraph.tools._common import add_json_option
from slimgraph.tools.compare_cmd import (
    ORT_ERRORS,
    add_batch_option,
    checked_batch,
    open_session,
    positive_int,
)

__all__ = ["register"]

_LEVELS = ("disable", "basic", "extended", "all")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="latency of one or more models, side by side",
        description="Time models interleaved in the same rounds; ratios are to the first model.",
    )
    parser.add_argument(
        "models", metavar="MODEL", nargs="+", help=".onnx files; the first is the baseline"
    )
    add_batch_option(parser, "rows per run: the symbolic batch dimension's value (default 1); an "
                     "error for a model with a fixed batch")
    parser.add_argument(
        "--rounds", type=positive_int, default=20, help="measured rounds (default 20)"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="unmeasured runs per model first (default 3)"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="intra-op threads (default: all cores)"
    )
    parser.add_argument(
        "--opt-level",
        choices=_LEVELS,
        default="all",
        help="onnxruntime graph optimization level (default all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.warmup < 0:
        raise BadOptionError(f"--warmup must be 0 or more, got {args.warmup}")
    models = [sg_ir.load(path) for path in args.models]
    args.batch = checked_batch(args.batch, list(zip(models, args.models, strict=True)),
                               lambda: 1)  # fmt: skip
    labels = _labels(args.models)
    feeds = [runtime.random_feeds(m, batch=args.batch, seed=args.seed) for m in models]
    sessions = [
        open_session(m, path, threads=args.threads, optimization=args.opt_level)
        for m, path in zip(models, args.models, strict=True)
    ]
    try:
        result = runtime.benchmark(
            sessions,
            feeds,
            labels=labels,
            rounds=args.rounds,
            warmup=args.warmup,
            threads=args.threads,
            optimization=args.opt_level,
            seed=args.seed,
        )
    except ORT_ERRORS as error:  # e.g. a batch size a Reshape inside the model rejects
        raise BadDataError(
            f"onnxruntime could not run the models with batch {args.batch}: {first_line(error)}"
        ) from None
    shapes = [
        "; ".join(f"{name}{format_shape(list(a.shape))}" for name, a in feed.items())
        for feed in feeds
    ]
    if args.json:
        data = result.to_dict()
        entries = cast(list[dict[str, object]], data["models"])
        for entry, path, shape in zip(entries, args.models, shapes, strict=True):
            entry["path"] = path
            entry["inputs"] = shape
        data["batch"] = args.batch
        emit(to_json(data))
        return 0
    emit(result.table(shapes) + _noise_lines(result))
    return 0


def _noise_lines(result: runtime.BenchmarkResult) -> str:
    """Which pairs of models are within noise of each other (their ratio's interval holds 1)."""
    if len(result.timings) < 2:
        return ""
    close = [c for c in result.comparisons if c.within_noise]
    if not close:
        return "\nno two models are within noise of each other"
    # the later model against the earlier, as the table's ratios read (b / a = 1 / (a / b))
    lines = [
        f"within noise: {c.b} against {c.a} ({format_ratio(1 / c.ratio)}, interval "
        f"{1 / c.high:.2f}-{1 / c.low:.2f})"
        for c in close
    ]
    return "\n" + "\n".join(lines)


def _labels(paths: list[str]) -> list[str]:
    """The paths as given; repeats get '#2', '#3', ... so every row is distinct."""
    seen: dict[str, int] = {}
    labels = []
    for path in paths:
        seen[path] = seen.get(path, 0) + 1
        labels.append(path if seen[path] == 1 else f"{path}#{seen[path]}")
    return labels
