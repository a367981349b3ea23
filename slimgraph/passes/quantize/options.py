"""The options of quantization, written once: one frozen dataclass per entry point.

`StaticOptions` is what the pipeline's `quantize` step takes (`StaticQuantizePass`);
`QuantizeOptions` adds what `QuantizePass` takes on top (mode, report, weight-only bits,
SmoothQuant...); the public `slimgraph.QuantizeOptions` (`slimgraph.api.quantize`) adds the
accuracy budget. Values are checked where they are used (the messages name the CLI flags), not
here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["ActivationDtype", "Mode", "Rounding", "StaticOptions", "QuantizeOptions"]

ActivationDtype = Literal["auto", "uint8", "int8"]
Mode = Literal["static", "dynamic", "weight-only"]
Rounding = Literal["nearest", "adaround", "adaquant"]


@dataclass(frozen=True, kw_only=True)
class StaticOptions:
    """Calibrated static quantization (see `slimgraph.quantize` for each option).

    Attributes:
        method: the calibrator choosing activation ranges (`runtime.histogram.METHODS`).
        per_channel: per-channel weight scales (else one per weight).
        fmt: "qdq" or "qoperator".
        exclude: name patterns (node, torch layer or tensor names, fnmatch) left float.
        exclude_ops: op types left float.
        include_ops: op types left float by default to quantize anyway.
        activation_dtype: "auto" (uint8 on x86), "uint8" or "int8".
        equalize: cross-layer equalization of Conv/Gemm pairs before quantizing (exact).
        bias_correction: empirical bias correction of the quantized layers (calibration data).
        weight_bits: bits of the weights' codes, 8 or 4 (4: int8 storage, codes in [-7, 7]).
        round: how weights round to their grid: "nearest", "adaround" (learned up-or-down
            rounding) or "adaquant" (learned weights, scales and biases), both layer by layer
            against the float model on the calibration data (`passes.quantize.adaround`).
        range_bounds: value name -> (low, high) each calibrated activation range is narrowed to
            (zero kept inside); `--zero-shot` gives the ranges its BatchNorms' running
            statistics allow (`runtime.torch_backend.batchnorm_bounds`).
    """

    method: str = "minmax"
    per_channel: bool = True
    fmt: str | None = "qdq"
    exclude: Sequence[str] = ()
    exclude_ops: Sequence[str] = ()
    include_ops: Sequence[str] = ()
    activation_dtype: ActivationDtype = "auto"
    equalize: bool = False
    bias_correction: bool = False
    weight_bits: int = 8
    round: Rounding = "nearest"
    range_bounds: Mapping[str, tuple[float, float]] | None = None


@dataclass(frozen=True, kw_only=True)
class QuantizeOptions(StaticOptions):
    """What `QuantizePass` takes besides the calibration data (`slimgraph.quantize`'s options but
    the budget).

    Attributes:
        mode: "static", "dynamic", "weight-only"; None: static with calibration data, else
            dynamic.
        fmt: None picks the mode's default ("qdq"; weight-only: "qoperator", MatMulNBits).
        report: measure per-tensor SQNR (static).
        bits, block_size: weight-only; bits 4, 8 or "auto" (each MatMul int4, dynamic int8 or
            float32, whichever onnxruntime runs fastest at `auto_batch` x `auto_seq`).
        accuracy_level: weight-only MatMulNBits' accuracy level (None: the default, 4).
        head_bits, embedding_bits: weight-only bits of the head MatMuls and embedding tables
            (default 8; None: `bits`).
        act_order: weight-only GPTQ in order of decreasing Hessian diagonal (default).
        auto_batch, auto_seq: the shape `bits="auto"` times layers at (seq None: the export's
            example sequence length, else 1).
        batch_size: calibration rows per onnxruntime run.
        progress: progress bar on stderr (None: when stderr is a terminal).
        percentile: for method "percentile".
        verify: dynamic/weight-only: check the exact folding before quantization.
        smooth_quant: static: SmoothQuant alpha, "auto"/True, or None/False.
        transformer: dynamic: on a model with attention, first apply the `transformer`
            preset's exact fusions (fused attention, BiasGelu, residual Sums; onnxruntime is the
            target), so the attention becomes QAttention, and GELU's tanh form (FastGelu,
            approximate, `tanh-gelu`); False quantizes the graph as it is.
        speed_fallback: static: time each quantized layer's shape class as int8 and as float
            at `auto_batch` and leave the classes whose int8 form is slower float
            (`passes.quantize.speed_fallback`; not under a budget, not with SmoothQuant).
    """

    mode: Mode | None = None
    fmt: str | None = None
    report: bool = False
    bits: int | str = 4
    block_size: int = 32
    accuracy_level: int | None = None
    head_bits: int | None = 8
    embedding_bits: int | None = 8
    act_order: bool = True
    auto_batch: int = 1
    auto_seq: int | None = None
    batch_size: int = 32
    progress: bool | None = None
    percentile: float = 99.99
    verify: bool = True
    smooth_quant: float | str | bool | None = None
    transformer: bool = True
    speed_fallback: bool = True
