"""`slimgraph compare REF CANDIDATE [--data DATA.npz [--labels KEY]] [--json]`: fidelity on
onnxruntime.

With `--data`, the samples of the `.npz` (keys = input names, stacked on axis 0) run through both
models in batches; a labels key (default `labels`, never fed to the models) adds both models'
top-1 accuracy and the drop. Without data, `--samples` random batches fit to the reference's input
spec, drawn uniformly from the calibrated input range when the candidate is a statically quantized
model (its input QuantizeLinear's scale and zero point), standard normal otherwise; the output
says the figures come from random data. Prints per output: max abs error, mean abs error, cosine,
SQNR (dB), top-1 agreement.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import onnx_ir as ir
import onnxruntime as ort

from slimgraph import ir as sg_ir
from slimgraph import runtime
from slimgraph._tables import emit, to_json
from slimgraph.errors import BadDataError, BadOptionError, UnsupportedModelError
from slimgraph.runtime import metrics
from slimgraph.tools._common import add_json_option

__all__ = [
    "register", "open_session", "positive_int", "add_batch_option", "checked_batch", "ORT_ERRORS",
    "first_line", "random_data_note",
]

# onnxruntime's own exception types (Fail, InvalidArgument, InvalidGraph, ...): plain Exceptions.
ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    error
    for error in vars(ort.capi.onnxruntime_pybind11_state).values()
    if isinstance(error, type) and issubclass(error, Exception)
)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_batch_option(parser: argparse.ArgumentParser, help: str) -> None:
    """Add `--batch N` (rows per run, at least 1; default None: the command's own default)."""
    parser.add_argument("--batch", type=positive_int, default=None, help=help)


def checked_batch(
    batch: int | None, models: Sequence[tuple[ir.Model, str]], default: Callable[[], int]
) -> int:
    """`--batch` when given, checked against each (model, label)'s fixed batch dimension;
    else `default()`.

    Raises:
        BadOptionError: a model whose batch dimension is fixed to another size.
    """
    if batch is None:
        return default()
    for model, label in models:
        runtime.check_batch(model, batch, label=label)
    return batch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="output fidelity of a candidate model against a reference",
        description="Run two models on the same inputs and measure how close their outputs are.",
    )
    parser.add_argument("reference", metavar="REF", help="the reference .onnx model")
    parser.add_argument("candidate", metavar="CANDIDATE", help="the candidate .onnx model")
    parser.add_argument(
        "--data", metavar="DATA.npz",
        help="samples: keys = input names, stacked on axis 0, plus optional labels",
    )
    parser.add_argument(
        "--labels", metavar="KEY", default=metrics.DEFAULT_LABELS,
        help="key of the class labels in --data (default 'labels'): top-1 accuracy and drop",
    )
    add_batch_option(parser, "rows per run (default 8, or the model's fixed batch); an error for "
                     "a model with another fixed batch")
    parser.add_argument(
        "--samples",
        type=positive_int,
        default=4,
        help="random batches when no --data is given (default 4)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--threads", type=positive_int, default=None, help="intra-op threads")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    reference = sg_ir.load(args.reference)
    candidate = sg_ir.load(args.candidate)
    _check_same_inputs(reference, candidate, args.reference, args.candidate)
    args.batch = checked_batch(args.batch, [(reference, args.reference),
                                            (candidate, args.candidate)],
                               lambda: _fixed_batch(reference, 8))  # fmt: skip
    data = None
    random_note = ""
    feeds: Iterable[Any]
    if args.data:
        data = metrics.load_data(args.data, reference, labels=args.labels)
        feeds = data.batches(args.batch, reference)
        source = f"{args.data} ({data.samples} samples)"
    else:
        ranges = runtime.calibrated_ranges(candidate) or runtime.calibrated_ranges(reference)
        feeds = [
            runtime.random_feeds(reference, batch=args.batch, seed=args.seed + i, ranges=ranges)
            for i in range(args.samples)
        ]
        source = f"random inputs ({args.samples} batches of {args.batch}, seed {args.seed})"
        random_note = random_data_note(ranges)
    ref_session = open_session(reference, args.reference, threads=args.threads)
    cand_session = open_session(candidate, args.candidate, threads=args.threads)
    accuracy = _Accuracy()
    try:
        fidelity = accuracy.compare(ref_session, cand_session, feeds)
    except ORT_ERRORS as error:  # e.g. a batch size a Reshape inside the model rejects
        raise BadDataError(f"onnxruntime could not run the models: {first_line(error)}") from None
    if args.json:
        header: dict[str, object] = {
            "reference": args.reference, "candidate": args.candidate, "data": source,
            "random_data": not args.data,
        }
        if random_note:
            header["note"] = random_note
        if accuracy.rows:
            header["accuracy"] = accuracy.to_dict()
        emit(to_json({**header, **fidelity.to_dict()}))
        return 0
    lines = [f"reference  {args.reference}\ncandidate  {args.candidate}\ndata       {source}"]
    if random_note:
        lines.append(f"note       {random_note}")
    lines += ["", fidelity.table()]
    if accuracy.rows:
        lines.append(
            f"top-1 accuracy ('{args.labels}', {accuracy.rows} samples): reference "
            f"{accuracy.reference:.2%}, candidate {accuracy.candidate:.2%}, drop "
            f"{(accuracy.reference - accuracy.candidate) * 100:.2f} points"
    )
    emit("\n".join(lines))
    return 0


