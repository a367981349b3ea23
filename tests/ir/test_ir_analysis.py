"""Analysis: the frozen dataflow view, producers/consumers, weights, MACs against hand formulas."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from slimgraph.ir import analysis, load, save
from tests.kit.data import ZOO_DIR
from tests.kit.exports import exported_model

OPSET = [helper.make_opsetid("", 18)]


def _model(nodes, inputs, outputs, initializers=()) -> ir.Model:
    """An IR model from helper nodes; inputs/outputs are (name, shape) with float dtype."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        list(initializers),
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=OPSET, ir_version=10))


def _init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


def _by_name(model: ir.Model) -> dict[str, ir.Node]:
    return {node.name: node for node in model.graph}


# ---------------------------------------------------------------- dataflow view


def test_dataflow_graph_edges_and_indices() -> None:
    model = _model(
        [
            helper.make_node("Relu", ["x"], ["a"], name="relu"),
            helper.make_node("Mul", ["a", "a"], ["sq"], name="square"),  # one value, two uses
            helper.make_node("Neg", ["a"], ["n"], name="neg"),
            helper.make_node("Concat", ["n", "sq", "x", "a"], ["c"], name="cat", axis=1),
            helper.make_node("Add", ["c", "w"], ["y"], name="add"),
        ],
        [("x", [1, 2])],
        [("y", [1, 8])],
        [_init("w", (1, 8))],
    )
    nodes = _by_name(model)
    view = analysis.dataflow_graph(model.graph)
    assert set(view.nodes) == set(model.graph)
    assert nx.is_frozen(view)
    with pytest.raises(nx.NetworkXError, match="Frozen graph can't be modified"):
        view.add_edge(nodes["relu"], nodes["add"])
    with pytest.raises(nx.NetworkXError, match="Frozen graph can't be modified"):
        view.remove_node(nodes["relu"])
    edges = sorted(
        (u.name, v.name, data["index"], data["value"].name) for u, v, data in view.edges(data=True)
    )
    assert edges == [
        ("cat", "add", 0, "c"),
        ("neg", "cat", 0, "n"),
        ("relu", "cat", 3, "a"),
        ("relu", "neg", 0, "a"),
        ("relu", "square", 0, "a"),
        ("relu", "square", 1, "a"),
        ("square", "cat", 1, "sq"),
    ]
    # graph inputs and initializers have no producer: no edge for x (cat input 2) or w
    assert view.in_degree(nodes["relu"]) == 0
    assert view.in_degree(nodes["add"]) == 1


def test_dataflow_graph_on_residual_and_concat_models() -> None:
    for name in ("resnet", "densenet"):
        model = exported_model(name)
        view = analysis.dataflow_graph(model.graph)
        uses = sum(
            1
            for node in model.graph
            for value in node.inputs
            if value is not None and value.producer() is not None
        )
        assert view.number_of_edges() == uses
        assert nx.is_directed_acyclic_graph(view)
        for u, v, data in view.edges(data=True):
            assert v.inputs[data["index"]] is data["value"]
            assert data["value"].producer() is u
        if name == "resnet":
            adds = [n for n in model.graph if n.op_type == "Add"]
            assert all(view.in_degree(n) == 2 for n in adds)
        else:
            concats = [n for n in model.graph if n.op_type == "Concat"]
            assert concats and all(view.in_degree(n) == len(n.inputs) for n in concats)


def test_producer_and_consumers() -> None:
    model = _model(
        [
            helper.make_node("Relu", ["x"], ["a"], name="relu"),
            helper.make_node("Mul", ["a", "a"], ["sq"], name="square"),
            helper.make_node("Add", ["sq", "a"], ["y"], name="add"),
        ],
        [("x", [2])],
        [("y", [2])],
    )
    nodes = _by_name(model)
    a = nodes["relu"].outputs[0]
    assert analysis.producer(a) is nodes["relu"]
    assert analysis.producer(model.graph.inputs[0]) is None
    assert analysis.consumers(a) == [nodes["square"], nodes["add"]]
    assert analysis.consumers(model.graph.outputs[0]) == []


# ---------------------------------------------------------------- weights


