"""`slimgraph diff`: no change against itself, exactly the edits made to a copy, zoo pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from slimgraph import ir as sg_ir
from tests.kit.data import DIGITS, zoo
from tests.kit.exports import exported_model
from tests.kit.files import save_ir, save_proto
from tests.kit.graphs import single_op_model

NO_IO_CHANGE = {"added": [], "removed": [], "changed": []}
NO_INIT_CHANGE = {"added": [], "removed": [], "reshaped": []}


def assert_no_change(data: dict) -> None:
    assert data["changed"] is False
    assert data["ops"] == {} and data["opset"] == {}
    assert data["inputs"] == NO_IO_CHANGE and data["outputs"] == NO_IO_CHANGE
    assert data["initializers"] == NO_INIT_CHANGE
    for name in ("nodes", "parameters", "macs"):
        metric = data["metrics"][name]
        assert metric["before"] == metric["after"] and metric["ratio"] == 1.0


def test_diff_model_with_itself(cli) -> None:
    result = cli("diff", DIGITS, DIGITS, "--json")
    assert result.code == 0 and result.err == ""
    data = result.json()
    assert_no_change(data)
    assert data["metrics"]["size_bytes"]["ratio"] == 1.0
    text = cli("diff", DIGITS, DIGITS).out
    assert text.rstrip().endswith("no structural change")
    assert "ops changed" not in text and "initializers changed" not in text


def test_diff_model_with_resaved_copy(cli, tmp_path) -> None:
    """A load/save round trip changes no structure."""
    copy = save_ir(sg_ir.load(DIGITS), tmp_path / "copy.onnx")
    assert_no_change(cli("diff", DIGITS, copy, "--json").json())


def without_one_relu(tmp_path: Path) -> Path:
    model = sg_ir.load(DIGITS)
    relu = next(node for node in model.graph if node.name == "node_relu_1")
    relu.outputs[0].replace_all_uses_with(relu.inputs[0])
    model.graph.remove(relu, safe=True)
    return save_ir(model, tmp_path / "no_relu.onnx")


def test_diff_reports_exactly_one_removed_node(cli, tmp_path) -> None:
    edited = without_one_relu(tmp_path)
    data = cli("diff", DIGITS, edited, "--json").json()
    assert data["changed"] is True
    assert data["ops"] == {"Relu": {"before": 6, "after": 5}}
    assert data["metrics"]["nodes"] == {"before": 56, "after": 55, "ratio": 55 / 56}
    for name in ("parameters", "macs"):
        assert data["metrics"][name]["ratio"] == 1.0
    assert data["inputs"] == NO_IO_CHANGE and data["outputs"] == NO_IO_CHANGE
    assert data["initializers"] == NO_INIT_CHANGE and data["opset"] == {}
    text = cli("diff", DIGITS, edited).out
    assert any(line.split() == ["Relu", "6", "5", "-1"] for line in text.splitlines())
    assert any(line.split() == ["nodes", "56", "55", "0.98x"] for line in text.splitlines())


def test_diff_initializers_added_removed_reshaped(cli, tmp_path) -> None:
    proto = onnx.load(DIGITS)
    graph = proto.graph
    # fc.weight stored transposed (Gemm transB 1 -> 0): same function, new shape.
    weight_index = next(i for i, t in enumerate(graph.initializer) if t.name == "fc.weight")
    weight = numpy_helper.to_array(graph.initializer[weight_index])
    graph.initializer[weight_index].CopyFrom(numpy_helper.from_array(weight.T.copy(), "fc.weight"))
    gemm = next(node for node in graph.node if node.op_type == "Gemm")
    for attr in gemm.attribute:
        if attr.name == "transB":
            attr.i = 0
    # fc.bias renamed (removed + added), and one unused tensor added.
    bias = next(t for t in graph.initializer if t.name == "fc.bias")
    bias.name = "head.bias"
    gemm.input[2] = "head.bias"
    graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.int64), "extra"))
    edited = save_proto(proto, tmp_path / "edited.onnx")

    data = cli("diff", DIGITS, edited, "--json").json()
    assert data["initializers"] == {
        "added": [
            {"name": "extra", "dtype": "int64", "shape": [3]},
            {"name": "head.bias", "dtype": "float32", "shape": [10]},
        ],
        "removed": [{"name": "fc.bias", "dtype": "float32", "shape": [10]}],
        "reshaped": [
            {
                "name": "fc.weight",
                "before": {"dtype": "float32", "shape": [10, 64]},
                "after": {"dtype": "float32", "shape": [64, 10]},
            }
        ],
    }
    assert data["metrics"]["parameters"]["after"] == 112_682 + 3
    assert data["metrics"]["macs"]["ratio"] == 1.0  # Gemm MACs do not depend on the layout
    assert data["ops"] == {}
    text = cli("diff", DIGITS, edited).out
    assert "initializers changed (2 added, 1 removed, 1 reshaped)" in text
    assert any(
        line.split() == ["reshaped", "fc.weight", "float32[10,", "64]", "float32[64,", "10]"]
        for line in text.splitlines()
    )


def test_diff_inputs_and_opset(cli, tmp_path) -> None:
    a = save_proto(single_op_model("Conv", ["N", 3, 8, 8], [4, 3, 3, 3], opset=13), tmp_path / "a")
    b = save_proto(single_op_model("Conv", [2, 3, 8, 8], [4, 3, 3, 3], opset=17), tmp_path / "b")
    data = cli("diff", a, b, "--json").json()
    assert data["opset"] == {"": {"before": 13, "after": 17}}
    assert data["inputs"]["changed"] == [
        {
            "name": "x",
            "before": {"name": "x", "dtype": "float32", "shape": ["N", 3, 8, 8]},
            "after": {"name": "x", "dtype": "float32", "shape": [2, 3, 8, 8]},
        }
    ]
    assert data["metrics"]["macs"]["ratio"] == 2.0  # symbolic N counts as 1
    assert data["changed"] is True
    text = cli("diff", a, b).out
    assert "opset changed" in text and "inputs changed" in text


def test_diff_zoo_pair_matches_inspect(cli) -> None:
    a, b = zoo("resnet50"), zoo("inception_v1")
    data = cli("diff", a, b, "--json").json()
    before, after = cli("inspect", a, "--json").json(), cli("inspect", b, "--json").json()
    for name in ("nodes", "parameters", "macs", "size_bytes"):
        metric = data["metrics"][name]
        assert (metric["before"], metric["after"]) == (before[name], after[name])
        assert metric["ratio"] == pytest.approx(after[name] / before[name])
    for op in before["ops"].keys() | after["ops"].keys():
        counts = (before["ops"].get(op, 0), after["ops"].get(op, 0))
        if counts[0] == counts[1]:
            assert op not in data["ops"]
        else:
            assert (data["ops"][op]["before"], data["ops"][op]["after"]) == counts
    assert [i["name"] for i in data["inputs"]["removed"]] == ["gpu_0/data_0"]
    assert [i["name"] for i in data["inputs"]["added"]] == ["data_0"]
    init_a = {t.name for t in onnx.load(a).graph.initializer}
    init_b = {t.name for t in onnx.load(b).graph.initializer}
    assert {i["name"] for i in data["initializers"]["added"]} == init_b - init_a
    assert {i["name"] for i in data["initializers"]["removed"]} == init_a - init_b
    text = cli("diff", a, b).out
    assert "(--json lists all)" in text  # long initializer lists are cut in the table


def test_diff_torch_model_against_a_sliced_copy(cli, tmp_path) -> None:
    """A torch model vs itself with one conv's weight sliced: that initializer is reshaped."""
    model = exported_model("resnet")
    original = save_ir(model, tmp_path / "resnet.onnx")
    weight = next(
        value for name, value in model.graph.initializers.items() if name.endswith("conv1.weight")
    )
    array = weight.const_value.numpy()
    weight.const_value = ir.tensor(array[: array.shape[0] // 2], name=weight.name)
    edited = save_ir(model, tmp_path / "edited.onnx")
    data = cli("diff", original, edited, "--json").json()
    reshaped = data["initializers"]["reshaped"]
    assert [r["name"] for r in reshaped] == [weight.name]
    assert reshaped[0]["after"]["shape"][0] == array.shape[0] // 2
    drop = array.size - array.size // array.shape[0] * (array.shape[0] // 2)
    assert data["metrics"]["parameters"]["before"] - data["metrics"]["parameters"]["after"] == drop