def random_data_note(ranges: dict[str, tuple[float, float]]) -> str:
    """What a comparison on random inputs means: said in every output that reports one."""
    if ranges:
        spans = ", ".join(f"{name} in [{low:.4g}, {high:.4g}]" for name, (low, high) in
                          ranges.items())
        return (f"figures come from random data (no --data), drawn uniformly from the "
                f"calibrated input range of the quantized model ({spans}); pass --data for "
                "real inputs")
    return ("figures come from random data (no --data): standard-normal inputs may lie far "
            "outside the range the model was calibrated or trained on; pass --data for real "
            "inputs")


class _Accuracy:
    """Top-1 accuracy of both models, counted in the same runs as the fidelity."""

    def __init__(self) -> None:
        self.rows = self.ref_correct = self.cand_correct = 0

    def compare(self, ref_session, cand_session, batches) -> runtime.Fidelity:  # noqa: ANN001
        """Fidelity over `batches` (feed dicts or (feeds, labels) pairs), scoring labels too."""
        fidelity = runtime.FidelityAccumulator()
        for item in batches:
            feed, labels = item if isinstance(item, tuple) else (item, None)
            ref = runtime.run(ref_session, feed)
            cand = runtime.run(cand_session, feed)
            fidelity.add(ref, cand)
            if labels is not None:
                self.ref_correct += metrics.top1_correct(next(iter(ref.values())), labels)
                self.cand_correct += metrics.top1_correct(next(iter(cand.values())), labels)
                self.rows += len(labels)
        return fidelity.result()

    @property
    def reference(self) -> float:
        return self.ref_correct / self.rows

    @property
    def candidate(self) -> float:
        return self.cand_correct / self.rows

    def to_dict(self) -> dict[str, float | int]:
        return {"samples": self.rows, "reference": self.reference, "candidate": self.candidate,
                "drop": self.reference - self.candidate}


def open_session(
    model: ir.Model,
    label: str | os.PathLike[str],
    *,
    threads: int | None = None,
    optimization: runtime.OptLevel = "all",
) -> ort.InferenceSession:
    """An onnxruntime session, or one clear line naming the model onnxruntime cannot load."""
    try:
        return runtime.create_session(model, threads=threads, optimization=optimization)
    except (RuntimeError, *ORT_ERRORS) as error:  # type: ignore[misc]  # mypy: star in a tuple
        raise UnsupportedModelError(
            f"{label}: onnxruntime cannot load the model: {first_line(error)}"
        ) from None


def _check_same_inputs(
    reference: ir.Model, candidate: ir.Model, ref_label: str, cand_label: str
) -> None:
    ref_specs = runtime.input_specs(reference)
    cand_specs = runtime.input_specs(candidate)
    ref_key = [(s.name, s.dtype) for s in ref_specs]
    cand_key = [(s.name, s.dtype) for s in cand_specs]
    if sorted(ref_key) != sorted(cand_key):
        raise BadOptionError(
            f"{cand_label} takes different inputs than {ref_label}: "
            f"{runtime.feeds.describe_inputs(cand_specs)} vs "
            f"{runtime.feeds.describe_inputs(ref_specs)}"
        )


def _fixed_batch(model: ir.Model, otherwise: int) -> int:
    """The batch size of the model's first input with a fixed one, else `otherwise`."""
    fixed = [s.shape[0] for s in runtime.input_specs(model)
             if s.shape and isinstance(s.shape[0], int)]  # fmt: skip
    return fixed[0] if fixed else otherwise


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
