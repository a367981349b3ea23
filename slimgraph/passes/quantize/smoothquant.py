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

The rewrite and its targets (LayerNormalization, SkipLayerNormalization and RMSNorm outputs
read by MatMuls) live with the transformer passes, `slimgraph.passes.transformer.smoothing`;
this module measures, searches alpha and quantizes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BadOptionError
from slimgraph.passes.transformer.smoothing import (
    SmoothTarget,
    apply_smoothing,
    smooth_targets,
)

if TYPE_CHECKING:
    from slimgraph.runtime.calibrate import CalibrationData

__all__ = ["ALPHAS", "SmoothTarget", "smooth_targets", "channel_absmax", "apply_smoothing",
           "smooth_and_quantize", "parse_alpha"]  # the first three re-exported (transformer)

logger = logging.getLogger(__name__)

ALPHAS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_SEARCH_BATCHES = 4  # calibration batches used to score each alpha


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
    from slimgraph.passes.quantize.modes import prepare

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
