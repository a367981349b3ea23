"""Weight-only quantization of a model with attention: the `transformer` fusions first, as in
dynamic mode (`quantize(..., transformer=True)`), so an int4 decoder keeps onnxruntime's fused
attention; the MatMuls' codes are the same either way."""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir
import pytest

import slimgraph as sg
from tests.kit.asserts import cosine, output_list
from tests.kit.data import transformer_feeds
from tests.kit.exports import export_transformer


def _ops(model: ir.Model) -> Counter:
    return Counter(node.op_type for node in model.graph)


@pytest.fixture(scope="module")
def gpt() -> ir.Model:
    return export_transformer("gpt")


def test_weight_only_fuses_attention_first_with_the_same_codes(gpt: ir.Model) -> None:
    fused = sg.quantize(gpt, mode="weight-only", block_size=32)
    plain = sg.quantize(gpt, mode="weight-only", block_size=32, transformer=False)
    assert _ops(fused)["MultiHeadAttention"] == 2 and _ops(plain)["MultiHeadAttention"] == 0
    assert _ops(fused)["MatMulNBits"] == _ops(plain)["MatMulNBits"] > 0
    for batch, seq in ((3, 11), (1, 1)):  # not the export's (2, 16); a decode-sized step
        feed = transformer_feeds("gpt", batch, seq)
        assert cosine(output_list(fused, feed)[0], output_list(plain, feed)[0]) > 0.9999


def test_bits_auto_times_the_fused_model(gpt: ir.Model) -> None:
    auto = sg.quantize(gpt, mode="weight-only", bits="auto", block_size=32, auto_seq=16)
    assert _ops(auto)["MultiHeadAttention"] == 2


def test_bits_auto_leaves_int8_only_for_a_form_faster_beyond_noise() -> None:
    from slimgraph.passes.quantize.auto_bits import ShapeTiming

    times = {"fp32": 3.0, "int8": 1.0, "int4": 0.9}
    noisy = ShapeTiming(64, 64, 8, 4, times, {"fp32": False, "int4": False})
    assert noisy.choice == "int8"  # int4's lower median is within noise of int8's
    clear = ShapeTiming(64, 64, 8, 4, times, {"fp32": False, "int4": True})
    assert clear.choice == "int4"
    slower = ShapeTiming(64, 64, 8, 4, {"fp32": 3.0, "int8": 1.0, "int4": 1.5},
                         {"fp32": False, "int4": False})
    assert slower.choice == "int8"
