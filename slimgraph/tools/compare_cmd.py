"""`slimgraph compare`: the fidelity of a candidate model against a reference, on onnxruntime.

`slimgraph compare REF CANDIDATE [--data DATA.npz [--labels KEY]] [--json]`.

The command line of `slimgraph.runtime.compare` (`sg.compare`), which does the work and whose
table it prints: with `--data`, the samples of the `.npz` (keys = input names, stacked on axis 0)
run through both models in batches; a labels key (default `labels`, never fed to the models) adds
both models' top-1 accuracy and the drop. Without data, `--samples` random batches fit to the
reference's input spec, drawn uniformly from the calibrated input range when the candidate is a
statically quantized model, standard normal otherwise; the output says the figures come from
random data. Prints per output: max abs error, mean abs error, cosine, SQNR (dB), top-1 agreement;
for two causal language models on a token file (`.npz` with `input_ids` [rows, seq]) also both
perplexities and their next-token agreement (`--lm` requires it, `--no-lm` leaves it out).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

import onnx_ir as ir
import onnxruntime as ort

import slimgraph.ir as sg_ir
import slimgraph.runtime as runtime
from slimgraph._tables import emit, to_json
from slimgraph.errors import BadDataError, BadOptionError, UnsupportedModelError, first_line
from slimgraph.runtime.compare import DATA_BATCH, RANDOM_BATCH, RANDOM_BATCHES
from slimgraph.runtime.data import DEFAULT_LABELS, LabelledData, load_data
from slimgraph.tools._common import add_json_option

__all__ = [
    "register", "open_session", "positive_int", "add_batch_option", "checked_batch", "ORT_ERRORS",
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
        "--labels", metavar="KEY", default=None,
        help="key of the class labels in --data (default 'labels', used when present): top-1 "
             "accuracy and drop; a key given here must be in --data",
    )
    add_batch_option(parser, f"rows per run (default {DATA_BATCH} with --data, "
                     f"{RANDOM_BATCH} for random inputs, or the model's fixed "
                     "batch); an error for a model with another fixed batch")
    parser.add_argument(
        "--samples",
        type=positive_int,
        default=RANDOM_BATCHES,
        help=f"random batches when no --data is given (default {RANDOM_BATCHES})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--threads", type=positive_int, default=None, help="intra-op threads")
    parser.add_argument(
        "--lm", dest="language_model", action="store_const", const=True, default=None,
        help="score both models as causal LMs on --data (perplexity, next-token agreement); "
        "the default does so when both take token ids [batch, seq] and give logits "
        "[batch, seq, vocab]",
    )
    parser.add_argument("--no-lm", dest="language_model", action="store_const", const=False,
                        help="never score the models as LMs")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    reference = sg_ir.load(args.reference)
    candidate = sg_ir.load(args.candidate)
    _check_same_inputs(reference, candidate, args.reference, args.candidate)
    batch = checked_batch(args.batch, [(reference, args.reference), (candidate, args.candidate)],
                          lambda: 0) or None  # fmt: skip
    data = args.data if args.labels is None else _labelled(args, reference)
    fidelity = runtime.compare(
        reference, candidate, data, labels=args.labels or DEFAULT_LABELS, batch_size=batch,
        threads=args.threads, random_batches=args.samples, seed=args.seed,
        language_model=args.language_model,
    )
    if args.json:
        header = {"reference": args.reference, "candidate": args.candidate,
                  "random_data": not args.data}
        emit(to_json({**header, **fidelity.to_dict()}))
        return 0
    emit(fidelity.table([("reference", args.reference), ("candidate", args.candidate)]))
    return 0


def _labelled(args: argparse.Namespace, reference: ir.Model) -> LabelledData:
    """--data read with the labels key `--labels` names, which must be there.

    Raises:
        BadOptionError: `--labels` without `--data`.
        BadDataError: --data has no such key (its keys listed), or data that does not fit.
    """
    if not args.data:
        raise BadOptionError(f"--labels {args.labels} names the labels key of --data: give "
                             "--data DATA.npz")
    values = load_data(args.data, reference, labels=args.labels)
    if values.labels is None:
        reason = ("is an input of the model" if args.labels in values.feeds
                  else f"is not there (its keys: {', '.join(sorted(values.feeds))})")
        raise BadDataError(f"{args.data}: labels key '{args.labels}' {reason}")
    return values


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
