"""Name patterns select nodes by torch layer name or ONNX node name, the same for every pass;
reports name nodes the same way (`display_name`)."""

from __future__ import annotations

import onnx_ir as ir

from slimgraph.ir import display_name, metadata
from slimgraph.ir.select import matching_pattern, node_names
from tests.kit.exports import exported_model


def test_patterns_match_layer_or_node_name() -> None:
    model = exported_model("resnet")
    conv = next(n for n in model.graph if n.op_type == "Conv" and "layer1.0.conv1" in node_names(n))
    assert node_names(conv) == ("layer1.0.conv1", conv.name)
    assert matching_pattern(conv, ["layer2.*", "layer1.*.conv1"]) == "layer1.*.conv1"
    assert matching_pattern(conv, [conv.name]) == conv.name
    assert matching_pattern(conv, ["layer1.0.CONV1", "fc"]) is None  # case-sensitive


def test_node_without_layer_is_matched_by_node_name_only() -> None:
    model = exported_model("mlp")
    unnamed = [n for n in model.graph if not n.metadata_props.get("pkg.slimgraph.layer")]
    assert unnamed, "the export has nodes outside any module (e.g. constants)"
    node = unnamed[0]
    assert node_names(node) == ((node.name,) if node.name else ())


def test_display_name_prefers_the_layer_then_the_node_name_then_the_op() -> None:
    x = ir.Value(name="x")
    layered = ir.node("Relu", [x], name="node_Relu_3", metadata_props={metadata.LAYER: "act"})
    named = ir.node("Relu", [x], name="node_Relu_4")
    unnamed = ir.node("Relu", [x])
    assert display_name(layered) == "act"
    assert display_name(named) == "node_Relu_4"
    assert display_name(unnamed) == "Relu"
    assert display_name(unnamed, 7) == "Relu#7"
    assert display_name(named, 7) == "node_Relu_4"