def test_node_weights() -> None:
    model = _model(
        [
            helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv"),
            helper.make_node("Conv", ["c", "cw2"], ["c2"], name="conv_nobias"),
            helper.make_node("Flatten", ["c2"], ["f"], name="flat"),
            helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], name="gemm", transB=1),
            helper.make_node("MatMul", ["g", "mw"], ["m"], name="matmul"),
            helper.make_node("MatMul", ["lw", "m"], ["l"], name="matmul_left"),
            helper.make_node("MatMul", ["l", "l"], ["y"], name="matmul_dynamic"),
        ],
        [("x", [1, 2, 3, 3])],
        [("y", [4, 4])],
        [
            _init("cw", (4, 2, 3, 3)),
            _init("cb", (4,)),
            _init("cw2", (4, 4, 1, 1)),
            _init("gw", (4, 4)),
            _init("gb", (4,)),
            _init("mw", (4, 4)),
            _init("lw", (4, 1)),
        ],
    )
    found = {node.name: w for node, w in analysis.node_weights(model.graph).items()}
    assert set(found) == {"conv", "conv_nobias", "gemm", "matmul", "matmul_left"}
    names = {k: (w.weight.name, w.bias.name if w.bias else None) for k, w in found.items()}
    assert names == {
        "conv": ("cw", "cb"),
        "conv_nobias": ("cw2", None),
        "gemm": ("gw", "gb"),
        "matmul": ("mw", None),
        "matmul_left": ("lw", None),
    }


def test_parameter_count_matches_initializers() -> None:
    model = exported_model("resnet")
    expected = sum(v.const_value.numpy().size for v in model.graph.initializers.values())
    assert analysis.parameter_count(model) == expected > 100_000


# ---------------------------------------------------------------- MACs


def _conv_macs(n, c_in, h, w, c_out, k, stride, pad, dilation, groups) -> int:
    h_out = (h + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    w_out = (w + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    return n * c_out * h_out * w_out * (c_in // groups) * k * k


def _single_node_macs(node: onnx.NodeProto, inputs, initializers) -> int | None:
    shaped = analysis.with_static_shapes(
        _model([node], inputs, [(node.output[0], None)], initializers)
    )
    (only,) = list(shaped.graph)
    return analysis.node_macs(only)


@pytest.mark.parametrize(
    "c_in,c_out,k,stride,pad,dilation,groups",
    [(3, 8, 3, 1, 1, 1, 1), (8, 16, 3, 2, 1, 1, 4), (8, 8, 3, 1, 2, 2, 8), (4, 6, 5, 3, 0, 1, 2)],
)
def test_conv_macs(c_in, c_out, k, stride, pad, dilation, groups) -> None:
    node = helper.make_node(
        "Conv", ["x", "w"], ["y"], strides=[stride] * 2, pads=[pad] * 4,
        dilations=[dilation] * 2, group=groups,
    )
    macs = _single_node_macs(
        node, [("x", [2, c_in, 17, 15])], [_init("w", (c_out, c_in // groups, k, k))]
    )
    assert macs == _conv_macs(2, c_in, 17, 15, c_out, k, stride, pad, dilation, groups)


@settings(max_examples=30, deadline=None)
@given(
    c_in_per_group=st.integers(1, 4),
    c_out_per_group=st.integers(1, 4),
    groups=st.integers(1, 3),
    k=st.integers(1, 4),
    stride=st.integers(1, 3),
    pad=st.integers(0, 2),
    dilation=st.integers(1, 2),
    size=st.integers(8, 20),
)
def test_conv_macs_property(
    c_in_per_group, c_out_per_group, groups, k, stride, pad, dilation, size
) -> None:
    c_in, c_out = c_in_per_group * groups, c_out_per_group * groups
    node = helper.make_node(
        "Conv", ["x", "w"], ["y"], strides=[stride] * 2, pads=[pad] * 4,
        dilations=[dilation] * 2, group=groups,
    )
    macs = _single_node_macs(
        node, [("x", [1, c_in, size, size + 1])], [_init("w", (c_out, c_in_per_group, k, k))]
    )
    assert macs == _conv_macs(1, c_in, size, size + 1, c_out, k, stride, pad, dilation, groups)


def test_conv_transpose_macs() -> None:
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], group=2)
    macs = _single_node_macs(node, [("x", [2, 8, 5, 6])], [_init("w", (8, 3, 4, 4))])
    # every input element scatters into (C_out / group) * k * k outputs
    assert macs == 2 * 8 * 5 * 6 * 3 * 4 * 4


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_gemm_macs(trans_a: int, trans_b: int) -> None:
    m, k, n = 3, 5, 7
    a_shape = [k, m] if trans_a else [m, k]
    b_shape = (n, k) if trans_b else (k, n)
    node = helper.make_node("Gemm", ["a", "b"], ["y"], transA=trans_a, transB=trans_b)
    assert _single_node_macs(node, [("a", a_shape)], [_init("b", b_shape)]) == m * k * n


@pytest.mark.parametrize(
    "a_shape,b_shape,macs",
    [
        ([4, 3, 5], [5, 7], 4 * 3 * 5 * 7),
        ([2, 1, 3, 5], [1, 6, 5, 7], 2 * 6 * 3 * 5 * 7),  # broadcast batch dims
        ([5], [5, 7], 5 * 7),
        ([3, 5], [5], 3 * 5),
    ],
)
def test_batched_matmul_macs(a_shape, b_shape, macs) -> None:
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    assert _single_node_macs(node, [("a", a_shape)], [_init("b", tuple(b_shape))]) == macs


def test_macs_unknown_for_other_ops_and_missing_shapes() -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    assert _single_node_macs(node, [("x", [2, 3])], []) is None
    unshaped = _model(
        [helper.make_node("MatMul", ["a", "b"], ["y"])], [("a", None), ("b", None)], [("y", None)]
    )
    assert analysis.node_macs(unshaped.graph.node(0)) is None


def test_model_macs_keys_are_unique() -> None:
    model = _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
            helper.make_node("MatMul", ["a", "w"], ["b"], name="mm"),  # same name again
            helper.make_node("MatMul", ["b", "w"], ["y"]),  # no name
        ],
        [("x", [2, 4])],
        [("y", [2, 4])],
        [_init("w", (4, 4))],
    )
    assert analysis.model_macs(model) == {"mm": 32, "mm#1": 32, "MatMul#2": 32}


def test_with_static_shapes_fixes_symbolic_dims() -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [("x", ["batch", "seq", 8])],
        [("y", ["batch", "seq", 4])],
        [_init("w", (8, 4))],
    )
    shaped = analysis.with_static_shapes(model, {"batch": 3, "seq": 5})
    assert analysis.static_shape(shaped.graph.outputs[0]) == (3, 5, 4)
    assert analysis.model_macs(model, {"batch": 3, "seq": 5}) == {"mm": 3 * 5 * 8 * 4}
    default = analysis.with_static_shapes(model)
    assert analysis.static_shape(default.graph.outputs[0]) == (1, 1, 4)
    assert not isinstance(model.graph.inputs[0].shape[0], int), "the input model is unchanged"


def test_with_static_shapes_reinfers_symbols_no_input_carries() -> None:
    # after a rewrite re-inferred shapes, values carry `unk__N` for the batch: the count must
    # infer them again, not leave them out (issue 21: prune reported "MACs ... -> 0")
    model = _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
            helper.make_node("MatMul", ["h", "v"], ["y"], name="mm2"),
        ],
        [("x", ["batch", 8])],
        [("y", ["unk__4", 2])],
        [_init("w", (8, 4)), _init("v", (4, 2))],
    )
    model.graph.node(0).outputs[0].shape = ir.Shape(["unk__3", 4])
    assert analysis.macs_by_node(model) == (
        {model.graph.node(0): 8 * 4, model.graph.node(1): 4 * 2}, 0
    )
    assert analysis.model_macs(model, {"batch": 3}) == {"mm1": 3 * 8 * 4, "mm2": 3 * 4 * 2}


