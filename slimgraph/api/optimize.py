"""`slimgraph.optimize`: a preset or a recipe run as a verified pipeline, under a budget if asked.

The pipeline is `slimgraph.passes.pipeline` (steps from data, run by onnx_ir's `PassManager`,
each verified on onnxruntime). Here: the options (`OptimizeOptions`), the inputs verification
runs on (rows of the calibration or validation data when given), and the budget of the end
result against the input model. The report is the pipeline's `PipelineResult`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.api._options import BudgetOptions, takes_options
from slimgraph.api._speed import DEFAULT_PRESET
from slimgraph.errors import BadOptionError
from slimgraph.ir import ModelLike, as_model
from slimgraph.passes.pipeline import PipelineResult, run_pipeline
from slimgraph.passes.recipe import load_recipe
from slimgraph.passes.registry import PRESETS, ensure_registered
from slimgraph.runtime.budget import as_data
from slimgraph.runtime.feeds import iter_batches

__all__ = ["OptimizeOptions", "optimize", "optimize_with_report", "optimize_report"]

# Rows of calibration data reused to verify a pipeline: enough for stable cosine/SQNR figures.
_VERIFY_ROWS = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizeOptions(BudgetOptions):
    """The keywords of `optimize` and `optimize_with_report`, written once; each is documented
    on `optimize`. The budget keywords (`data`, `budget`, `max_drop`, `min_cosine`, `metric`)
    judge the end result against the input model; `data` also serves recipe steps' `max_drop`
    keys.

    Example:
        >>> OptimizeOptions(preset="transformer", verify=False).preset
        'transformer'
    """

    preset: str | None = DEFAULT_PRESET
    recipe: str | os.PathLike[str] | Sequence[str | Mapping[str, Any]] | None = None
    verify: bool = True
    feeds: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]] | None = None
    opset: int | None = None
    calibration: Any = None


@takes_options(OptimizeOptions)
def optimize_with_report(
    model: ModelLike, *, options: OptimizeOptions
) -> tuple[ir.Model, PipelineResult]:
    """`optimize`, also returning the `PipelineResult` (what each pass did, the end result's
    fidelity and, with a budget, its figures; `print(report)` shows the `slimgraph optimize`
    table).

    Args: as for `optimize`.

    Returns:
        (optimized model, `PipelineResult`).

    Raises: as for `optimize`.
    """
    result = _optimize(model, options)
    return result.model, result


@takes_options(OptimizeOptions)
def optimize_report(model: ModelLike, *, options: OptimizeOptions) -> PipelineResult:
    """`optimize`, returning the whole `PipelineResult` (`optimize_with_report`'s second item).

    Raises: as for `optimize`.
    """
    return _optimize(model, options)


@takes_options(OptimizeOptions)
def optimize(model: ModelLike, *, options: OptimizeOptions) -> ir.Model:
    """Optimize a copy of `model` with a preset or a recipe, each pass verified.

    Takes its options as keywords or as `options=` an `OptimizeOptions`; keywords given with
    `options=` replace its fields.

    Args:
        model: the input; never modified.
        preset: a registered preset ("lossless": exact cleanup + fusion; "cleanup-only").
        recipe: a recipe file (YAML/JSON) or a list of steps; replaces `preset` when given.
        verify: run every modifying pass's check on onnxruntime (see `run_pipeline`).
        feeds: sample inputs for verification (default: rows of `calibration` or `data` when
            given, else inputs generated to drive the model: `runtime.feeds.driving_feeds`).
        opset: convert the default-domain opset first (onnx's version converter, verified);
            None keeps the model's opset.
        calibration: data for the passes that take a `calibration` keyword (quantization);
            the exact passes do not use it.
        data: validation data (an .npz path, stacked arrays with an optional labels key, or
            `LabelledData`) for the budget and for recipe steps with a `max_drop` key.
        budget, max_drop, min_cosine, metric: the accuracy budget of the end result against
            `model` on `data` (`runtime.budget`); a result that misses it raises
            `VerificationError`.
        options: an `OptimizeOptions` instead of (or under) the keywords.

    Returns:
        The optimized model.

    Raises:
        BadOptionError: unknown preset or pass names, a bad recipe file (lists the known names),
            an impossible budget.
        VerificationError: a pass changed the outputs beyond its tolerance (names the pass), or
            the result missed the budget.
        TypeError: an unknown keyword, or `options` that is not an `OptimizeOptions`.

    Example:
        >>> import slimgraph as sg
        >>> small = sg.optimize(sg.load("resnet50.onnx"))  # doctest: +SKIP
    """
    return _optimize(model, options).model


def _optimize(model: ModelLike, options: OptimizeOptions) -> PipelineResult:
    model = as_model(model)
    preset, recipe, opset, feeds = options.preset, options.recipe, options.opset, options.feeds
    calibration = options.calibration
    labelled = None if options.data is None else as_data(options.data, model)
    judge = dataclasses.replace(options, data=labelled).judge(model)
    if recipe is not None:
        steps: list[str | Mapping[str, Any]] = (
            list(recipe) if isinstance(recipe, Sequence) and not isinstance(recipe, str)
            else list(load_recipe(recipe))
        )
    elif preset is not None:
        ensure_registered()
        if preset not in PRESETS:
            raise BadOptionError(
                f"unknown preset '{preset}' (known presets: {', '.join(sorted(PRESETS))})"
            )
        steps = [preset]
    else:
        raise BadOptionError("give a preset or a recipe")
    if opset is not None:
        steps = [{"name": "convert-opset", "opset": opset}, *steps]
    context = {"calibration": calibration} if calibration is not None else None
    if feeds is None and options.verify and calibration is not None:
        feeds = _verification_feeds(model, calibration)
    if feeds is None and options.verify and labelled is not None:
        feeds = _verification_feeds(model, labelled.feeds)  # the user's data, labels left out
    result = run_pipeline(
        model, steps, verify=options.verify, feeds=feeds, context=context, data=labelled
    )
    if judge is not None:
        result.evaluation = judge.check(result.model, what="the optimized model")
    return result


def _verification_feeds(
    model: ir.Model, calibration: Any
) -> list[dict[str, np.ndarray]] | None:
    """Real inputs for verification, taken from calibration data given as a file or arrays.

    Approximate passes (quantization) judged on random inputs report misleading fidelity: values
    outside the calibrated ranges are clipped. One-shot iterables are left to calibration alone.
    """
    if isinstance(calibration, (str, os.PathLike)):
        data: Mapping[str, np.ndarray] = as_data(calibration, model).feeds  # labels ignored
    elif isinstance(calibration, Mapping):
        data = calibration
    else:
        return None
    rows = {name: np.asarray(array)[:_VERIFY_ROWS] for name, array in data.items()}
    return list(iter_batches(rows, 16, model))
