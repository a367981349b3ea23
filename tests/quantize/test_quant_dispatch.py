"""sg.quantize routes each mode to its pass with the measured-fastest default format."""

from __future__ import annotations

import pytest

import slimgraph as sg
from slimgraph import runtime
from tests.conftest import exported_model


def _ops(model) -> set[str]:
    return {node.op_type for node in model.graph}


def test_weight_only_defaults_to_matmulnbits_and_qdq_gives_standard_dequantize() -> None:
    model = exported_model("mlp")
    feeds = runtime.random_feeds(model, seed=1)
    nbits = sg.quantize(model, mode="weight-only", block_size=16)
    standard = sg.quantize(model, mode="weight-only", fmt="qdq", block_size=16)
    assert "MatMulNBits" in _ops(nbits) and "MatMul" not in _ops(nbits)
    assert "DequantizeLinear" in _ops(standard) and "MatMulNBits" not in _ops(standard)
    for candidate in (nbits, standard):
        assert sg.compare(model, candidate, feeds).worst_cosine > 0.99
    # the same int4 blocks through two kernels: far closer to each other than to fp32
    assert sg.compare(nbits, standard, feeds).worst_sqnr_db > 35


def test_dynamic_honours_exclude_ops() -> None:
    model = exported_model("mlp")
    assert _ops(sg.quantize(model, mode="dynamic")) & {"MatMulInteger", "DynamicQuantizeMatMul"}
    with pytest.raises(sg.UnsupportedModelError, match="op type MatMul excluded"):
        sg.quantize(model, mode="dynamic", exclude_ops=["MatMul"])