def test_model_macs_resnet50_zoo() -> None:
    macs = analysis.model_macs(load(ZOO_DIR / "light_resnet50.onnx"))
    total = sum(macs.values())
    assert 4.0e9 < total < 4.2e9  # ResNet-50 at 224x224: about 4.09 GMACs
    assert len(macs) == 54  # 53 Conv + 1 Gemm


def test_model_macs_reads_no_external_data(tmp_path: Path) -> None:
    model = exported_model("resnet")
    path = save(model, tmp_path / "resnet.onnx", external_data=True)
    loaded = load(path)
    (tmp_path / "resnet.onnx.data").unlink()  # any weight read would now fail
    assert analysis.model_macs(loaded) == analysis.model_macs(model)
    assert sum(analysis.model_macs(model).values()) > 0
    # the convolutions: each equals the formula on the torch model's shapes
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert analysis.model_macs(model)[conv.name] == _conv_macs(1, 3, 32, 32, 8, 3, 1, 1, 1, 1)


def test_static_shape_copy_leaves_weights_out_and_the_model_unchanged() -> None:
    from tests.kit.exports import exported_model

    model = exported_model("resnet")
    before = ir.to_proto(model).SerializeToString()
    copy = analysis.with_static_shapes(model)
    assert ir.to_proto(model).SerializeToString() == before  # order, types, tensors: all back
    large = [v for v in model.graph.initializers.values() if v.const_value.nbytes > 1024]
    inputs = {v.name: v for v in copy.graph.inputs}
    assert large and all(v.name in inputs and v.name not in copy.graph.initializers for v in large)
    assert all(inputs[v.name].shape == v.const_value.shape for v in large)


