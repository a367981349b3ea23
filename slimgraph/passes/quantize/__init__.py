"""Quantization: int8 and int4 passes, their policies and materializers, and the modes' pass.

Policy decides what is quantized and how; QDQ/QOperator materialization writes it; static
quantization is driven by calibration (`StaticSession`); a per-tensor fidelity report says what
it cost. The public verb is `slimgraph.quantize` (`slimgraph.api.quantize`)."""

from __future__ import annotations

from slimgraph.passes.quantize.modes import QuantizePass, StaticQuantizePass
from slimgraph.passes.quantize.options import QuantizeOptions, StaticOptions
from slimgraph.passes.quantize.prepare import check_exclusions, prepare
from slimgraph.passes.quantize.static import StaticSession, quantize_static

__all__ = [
    "QuantizeOptions",
    "QuantizePass",
    "StaticOptions",
    "StaticQuantizePass",
    "StaticSession",
    "check_exclusions",
    "prepare",
    "quantize_static",
]
