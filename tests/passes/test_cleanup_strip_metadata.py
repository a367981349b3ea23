"""strip-debug-metadata drops the exporter's debug props only; quantized outputs carry none."""

from __future__ import annotations

import numpy as np

import slimgraph as sg
from slimgraph import runtime
from slimgraph.ir import layer_name, metadata
from slimgraph.passes.cleanup import StripDebugMetadataPass
from tests.kit.exports import exported_model


def _keys(model) -> set[str]:
    return {key for node in model.graph for key in node.metadata_props}


def _value_keys(model) -> set[str]:
    graph = model.graph
    values = [*graph.inputs, *graph.initializers.values(), *(v for n in graph for v in n.outputs)]
    return {key for value in values for key in value.metadata_props}


def _debug_value_keys(model) -> set[str]:
    return {k for k in _value_keys(model) if k.startswith(metadata.EXPORTER_DEBUG_VALUE_PREFIXES)}


def test_strip_keeps_layers_and_outputs() -> None:
    model = exported_model("resnet")
    assert set(metadata.EXPORTER_DEBUG_KEYS) & _keys(model)
    layers = [layer_name(node) for node in model.graph]
    feeds = runtime.random_feeds(model)
    before = runtime.run(runtime.create_session(model), feeds)
    assert _debug_value_keys(model)  # torch.export's graph signature on the input, at least
    result = StripDebugMetadataPass()(model)
    assert result.modified and not set(metadata.EXPORTER_DEBUG_KEYS) & _keys(model)
    assert not _debug_value_keys(model)
    # A node that has a layer name loses the name scopes it was derived from; marks stay.
    for node in model.graph:
        if node.metadata_props.get(metadata.LAYER):
            assert metadata.TORCH_NAME_SCOPES not in node.metadata_props
    fused = sg.passes.lossless(exported_model("resnet")).model
    assert metadata.UNIT in _keys(StripDebugMetadataPass()(fused).model)
    assert metadata.UNIT not in _keys(StripDebugMetadataPass(working_marks=True)(fused).model)
    assert [layer_name(node) for node in model.graph] == layers
    after = runtime.run(runtime.create_session(model), feeds)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)
    assert not StripDebugMetadataPass()(model).modified


def test_quantized_models_drop_debug_metadata() -> None:
    model = exported_model("mlp")
    for quantized in (sg.quantize(model, mode="dynamic"),
                      sg.quantize(model, calibration=runtime.random_feeds(model, batch=4))):
        assert not set(metadata.EXPORTER_DEBUG_KEYS) & _keys(quantized)
        assert not _debug_value_keys(quantized) and metadata.UNIT not in _keys(quantized)
        assert metadata.LAYER in _keys(quantized)
    assert set(metadata.EXPORTER_DEBUG_KEYS) & _keys(model)  # the input is untouched
