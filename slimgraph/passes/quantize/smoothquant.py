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

The search prepares and calibrates once (one `StaticSession`): the walk that measures the
statistics also records each target's per-channel ranges, from which max |X_j| (hence s) and the
range of X / s follow for every alpha; histogram calibrators (percentile, entropy, MSE) take one
more walk that fills the histograms of X / s for all candidate alphas at once. The other values'
statistics are the unsmoothed model's (X / s @ s W = X @ W).

The rewrite and its targets (LayerNormalization, SkipLayerNormalization and RMSNorm outputs
read by MatMuls) live with the transformer passes, `slimgraph.passes.transformer.smoothing`;
this module measures, searches alpha and quantizes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BadOptionError
from slimgraph.ir import metadata
from slimgraph.passes.quantize.static import StaticSession
from slimgraph.passes.transformer.smoothing import (
    SmoothTarget,
    apply_smoothing,
    smooth,
    smooth_targets,
)
from slimgraph.runtime.calibrate import ChannelRanges, stream_values
from slimgraph.runtime.compare import compare
from slimgraph.runtime.histogram import TensorStats

__all__ = ["ALPHAS", "SmoothTarget", "smooth_targets", "channel_absmax", "apply_smoothing",
           "smooth_and_quantize", "parse_alpha"]  # SmoothTarget and the rewrite: re-exported

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
    result: dict[str, np.ndarray] = {}
    for values in stream_values(model, names, batches, progress=False):
        for name, array in values.items():
            flat = np.abs(array.reshape(-1, array.shape[-1])).max(axis=0)
            result[name] = flat if name not in result else np.maximum(result[name], flat)
    return result


def _score(reference: ir.Model, model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> float:
    fidelity = compare(reference, model, feeds)
    return float(min(out.cosine for out in fidelity.outputs))


# A candidate: its alpha (None: no smoothing), the smoothed model and what became X / s in it.
_Candidate = tuple[float | None, ir.Model, dict[str, tuple[str, np.ndarray]]]


def smooth_and_quantize(
    session: StaticSession, alpha: float | str | bool, *, report: bool = False,
    fmt: str | None = "qdq",
) -> ir.Model:
    """SmoothQuant on the session's prepared model, then its static quantization; with alpha
    "auto", the alpha in `ALPHAS` whose quantized model has the highest output cosine on the
    first calibration batches, or no smoothing if that scores best. The chosen alpha (None: no
    smoothing) is logged and stored in `model.meta[metadata.SMOOTH_QUANT_ALPHA]`.

    Raises:
        BadOptionError: bad alpha. BadDataError: calibration data that does not fit the model.
    """
    chosen = parse_alpha(alpha)
    if chosen is None:
        return session.build(report=report, fmt=fmt)
    prepared = session.prepared
    targets = smooth_targets(prepared)
    if not targets:
        logger.warning("smooth-quant: no LayerNorm output feeds a MatMul; quantizing as is")
        return session.build(report=report, fmt=fmt)
    names = [a.value for a in session.plan().activations]
    ranges = session.channel_ranges(names, [t.value for t in targets])
    absmax = {name: r.absmax() for name, r in ranges.items()}
    # "auto" also tries no smoothing: the search never returns worse than plain quantization
    alphas: tuple[float | None, ...] = (None, *ALPHAS) if chosen == "auto" else (float(chosen),)
    candidates: list[_Candidate] = [
        (a, prepared, {}) if a is None else (a, *smooth(prepared, absmax, a)) for a in alphas
    ]
    stats = _divided_statistics(session, candidates, ranges)
    best: tuple[float, int] | None = None
    if len(candidates) > 1:
        search = [feed for _, feed in zip(range(_SEARCH_BATCHES), session.batches, strict=False)]
        for index, candidate in enumerate(candidates):
            quantized = session.build(model=candidate[1], stats=stats[index])
            score = _score(prepared, quantized, search)
            logger.info("smooth-quant alpha %s: output cosine %.6f", candidate[0], score)
            if best is None or score > best[0]:
                best = (score, index)
    index = 0 if best is None else best[1]
    alpha_chosen, model, _ = candidates[index]
    logger.info("smooth-quant: alpha %s over %d activation(s)", alpha_chosen, len(targets))
    result = session.build(model=model, stats=stats[index], report=report, fmt=fmt)
    result.meta[metadata.SMOOTH_QUANT_ALPHA] = alpha_chosen
    return result


def _divided_statistics(
    session: StaticSession, candidates: Sequence[_Candidate], ranges: Mapping[str, ChannelRanges]
) -> list[dict[str, TensorStats]]:
    """Per candidate, the statistics of its values X / s: from the per-channel ranges for the
    range calibrators, else histograms filled in one more walk for every candidate at once."""
    if not session.histogram:
        return [{value: ranges[source].divided(s) for value, (source, s) in divided.items()}
                for _, _, divided in candidates]
    stats: list[dict[str, TensorStats]] = [
        {value: TensorStats(histogram=True) for value in divided}
        for _, _, divided in candidates
    ]
    sources = list(ranges)
    for values in stream_values(session.prepared, sources, session.batches, progress=False,
                                description="smoothing"):
        for (_, _, divided), found in zip(candidates, stats, strict=True):
            for value, (source, s) in divided.items():
                found[value].update(values[source] / s)
    return stats
