"""SmoothQuant: move activation outliers into the weights before static int8 quantization.

Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models". A LayerNorm output X [..., K] read by MatMuls with constant weights W [K, N]
often has a few channels with values 10-100x larger than the rest (large LayerNorm gains); one
per-tensor activation scale then spends its 256 levels on those channels. For each channel j,

    s_j = max|X_j| ** alpha / max|W_j, :| ** (1 - alpha)      (max over the calibration data and
                                                              over every MatMul reading X)

and X / s, s * W compute the same product: `(X / s) @ (diag(s) W) = X @ W`. The division folds
into the LayerNorm's gain and bias when the MatMuls are X's only readers (pre-LN blocks, GPT);
otherwise (post-LN BERT, where X is also the residual) a `Mul(X, 1/s)` is inserted in front of
the MatMuls only. Either way the rewrite is exact in float (tested at rtol 1e-4); the
quantization after it is what approximates. alpha (0 = leave activations, 1 = all difficulty to
the weights) is a float, or "auto": a small search over `ALPHAS`, each candidate quantized and
scored by output cosine against the float model on the first calibration batches (no smoothing
is a candidate too, so "auto" never scores below plain static quantization there).

Targets: outputs of LayerNormalization (axis -1, constant gain/bias) and of
com.microsoft.SkipLayerNormalization (output 0) read by at least one such MatMul.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BadOptionError
from slimgraph.ir import copy_model
from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes._kit import Names, add_initializer, constant_array

if TYPE_CHECKING:
    from slimgraph.runtime.calibrate import CalibrationData

__all__ = ["ALPHAS", "SmoothTarget", "smooth_targets", "channel_absmax", "apply_smoothing",
           "smooth_and_quantize", "parse_alpha"]

logger = logging.getLogger(__name__)

ALPHAS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_SEARCH_BATCHES = 4  # calibration batches used to score each alpha
_S_RANGE = (1e-5, 1e5)


@dataclasses.dataclass
class SmoothTarget:
    """An activation to smooth: its name, the LayerNorm making it, the MatMuls reading it.

    `gain_index`/`bias_index`: the LayerNorm's gain and bias inputs (None when not foldable);
    `foldable`: the MatMuls are the activation's only readers.
    """

    value: str
    norm: ir.Node
    matmuls: list[ir.Node]
    foldable: bool
    gain_index: int
    bias_index: int | None


def parse_alpha(value: float | str | bool | None) -> float | str | None:
    """`True`/"auto" -> "auto"; a number in [0, 1] -> float; None/False -> None.

    Raises:
        BadOptionError: anything else.
    """
    if value is None or value is False:
        return None
    if value is True or (isinstance(value, str) and value.lower() == "auto"):
        return "auto"
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise BadOptionError(
            f"smooth-quant alpha must be a number in [0, 1] or 'auto' (got {value!r})"
        ) from None
    if not 0.0 <= alpha <= 1.0:
        raise BadOptionError(f"smooth-quant alpha must be in [0, 1] (got {alpha})")
    return alpha


def _norm_params(node: ir.Node) -> tuple[int, int | None] | None:
    if is_onnx_op(node, "LayerNormalization"):
        if node.attributes.get_int("axis", -1) not in (-1,):
            rank = len(node.inputs[0].shape) if node.inputs[0] and node.inputs[0].shape else None
            if rank is None or node.attributes.get_int("axis", -1) != rank - 1:
                return None
        return 1, (2 if len(node.inputs) > 2 and node.inputs[2] is not None else None)
    if node.domain == "com.microsoft" and node.op_type == "SkipLayerNormalization":
        return 2, (3 if len(node.inputs) > 3 and node.inputs[3] is not None else None)
    return None


def smooth_targets(model: ir.Model) -> list[SmoothTarget]:
    """The LayerNorm outputs read by MatMuls with a constant [K, N] weight (see module doc)."""
    targets = []
    for node in model.graph:
        params = _norm_params(node)
        if params is None:
            continue
        gain = constant_array(node.inputs[params[0]])
        if gain is None or gain.ndim != 1:
            continue
        out = node.outputs[0]
        matmuls, others = [], 0
        for use in out.uses():
            reader = use.node
            weight = constant_array(reader.inputs[1]) if is_onnx_op(reader, "MatMul") else None
            if use.idx == 0 and weight is not None and weight.ndim == 2 and (
                weight.shape[0] == gain.shape[0]
            ):
                matmuls.append(reader)
            else:
                others += 1
        if not matmuls or out.name is None:
            continue
        bias_ok = params[1] is None or constant_array(node.inputs[params[1]]) is not None
        foldable = others == 0 and not out.is_graph_output() and bias_ok
        targets.append(SmoothTarget(out.name, node, matmuls, foldable, params[0], params[1]))
    return targets


def channel_absmax(model: ir.Model, names: Sequence[str],
                   batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """max |X_j| per last-axis channel of each value in `names`, streamed over `batches`."""
    from slimgraph.runtime.calibrate import stream_values

    result: dict[str, np.ndarray] = {}
    for values in stream_values(model, names, batches, progress=False):
        for name, array in values.items():
            flat = np.abs(array.reshape(-1, array.shape[-1])).max(axis=0)
            result[name] = flat if name not in result else np.maximum(result[name], flat)
    return result


def _factors(target: SmoothTarget, absmax: np.ndarray, alpha: float) -> np.ndarray:
    weights = [constant_array(m.inputs[1]) for m in target.matmuls]
    w_max = np.max([np.abs(w).max(axis=1) for w in weights if w is not None], axis=0)
    x_max = absmax.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(x_max, alpha) / np.power(w_max.astype(np.float64), 1.0 - alpha)
    s = np.where((x_max > 0) & (w_max > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, *_S_RANGE).astype(np.float32)


def apply_smoothing(model: ir.Model, absmax: Mapping[str, np.ndarray],
                    alpha: float) -> ir.Model:
    """A copy of `model` with every smooth target rewritten for `alpha` (exact in float)."""
    smoothed = copy_model(model)
    graph = smoothed.graph
    names = Names(graph)
    for target in smooth_targets(smoothed):
        if target.value not in absmax:
            continue
        s = _factors(target, absmax[target.value], alpha)
        for matmul in target.matmuls:
            weight = constant_array(matmul.inputs[1])
            assert weight is not None
            hint = names.fresh(f"{matmul.inputs[1].name or 'weight'}_smooth")  # type: ignore[union-attr]
            matmul.replace_input_with(1, add_initializer(graph, hint, weight * s[:, None]))
        norm = target.norm
        if target.foldable:
            indices = [target.gain_index] + ([target.bias_index] if target.bias_index else [])
            for index in indices:
                array = constant_array(norm.inputs[index])
                assert array is not None
                hint = names.fresh(f"{norm.inputs[index].name or 'norm'}_smooth")  # type: ignore[union-attr]
                norm.replace_input_with(index, add_initializer(graph, hint, (array / s).astype(
                    array.dtype)))
        else:
            inverse = add_initializer(graph, names.fresh(f"{target.value}_smooth_inv"),
                                      (1.0 / s).astype(np.float32))
            mul = ir.node("Mul", [norm.outputs[0], inverse], name=names.fresh(
                f"{norm.name or 'norm'}_smooth"))
            mul.outputs[0].name = names.fresh(f"{target.value}_smoothed")
            if norm.outputs[0].dtype is not None:
                mul.outputs[0].dtype = norm.outputs[0].dtype
            mul.outputs[0].shape = norm.outputs[0].shape
            mul.metadata_props.update(norm.metadata_props)
            graph.insert_after(norm, mul)
            for matmul in target.matmuls:
                matmul.replace_input_with(0, mul.outputs[0])
    return smoothed


def _score(reference: ir.Model, model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> float:
    from slimgraph.runtime import compare

    fidelity = compare(reference, model, feeds)
    return float(min(out.cosine for out in fidelity.outputs))


def smooth_and_quantize(
    model: ir.Model,
    calibration: CalibrationData,
    alpha: float | str | bool,
    quantize: Callable[[ir.Model, object], ir.Model],
    *,
    batch_size: int = 32,
) -> ir.Model:
    """SmoothQuant then `quantize(smoothed, batches)` (static quantization with the caller's
    options); with alpha "auto", the alpha in `ALPHAS` whose quantized model has the highest
    output cosine on the first calibration batches, or no smoothing if that scores best. The chosen
    alpha (None: no smoothing) is logged and stored in `model.meta["slimgraph.smooth_quant_alpha"]`.

    Raises:
        BadOptionError: bad alpha. BadDataError: calibration data that does not fit the model.
    """
    from slimgraph.runtime.calibrate import calibration_batches

    chosen = parse_alpha(alpha)
    if chosen is None:
        return quantize(model, calibration)
    from slimgraph.passes.quantize.api import prepare

    batches = calibration_batches(model, calibration, batch_size=batch_size)
    model = prepare(model)  # weights as constants (the exporter transposes them at run time)
    targets = smooth_targets(model)
    if not targets:
        logger.warning("smooth-quant: no LayerNorm output feeds a MatMul; quantizing as is")
        return quantize(model, batches)
    absmax = channel_absmax(model, [t.value for t in targets], batches)
    # "auto" also tries no smoothing: the search never returns worse than plain quantization
    candidates: tuple[float | None, ...] = (None, *ALPHAS) if chosen == "auto" else (
        float(chosen),)
    best: tuple[float, float | None, ir.Model] | None = None
    search = [feed for _, feed in zip(range(_SEARCH_BATCHES), batches, strict=False)]
    for candidate in candidates:
        smoothed = model if candidate is None else apply_smoothing(model, absmax, candidate)
        quantized = quantize(smoothed, batches)
        score = _score(model, quantized, search) if len(candidates) > 1 else 1.0
        logger.info("smooth-quant alpha %s: output cosine %.6f", candidate, score)
        if best is None or score > best[0]:
            best = (score, candidate, quantized)
    assert best is not None
    logger.info("smooth-quant: alpha %s over %d activation(s)", best[1], len(targets))
    best[2].meta["slimgraph.smooth_quant_alpha"] = best[1]
    return best[2]