def test_macs_after_onnxruntime_fused_ops_without_recorded_shapes() -> None:
    """A MatMul after `com.microsoft` ops whose outputs carry no recorded shape (head pruning
    re-infers shapes and onnx's inference does not know the fused ops: a pruned fused Llama step
    counted 0 MACs) is counted through the contrib ops' own shape rules (`ir/contrib_shapes`)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["n"], axis=-1,
                         epsilon=1e-6),
        helper.make_node("MatMul", ["n", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(64, np.float32), "g"),
         numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    found, unknown = analysis.macs_by_node(ir.from_proto(proto), {"batch": 3})
    assert unknown == 0 and list(found.values()) == [3 * 5 * 64 * 32]



def _attention_model(op: str, domain: str, inputs: list[tuple[str, list | None]],
                     **attributes: object) -> ir.Model:
    """One attention node; an input named "" is left out, one named w* is a zero initializer."""
    node = helper.make_node(op, [name for name, _ in inputs], ["y"], domain=domain,
                            **attributes)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
         for name, shape in inputs if name and not name.startswith("w")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros(shape, np.float32), name)
         for name, shape in inputs if name.startswith("w")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]))


@pytest.mark.parametrize(("op", "domain", "inputs", "attributes", "macs"), [
    # B=3, S=5, 4 heads of 8: scores and context, 3 x 4 x 5 x 5 x 8 each
    ("MultiHeadAttention", "com.microsoft",
     [("q", ["b", 5, 32]), ("k", ["b", 5, 32]), ("v", ["b", 5, 32])], {"num_heads": 4},
     2 * 3 * 4 * 5 * 5 * 8),
    # packed QKV [B, S, N, 3, H]
    ("MultiHeadAttention", "com.microsoft", [("q", ["b", 5, 4, 3, 8])], {"num_heads": 4},
     2 * 3 * 4 * 5 * 5 * 8),
    # a decode step: S=1 query against 6 past keys + 1 new one (T = 7), 4 query heads sharing
    # 2 key/value heads: the query heads count
    ("GroupQueryAttention", "com.microsoft",
     [("q", ["b", 1, 32]), ("k", ["b", 1, 16]), ("v", ["b", 1, 16]), ("pk", ["b", 2, 6, 8]),
      ("pv", ["b", 2, 6, 8])], {"num_heads": 4, "kv_num_heads": 2},
     2 * 3 * 4 * 1 * 7 * 8),
    # the packed projection 16 -> 3 x 32, then attention over T = 2 past + 5 positions
    ("Attention", "com.microsoft",
     [("x", ["b", 5, 16]), ("w", [16, 96]), ("", None), ("", None), ("past", [2, "b", 4, 2, 8])],
     {"num_heads": 4}, 3 * 5 * 16 * 96 + 2 * 3 * 4 * 5 * 7 * 8),
    # QAttention: the same, as the quantized form (past is input 8)
    ("QAttention", "com.microsoft",
     [("x", ["b", 5, 16]), ("w", [16, 96]), ("wb", [96]), ("s", []), ("ws", []), ("", None),
      ("", None), ("", None), ("past", [2, "b", 4, 2, 8])],
     {"num_heads": 4}, 3 * 5 * 16 * 96 + 2 * 3 * 4 * 5 * 7 * 8),
    # onnx's Attention (opset 23), 4-D: 4 query heads, 2 key/value heads, T = 3 past + 5
    ("Attention", "",
     [("q", ["b", 4, 5, 8]), ("k", ["b", 2, 5, 8]), ("v", ["b", 2, 5, 8]), ("", None),
      ("pk", ["b", 2, 3, 8]), ("pv", ["b", 2, 3, 8])], {}, 2 * 3 * 4 * 5 * 8 * 8),
])
def test_fused_attention_counts_the_matmuls_it_replaces(
    op: str, domain: str, inputs: list[tuple[str, list | None]], attributes: dict[str, object],
    macs: int,
) -> None:
    model = _attention_model(op, domain, inputs, **attributes)
    found, unknown = analysis.macs_by_node(model, {"b": 3})
    assert unknown == 0 and list(found.values()) == [macs]


def test_a_dimension_named_by_a_sum_takes_the_sum_of_its_parts() -> None:
    """Exporters name a decoder's mask length `past_sequence + sequence`: at past 2 and sequence
    3 it is 5 (not 1), as the keys a fused attention attends to are."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "past + seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros((8, 4), np.float32), "w")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    found, _ = analysis.macs_by_node(model, {"batch": 3, "past": 2, "seq": 3})
    assert list(found.values()) == [3 * 5 * 8 * 4]
