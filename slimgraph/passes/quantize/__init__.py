"""Quantization passes: policy (what), QDQ/QOperator materialization (how), calibration-driven
static quantization, per-tensor fidelity report, and the `quantize` entry point."""

from __future__ import annotations

from slimgraph.passes.quantize.api import prepare, quantize, quantize_static, report_of

__all__ = ["quantize", "quantize_static", "prepare", "report_of"]
