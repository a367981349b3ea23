"""The float model every quantization mode starts from: constants and BatchNorm folded, verified.

`prepare` runs the pipeline's exact `lossless` passes (without `compact-constants`) on a copy,
folds weights computed at run time, raises the opset to what Q/DQ needs, names every node and
gives a Conv with a BatchNorm folded in its conv's layer name; with a feed it checks the result
against the input on onnxruntime. `check_exclusions` refuses `--exclude` patterns and op types
that select nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from slimgraph.errors import (
    SlimgraphError,
    UnsupportedModelError,
    VerificationError,
    first_line,
)
from slimgraph.ir import copy_model, metadata, select
from slimgraph.passes import LOSSLESS_STEPS, run_pipeline
from slimgraph.passes._kit import PrepareWeightsPass
from slimgraph.passes.opset import ConvertOpsetPass
from slimgraph.passes.quantize.policy import WEIGHT_OPS
from slimgraph.passes.quantize.qdq import MIN_OPSET
from slimgraph.runtime import create_session, iter_batches, run
from slimgraph.runtime.exact import exact_difference
from slimgraph.runtime.feeds import driving_feeds

__all__ = ["prepare", "check_exclusions", "generated_feed"]


def check_exclusions(
    model: ir.Model, exclude: Sequence[str], exclude_ops: Sequence[str] = ()
) -> None:
    """Every `--exclude` pattern must select a node (by layer, node or output tensor name: the
    report prints all three) and every `--exclude-op` must be an op type of the model.

    Raises:
        BadOptionError: a pattern or op type that matches nothing (it would be a silent no-op).
    """
    select.check_exclusions(model.graph.all_nodes(), exclude, exclude_ops, tensors=True)


def prepare(
    model: ir.Model, feed: dict[str, np.ndarray] | None = None, *, matmul_to_gemm: bool = True
) -> ir.Model:
    """A copy with constants folded and BatchNorm folded into Conv/ConvTranspose/Gemm, verified.

    Uses the pipeline's lossless passes (exact). With `feed`, the result is compared with the
    model on onnxruntime; a difference beyond fp32 tolerance raises `VerificationError`.
    `matmul_to_gemm=False` keeps MatMul+Add apart (weight-only quantizes MatMuls only: a Linear
    with bias must stay a MatMul).

    Raises:
        VerificationError: the prepared model's outputs differ from the model's on `feed`.
        UnsupportedModelError: the model does not run on onnxruntime (with `feed`).
    """
    steps = [
        step for step in LOSSLESS_STEPS
        if step != "compact-constants" and (matmul_to_gemm or step != "matmul-add-to-gemm")
    ]
    prepared = run_pipeline(copy_model(model), steps).model
    # weights computed at run time that the cleanup did not fold (above its size limits)
    PrepareWeightsPass(scope=WEIGHT_OPS)(prepared)
    if prepared.opset_imports.get("", 0) < MIN_OPSET:
        prepared = ConvertOpsetPass(opset=MIN_OPSET)(prepared).model
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(prepared)
    _name_nodes(prepared)
    _weight_layers(prepared)
    if feed is not None:
        _verify(model, prepared, _first_rows(model, feed))
    return prepared


def _weight_layers(model: ir.Model) -> None:
    """A Conv with a BatchNorm folded in belongs to the conv's layer (its weight's name), not
    the BatchNorm's the fusion may have left on it."""
    for node in model.graph:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.inputs) > 1:
            weight = node.inputs[1]
            name = weight.name if weight is not None and weight.is_initializer() else None
            if name is not None and name.endswith(".weight"):
                node.metadata_props[metadata.LAYER] = name[: -len(".weight")]


def _name_nodes(model: ir.Model) -> None:
    used: set[str] = set()
    for index, node in enumerate(model.graph):
        if not node.name or node.name in used:
            node.name = f"{node.op_type}_{index}"
        used.add(node.name)


def _first_rows(model: ir.Model, feed: Mapping[str, Any]) -> Mapping[str, Any]:
    """One row of a batch (or the model's fixed batch): enough to check an exact rewrite. A
    feed that is not a batch of rows (scalars, sequences, inputs of different lengths) is
    checked whole."""
    values = list(feed.values())
    if not values or not all(isinstance(v, np.ndarray) and v.ndim >= 1 for v in values):
        return feed
    if len({v.shape[0] for v in values}) != 1 or values[0].shape[0] < 2:
        return feed
    return next(iter_batches(feed, 1, model), feed)


def generated_feed(model: ir.Model) -> dict[str, Any]:
    """Inputs that drive the model (`runtime.feeds.driving_feeds`), to check `prepare` in the
    modes that need no data (dynamic, weight-only).

    Raises:
        UnsupportedModelError: no generated inputs run the model (the message says how to skip
            the check).
    """
    try:
        return driving_feeds(model, who="the model")[0]
    except UnsupportedModelError as error:
        raise UnsupportedModelError(
            f"{error}; dynamic and weight-only quantization do not need to run it: pass "
            "--no-verify (verify=False)"
        ) from None


def _verify(reference: ir.Model, prepared: ir.Model, feed: Mapping[str, Any]) -> None:
    try:
        session = create_session(reference)
    except SlimgraphError:
        raise
    except Exception as error:  # onnxruntime's own classes: custom ops, invalid graphs
        raise UnsupportedModelError(
            f"the model does not run on onnxruntime ({first_line(error)}); dynamic and "
            "weight-only quantization do not need to run it: pass --no-verify (verify=False)"
        ) from None
    ref = run(session, feed)
    got = run(create_session(prepared), feed)
    for name, expected in ref.items():
        if name not in got or exact_difference(expected, got[name]) is not None:
            raise VerificationError(
                f"folding BatchNorm/constants before quantization changed output '{name}'"
            )
