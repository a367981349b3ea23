"""The op table, one node at a time against onnxruntime: attributes and opset semantics
(axes as attribute or input, Softmax's 2-D coercion before opset 13, pads and auto_pad, ceil_mode,
count_include_pad, Resize coordinate modes, ...). Tolerance: rtol 1e-5, atol 1e-6 times the
output's largest magnitude; integer outputs exactly."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.runtime.torch_backend.backend_helpers import assert_matches_ort

pytest.importorskip("torch")

F, I64, I32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
RNG = np.random.default_rng(0)


def x(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


# (id, op_type, attributes, opset, graph inputs, initializer inputs (in order after the graph
#  inputs; None = empty optional input), output element types)
CASES = [
    ("reshape_zero_and_minus_one", "Reshape", {}, 14, {"a": x(2, 3, 4)}, [i64(0, -1)], [F]),
    ("reshape_allowzero", "Reshape", {"allowzero": 1}, 14, {"a": x(2, 3, 4)}, [i64(4, 6)], [F]),
    ("squeeze_axes_attr", "Squeeze", {"axes": [1]}, 11, {"a": x(2, 1, 3)}, [], [F]),
    ("squeeze_axes_input", "Squeeze", {}, 13, {"a": x(2, 1, 3, 1)}, [i64(-1, 1)], [F]),
    ("squeeze_all", "Squeeze", {}, 13, {"a": x(1, 3, 1)}, [], [F]),
    ("unsqueeze_axes_attr", "Unsqueeze", {"axes": [0, 3]}, 11, {"a": x(2, 3)}, [], [F]),
    ("unsqueeze_axes_input", "Unsqueeze", {}, 13, {"a": x(2, 3)}, [i64(-1, 1)], [F]),
    ("split_attr", "Split", {"axis": 1, "split": [1, 3]}, 11, {"a": x(2, 4)}, [], [F, F]),
    ("split_input", "Split", {"axis": -1}, 13, {"a": x(2, 5)}, [i64(2, 3)], [F, F]),
    ("split_equal", "Split", {"axis": 0}, 13, {"a": x(6, 2)}, [], [F, F, F]),
    ("split_num_outputs", "Split", {"axis": 1, "num_outputs": 2}, 18, {"a": x(2, 5)}, [], [F, F]),
    ("pad_constant", "Pad", {}, 13, {"a": x(1, 2, 3, 3)},
     [i64(0, 0, 1, 2, 0, 0, 2, 0), np.array(1.5, np.float32)], [F]),
    ("pad_reflect", "Pad", {"mode": "reflect"}, 13, {"a": x(1, 2, 4, 4)},
     [i64(0, 0, 1, 2, 0, 0, 2, 1)], [F]),
    ("pad_edge", "Pad", {"mode": "edge"}, 13, {"a": x(1, 2, 4, 4)},
     [i64(0, 0, 0, 2, 0, 0, 1, 1)], [F]),
    ("pad_attr_opset2", "Pad", {"pads": [0, 1, 1, 0], "value": -2.0}, 2, {"a": x(2, 3)}, [], [F]),
    ("pad_axes", "Pad", {}, 18, {"a": x(2, 3, 4)}, [i64(1, 2, 0, 1), None, i64(0, 2)], [F]),
    ("clip_attrs", "Clip", {"min": -0.5, "max": 0.25}, 6, {"a": x(3, 4)}, [], [F]),
    ("clip_min_only", "Clip", {}, 13, {"a": x(3, 4)}, [np.array(-0.1, np.float32)], [F]),
    ("gemm_transposed", "Gemm", {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}, 13,
     {"a": x(4, 3)}, [x(5, 4), x(5)], [F]),
    ("gemm_no_bias", "Gemm", {}, 13, {"a": x(3, 4)}, [x(4, 2)], [F]),
    ("conv_same_upper_stride2", "Conv", {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 13,
     {"a": x(1, 2, 7, 6)}, [x(4, 2, 3, 3), x(4)], [F]),
    ("conv_same_lower", "Conv", {"auto_pad": "SAME_LOWER", "kernel_shape": [2, 2]}, 13,
     {"a": x(1, 2, 5, 5)}, [x(3, 2, 2, 2)], [F]),
    ("conv_asymmetric_pads_dilated_grouped", "Conv",
     {"pads": [0, 1, 2, 1], "dilations": [2, 1], "group": 2}, 13,
     {"a": x(2, 4, 8, 8)}, [x(6, 2, 3, 3), x(6)], [F]),
    ("conv1d", "Conv", {"pads": [1, 1], "strides": [2]}, 13, {"a": x(2, 3, 9)}, [x(4, 3, 3)], [F]),
    ("conv_transpose_output_padding", "ConvTranspose",
     {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, 13,
     {"a": x(1, 4, 5, 5)}, [x(4, 3, 3, 3), x(3)], [F]),
    ("conv_transpose_asymmetric_grouped_dilated", "ConvTranspose",
     {"strides": [2, 1], "pads": [0, 1, 2, 0], "group": 2, "dilations": [1, 2]}, 13,
     {"a": x(1, 4, 4, 4)}, [x(4, 1, 3, 3), x(2)], [F]),
    ("conv_transpose_output_shape", "ConvTranspose",
     {"strides": [2, 2], "output_shape": [10, 9]}, 13, {"a": x(1, 2, 4, 4)}, [x(2, 3, 3, 3)], [F]),
    ("conv_transpose_same_upper", "ConvTranspose",
     {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, 13, {"a": x(1, 2, 3, 3)}, [x(2, 2, 3, 3)], [F]),
    ("maxpool_ceil_pads", "MaxPool",
     {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}, 13,
     {"a": x(1, 2, 8, 8)}, [], [F]),
    ("maxpool_asymmetric_dilated", "MaxPool",
     {"kernel_shape": [2, 2], "pads": [0, 0, 1, 1], "dilations": [2, 2]}, 13,
     {"a": x(1, 2, 7, 7)}, [], [F]),
    ("maxpool_same_upper", "MaxPool",
     {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, 13,
     {"a": x(1, 1, 6, 7)}, [], [F]),
    ("avgpool_exclude_pad_ceil", "AveragePool",
     {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}, 19,
     {"a": x(1, 2, 8, 8)}, [], [F]),
    ("avgpool_include_pad", "AveragePool",
     {"kernel_shape": [3, 3], "pads": [1, 0, 1, 2], "count_include_pad": 1}, 19,
     {"a": x(1, 2, 6, 6)}, [], [F]),
    ("avgpool1d", "AveragePool", {"kernel_shape": [2], "strides": [2]}, 19, {"a": x(2, 3, 8)},
     [], [F]),
    ("global_max_pool", "GlobalMaxPool", {}, 13, {"a": x(2, 3, 4, 5)}, [], [F]),
    ("softmax_coerced_opset11", "Softmax", {"axis": 1}, 11, {"a": x(2, 3, 4)}, [], [F]),
    ("softmax_axis_opset13", "Softmax", {"axis": 1}, 13, {"a": x(2, 3, 4)}, [], [F]),
    ("logsoftmax_default_opset9", "LogSoftmax", {}, 9, {"a": x(2, 3, 4)}, [], [F]),
    ("layernorm_axis", "LayerNormalization", {"axis": -2, "epsilon": 1e-3}, 17,
     {"a": x(2, 3, 4)}, [x(3, 4), x(3, 4)], [F]),
    ("instancenorm", "InstanceNormalization", {}, 13, {"a": x(2, 3, 4, 4)}, [x(3), x(3)], [F]),
    ("batchnorm_2d_opset9", "BatchNormalization", {"epsilon": 1e-3}, 9, {"a": x(4, 3)},
     [x(3), x(3), x(3), np.abs(x(3)) + 0.5], [F]),
    ("lrn", "LRN", {"size": 5, "alpha": 1e-2, "beta": 0.6, "bias": 2.0}, 13,
     {"a": x(1, 6, 3, 3)}, [], [F]),
    ("gather_negative_indices", "Gather", {"axis": 1}, 13, {"a": x(3, 5)},
     [np.array([[0, -1], [2, -3]], np.int64)], [F]),
    ("gather_scalar_index", "Gather", {"axis": 0}, 13, {"a": x(3, 5)}, [np.array(-1)], [F]),
    ("gather_elements", "GatherElements", {"axis": 1}, 13, {"a": x(3, 4)},
     [np.array([[0, 3], [1, -1], [2, 2]], np.int64)], [F]),
    ("expand_bidirectional", "Expand", {}, 13, {"a": x(3, 1)}, [i64(2, 1, 4)], [F]),
    ("slice_negative_steps", "Slice", {}, 13, {"a": x(5, 6)},
     [i64(-1, 4), i64(-1000, 0), i64(0, 1), i64(-2, -1)], [F]),
    ("slice_attrs_opset9", "Slice", {"starts": [1], "ends": [1000], "axes": [1]}, 9,
     {"a": x(3, 4)}, [], [F]),
    ("slice_steps", "Slice", {}, 13, {"a": x(7, 6)}, [i64(1, 0), i64(7, 5), None, i64(2, 3)], [F]),
    ("cast_truncates", "Cast", {"to": TensorProto.INT32}, 13, {"a": x(3, 4) * 4}, [], [I32]),
    ("shape_start_end", "Shape", {"start": 1, "end": -1}, 15, {"a": x(2, 3, 4, 5)}, [], [I64]),
    ("constant_of_shape", "ConstantOfShape",
     {"value": numpy_helper.from_array(np.array([2.5], np.float32))}, 13, {}, [i64(2, 3)], [F]),
    ("range", "Range", {}, 13, {}, [np.array(1.0, np.float32), np.array(4.0, np.float32),
                                    np.array(0.75, np.float32)], [F]),
    ("reducesum_attr_opset11", "ReduceSum", {"axes": [1], "keepdims": 0}, 11, {"a": x(2, 3, 4)},
     [], [F]),
    ("reducesum_input_opset13", "ReduceSum", {"keepdims": 1}, 13, {"a": x(2, 3, 4)},
     [i64(0, -1)], [F]),
    ("reducesum_noop", "ReduceSum", {"noop_with_empty_axes": 1}, 13, {"a": x(2, 3)}, [], [F]),
    ("reducemean_input_opset18", "ReduceMean", {}, 18, {"a": x(2, 3, 4)}, [i64(1)], [F]),
    ("reducemean_attr_opset13", "ReduceMean", {"axes": [-1], "keepdims": 0}, 13,
     {"a": x(2, 3, 4)}, [], [F]),
    ("reducemax_all", "ReduceMax", {"keepdims": 0}, 13, {"a": x(2, 3)}, [], [F]),
    ("reducel2", "ReduceL2", {"axes": [2]}, 13, {"a": x(2, 3, 4)}, [], [F]),
    ("reducelogsumexp", "ReduceLogSumExp", {"axes": [0, 2]}, 13, {"a": x(2, 3, 4)}, [], [F]),
    ("reduceprod", "ReduceProd", {"axes": [0, 1]}, 13, {"a": x(2, 3, 2)}, [], [F]),
    ("erf", "Erf", {}, 13, {"a": x(3, 4)}, [], [F]),
    ("gelu_tanh", "Gelu", {"approximate": "tanh"}, 20, {"a": x(3, 4)}, [], [F]),
    ("einsum", "Einsum", {"equation": "bij,bjk->bik"}, 13, {"a": x(2, 3, 4)}, [x(2, 4, 5)], [F]),
    ("matmul_broadcast", "MatMul", {}, 13, {"a": x(2, 1, 3, 4)}, [x(5, 4, 2)], [F]),
    ("flatten_axis", "Flatten", {"axis": 2}, 13, {"a": x(2, 3, 4, 5)}, [], [F]),
    ("transpose_default", "Transpose", {}, 13, {"a": x(2, 3, 4)}, [], [F]),
    ("depth_to_space_crd", "DepthToSpace", {"blocksize": 2, "mode": "CRD"}, 13,
     {"a": x(1, 8, 2, 3)}, [], [F]),
    ("depth_to_space_dcr", "DepthToSpace", {"blocksize": 2}, 13, {"a": x(1, 8, 2, 3)}, [], [F]),
    ("space_to_depth", "SpaceToDepth", {"blocksize": 2}, 13, {"a": x(1, 2, 4, 6)}, [], [F]),
    ("argmax_last_index", "ArgMax", {"axis": 1, "keepdims": 0, "select_last_index": 1}, 13,
     {"a": np.array([[1, 3, 3], [2, 2, 0]], np.float32)}, [], [I64]),
    ("topk", "TopK", {"axis": 1}, 13, {"a": x(3, 6)}, [i64(2)], [F, I64]),
    ("cumsum_reverse_exclusive", "CumSum", {"exclusive": 1, "reverse": 1}, 13, {"a": x(3, 4)},
     [np.array(1, np.int64)], [F]),
    ("hard_sigmoid", "HardSigmoid", {"alpha": 0.3, "beta": 0.4}, 13, {"a": x(3, 4)}, [], [F]),
    ("leaky_relu", "LeakyRelu", {"alpha": 0.2}, 13, {"a": x(3, 4)}, [], [F]),
    ("prelu_broadcast", "PRelu", {}, 13, {"a": x(2, 3, 4)}, [x(3, 1)], [F]),
    ("mod_fmod", "Mod", {"fmod": 1}, 13, {"a": x(3, 4) * 5}, [np.float32(1.5)], [F]),
    ("tile", "Tile", {}, 13, {"a": x(2, 3)}, [i64(2, 1)], [F]),
    ("trilu_lower", "Trilu", {"upper": 0}, 14, {"a": x(4, 4)}, [np.array(-1, np.int64)], [F]),
    ("where", "Where", {}, 13, {"a": RNG.random((3, 4)) > 0.5}, [x(3, 4), x(1, 4)], [F]),
    ("pow", "Pow", {}, 13, {"a": np.abs(x(3, 4))}, [np.float32(1.7)], [F]),
    ("dropout_eval_ratio_input", "Dropout", {}, 13, {"a": x(3, 4)},
     [np.array(0.3, np.float32)], [F]),
    ("resize_nearest_asymmetric_floor_sizes", "Resize",
     {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
     13, {"a": x(1, 2, 3, 4)}, [None, None, i64(1, 2, 7, 9)], [F]),
    ("resize_nearest_half_pixel_scales", "Resize", {"mode": "nearest"}, 13,
     {"a": x(1, 2, 3, 4)}, [None, np.array([1, 1, 3, 2.5], np.float32)], [F]),
    ("resize_linear_half_pixel", "Resize", {"mode": "linear"}, 13, {"a": x(1, 2, 3, 4)},
     [None, np.array([1, 1, 2, 1.5], np.float32)], [F]),
    ("resize_linear_align_corners_down", "Resize",
     {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, 13,
     {"a": x(1, 2, 6, 7)}, [None, None, i64(1, 2, 4, 3)], [F]),
    ("resize_linear_pytorch_half_pixel", "Resize",
     {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, 13,
     {"a": x(1, 2, 5, 4)}, [None, None, i64(1, 2, 1, 8)], [F]),
    ("upsample_opset9", "Upsample", {"mode": "nearest"}, 9, {"a": x(1, 2, 3, 3)},
     [np.array([1, 1, 2, 2], np.float32)], [F]),
]


def _model(op_type, attributes, opset, feeds, constants, out_types) -> ir.Model:
    input_names = list(feeds)
    initializers = []
    for i, value in enumerate(constants):
        if value is None:
            input_names.append("")
            continue
        name = f"c{i}"
        input_names.append(name)
        initializers.append(numpy_helper.from_array(np.asarray(value), name))
    while input_names and input_names[-1] == "":
        input_names.pop()
    outputs = [f"y{i}" for i in range(len(out_types))]
    node = helper.make_node(op_type, input_names, outputs, name="node0", **attributes)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for n, v in feeds.items()],
        [helper.make_tensor_value_info(n, t, None)
         for n, t in zip(outputs, out_types, strict=True)],
        initializers,
    )
    ir_version = 10 if opset >= 13 else 7
    return ir.from_proto(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                          ir_version=ir_version)
    )


@pytest.mark.parametrize(
    ("op_type", "attributes", "opset", "feeds", "constants", "out_types"),
    [case[1:] for case in CASES], ids=[case[0] for case in CASES],
)
def test_op_matches_onnxruntime(op_type, attributes, opset, feeds, constants, out_types):
    model = _model(op_type, attributes, opset, feeds, constants, out_types)
    assert_matches_ort(model, feeds, rtol=1e-5, atol_of_scale=1e-6)


def test_batchnorm_trains_on_batch_statistics_with_the_nodes_momentum():
    import torch

    from slimgraph.runtime.torch_backend import lower

    mean, var = np.array([0.5, -1.0], np.float32), np.array([2.0, 0.5], np.float32)
    model = _model("BatchNormalization", {"momentum": 0.8, "epsilon": 1e-5}, 15,
                   {"a": x(8, 2, 3)}, [np.ones(2, np.float32), np.zeros(2, np.float32), mean, var],
                   [F])
    lowered = lower(model)
    lowered.train()
    batch = torch.from_numpy(x(8, 2, 3) * 3 + 1)
    y = lowered(batch)[0]
    batch_mean = batch.mean((0, 2))
    batch_var = batch.var((0, 2), unbiased=False)
    expected = (batch - batch_mean[None, :, None]) / torch.sqrt(batch_var[None, :, None] + 1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    (running_mean, running_var) = (lowered.constants.c2, lowered.constants.c3)
    torch.testing.assert_close(running_mean, 0.8 * torch.from_numpy(mean) + 0.2 * batch_mean)
    unbiased = batch.var((0, 2), unbiased=True)  # torch's convention for the running variance
    torch.testing.assert_close(running_var, 0.8 * torch.from_numpy(var) + 0.2 * unbiased)
    lowered.eval()
    torch.testing.assert_close(
        lowered(batch)[0],
        (batch - running_mean[None, :, None]) / torch.sqrt(running_var[None, :, None] + 1e-5),
    )
