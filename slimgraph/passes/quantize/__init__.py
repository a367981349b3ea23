"""Quantization: int8 and int4 passes, their policies and materializers, and `quantize`.

Policy decides what is quantized and how; QDQ/QOperator materialization writes it; static
quantization is driven by calibration; a per-tensor fidelity report says what it cost."""

from __future__ import annotations

from slimgraph.passes.quantize.api import prepare, quantize, quantize_static, report_of

__all__ = ["quantize", "quantize_static", "prepare", "report_of"]
