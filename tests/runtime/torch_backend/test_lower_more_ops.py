"""Kernels added for exported transformers and the int8 transformer path, one node at a time
against onnxruntime (eval mode): indexing (GatherND, ScatterND, ScatterElements, NonZero,
OneHot), the sequence ops, normalizations (GroupNormalization, RMSNormalization and the
com.microsoft Skip/Simplified forms), the contrib activations and the dynamic int8 ops
(DynamicQuantizeLinear, MatMulInteger, MatMulIntegerToFloat, DynamicQuantizeMatMul, ConvInteger,
GatherBlockQuantized). Tolerance: rtol 1e-4, atol 1e-5 of each output's largest magnitude;
integer outputs exactly."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from tests.runtime.torch_backend.backend_helpers import assert_matches_ort
from tests.runtime.torch_backend.node_models import I32, I64, MS, U8, F, node_model

pytest.importorskip("torch")

RNG = np.random.default_rng(1)
B8 = TensorProto.BOOL


def x(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def codes(*shape: int, signed: bool = True) -> np.ndarray:
    if signed:
        return RNG.integers(-128, 128, shape).astype(np.int8)
    return RNG.integers(0, 256, shape).astype(np.uint8)


# (id, op_type, domain, opset, graph inputs, initializers (None: empty), output types,
#  attributes)
CASES = [
    ("gather_nd", "GatherND", "", 13, {"a": x(3, 4, 5)},
     [np.array([[0, 1], [2, -1], [1, 3]], np.int64)], [F], {}),
    ("gather_nd_batch_dims", "GatherND", "", 13, {"a": x(2, 3, 4)},
     [np.array([[[1], [0]], [[2], [2]]], np.int64)], [F], {"batch_dims": 1}),
    ("gather_nd_indices_input", "GatherND", "", 13,
     {"a": x(4, 6), "i": np.array([[3, 5], [0, 0]], np.int64)}, [], [F], {}),
    ("scatter_nd", "ScatterND", "", 18, {"a": x(4, 3)},
     [np.array([[2], [0]], np.int64), x(2, 3)], [F], {}),
    ("scatter_nd_add", "ScatterND", "", 18, {"a": x(4, 3)},
     [np.array([[2, 1], [0, 0], [3, 2]], np.int64), x(3)], [F], {"reduction": "add"}),
    ("scatter_elements_max", "ScatterElements", "", 18, {"a": x(3, 4)},
     [np.array([[1, 3], [0, -1], [2, 2]], np.int64), x(3, 2)], [F],
     {"axis": 1, "reduction": "max"}),
    ("nonzero", "NonZero", "", 13, {"a": (RNG.random((3, 4)) > 0.5).astype(np.float32)}, [],
     [I64], {}),
    ("one_hot_negative_and_out_of_range", "OneHot", "", 13,
     {"a": np.array([[0, -1], [5, 2]], np.int64)},
     [np.array(4, np.int64), np.array([-2.0, 3.0], np.float32)], [F], {"axis": 1}),
    ("cumsum_int", "CumSum", "", 14, {"a": RNG.integers(0, 3, (2, 5)).astype(np.int64)},
     [np.array(1, np.int64)], [I64], {}),
    ("group_norm_per_channel", "GroupNormalization", "", 21, {"a": x(2, 6, 3, 3)},
     [x(6), x(6)], [F], {"num_groups": 3, "epsilon": 1e-3}),
    ("group_norm_per_group_opset18", "GroupNormalization", "", 18, {"a": x(2, 6, 4)},
     [x(2), x(2)], [F], {"num_groups": 2}),
    ("rms_norm", "RMSNormalization", "", 23, {"a": x(2, 3, 8)}, [x(8)], [F],
     {"epsilon": 1e-3}),
    ("rms_norm_axis", "RMSNormalization", "", 23, {"a": x(2, 3, 4)}, [x(3, 4)], [F],
     {"axis": -2}),
    ("simplified_layer_norm", "SimplifiedLayerNormalization", "", 17, {"a": x(2, 3, 8)},
     [x(8)], [F, F], {"epsilon": 1e-6}),
    ("skip_layer_norm", "SkipLayerNormalization", MS, 17, {"a": x(2, 3, 8), "s": x(2, 3, 8)},
     [x(8), x(8), x(8)], [F, 0, 0, F], {"epsilon": 1e-5}),
    ("skip_layer_norm_default_eps", "SkipLayerNormalization", MS, 17,
     {"a": x(2, 3, 8), "s": x(2, 3, 8)}, [x(8)], [F], {}),
    ("skip_simplified_layer_norm", "SkipSimplifiedLayerNormalization", MS, 17,
     {"a": x(2, 3, 8), "s": x(2, 3, 8)}, [x(8), x(8)], [F, 0, 0, F], {"epsilon": 1e-6}),
    ("bias_gelu", "BiasGelu", MS, 17, {"a": x(2, 3, 8)}, [x(8)], [F], {}),
    ("fast_gelu_bias", "FastGelu", MS, 17, {"a": x(2, 3, 8)}, [x(8)], [F], {}),
    ("fast_gelu", "FastGelu", MS, 17, {"a": x(2, 3, 8)}, [], [F], {}),
    ("contrib_gelu", "Gelu", MS, 17, {"a": x(2, 3, 8)}, [], [F], {}),
    ("quick_gelu", "QuickGelu", MS, 17, {"a": x(2, 3, 8)}, [], [F], {"alpha": 1.5}),
    ("gelu_opset20", "Gelu", "", 20, {"a": x(3, 4)}, [], [F], {}),
    ("einsum_spaces_ellipsis", "Einsum", "", 13, {"a": x(2, 3, 4), "b": x(2, 4, 5)}, [], [F],
     {"equation": "...ij, ...jk -> ...ik"}),
    ("bitwise_xor", "BitwiseXor", "", 18,
     {"a": RNG.integers(0, 64, (3, 4)).astype(np.int32)}, [np.int32(21)], [I32], {}),
    ("mod_int", "Mod", "", 13, {"a": RNG.integers(-9, 9, (3, 4)).astype(np.int64)},
     [np.array(4, np.int64)], [I64], {}),
    ("where_broadcast", "Where", "", 13,
     {"c": RNG.random((2, 1, 4)) > 0.5, "a": x(3, 1)}, [np.float32(-1e4)], [F], {}),
    ("swish", "Swish", "", 24, {"a": x(3, 4)}, [], [F], {"alpha": 1.3}),
    ("shrink", "Shrink", "", 13, {"a": x(3, 4)}, [], [F], {"bias": 0.2, "lambd": 0.4}),
    ("lp_norm_l1", "LpNormalization", "", 22, {"a": x(3, 4)}, [], [F], {"axis": 0, "p": 1}),
    ("lp_norm_l2", "LpNormalization", "", 22, {"a": x(2, 3, 4)}, [], [F], {}),
    ("mean_variance_norm", "MeanVarianceNormalization", "", 13, {"a": x(2, 3, 4, 4)}, [], [F],
     {}),
    ("eye_like", "EyeLike", "", 22, {"a": x(3, 5)}, [], [F], {"k": 1}),
    ("grid_sample_border", "GridSample", "", 22, {"a": x(1, 2, 5, 6)},
     [np.clip(x(1, 3, 4, 2), -1.2, 1.2)], [F], {"padding_mode": "border"}),
    ("grid_sample_cubic_corners", "GridSample", "", 22, {"a": x(1, 2, 5, 6)},
     [np.clip(x(1, 3, 4, 2), -1.0, 1.0)], [F], {"mode": "cubic", "align_corners": 1}),
    ("resize_cubic_half_pixel", "Resize", "", 19, {"a": x(1, 2, 4, 5)},
     [None, np.array([1, 1, 2, 1.5], np.float32)], [F], {"mode": "cubic"}),
    ("resize_cubic_align_corners_down", "Resize", "", 19, {"a": x(1, 2, 7, 6)},
     [None, None, i64(1, 2, 4, 9)], [F],
     {"mode": "cubic", "coordinate_transformation_mode": "align_corners"}),
    ("resize_cubic_exclude_outside", "Resize", "", 19, {"a": x(1, 1, 4, 4)},
     [None, np.array([1, 1, 2, 2], np.float32)], [F],
     {"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5}),
    ("dynamic_quantize_linear", "DynamicQuantizeLinear", "", 13, {"a": x(4, 6) + 0.5}, [],
     [U8, F, U8], {}),
    ("matmul_integer_per_column_zero_points", "MatMulInteger", "", 13,
     {"a": codes(2, 3, 8, signed=False)},
     [codes(8, 5), np.uint8(127), RNG.integers(-3, 3, 5).astype(np.int8)], [I32], {}),
    ("matmul_integer_to_float", "MatMulIntegerToFloat", MS, 13,
     {"a": codes(3, 8, signed=False)},
     [codes(8, 5), np.float32(0.02), np.float32(0.01) + RNG.random(5).astype(np.float32) / 50,
      np.uint8(120), None, x(5)], [F], {}),
    ("dynamic_quantize_matmul", "DynamicQuantizeMatMul", MS, 13, {"a": x(2, 3, 8)},
     [codes(8, 5), RNG.random(5).astype(np.float32) / 50 + 0.005, None, x(5)], [F], {}),
    ("conv_integer_padded", "ConvInteger", "", 13, {"a": codes(1, 2, 5, 5, signed=False)},
     [codes(3, 2, 3, 3, signed=False), np.uint8(100), np.uint8(128)], [I32],
     {"pads": [1, 1, 1, 1]}),
    ("gather_block_quantized", "GatherBlockQuantized", MS, 13,
     {"i": np.array([[0, 5], [-1, 2]], np.int64)},
     [codes(6, 20, signed=False), None, RNG.random((6, 2)).astype(np.float32) / 20], [F],
     {"bits": 8, "block_size": 16, "gather_axis": 0, "quantize_axis": 1}),
]


def _case_model(op_type, domain, opset, feeds, constants, out_types, attributes):
    if op_type == "GatherBlockQuantized":  # data first: an initializer, then the indices
        return node_model(op_type, feeds, constants, out_types, domain=domain, opset=opset,
                          inputs=["c0", "i", "c2"], **attributes)
    return node_model(op_type, feeds, constants, out_types, domain=domain, opset=opset,
                      **attributes)


@pytest.mark.parametrize(
    ("op_type", "domain", "opset", "feeds", "constants", "out_types", "attributes"),
    [case[1:] for case in CASES], ids=[case[0] for case in CASES],
)
def test_op_matches_onnxruntime(op_type, domain, opset, feeds, constants, out_types, attributes):
    model = _case_model(op_type, domain, opset, feeds, constants, out_types, attributes)
    assert_matches_ort(model, feeds)


def test_split_to_sequence_and_sequence_ops():
    """torch.split as the exporter writes it: SplitToSequence, then SequenceAt per piece."""
    nodes = [
        helper.make_node("SplitToSequence", ["a", "sizes"], ["seq"], axis=1),
        helper.make_node("SequenceAt", ["seq", "one"], ["y0"]),
        helper.make_node("SequenceLength", ["seq"], ["y1"]),
        helper.make_node("SplitToSequence", ["a"], ["ones"], axis=0, keepdims=0),
        helper.make_node("ConcatFromSequence", ["ones"], ["y2"], axis=1, new_axis=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("a", F, [3, 7])],
        [helper.make_tensor_value_info("y0", F, None),
         helper.make_tensor_value_info("y1", I64, None),
         helper.make_tensor_value_info("y2", F, None)],
        [helper.make_tensor("sizes", I64, [3], [2, 4, 1]),
         helper.make_tensor("one", I64, [], [-2])],
    )
    model = ir.from_proto(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    assert_matches_ort(model, {"a": x(3, 7)})
