"""Symbolic dimension names survive every pass; from_torch exports a symbolic batch by default.

Issue 11, items 2 and 3: `from_torch(module, (example,))` used to export the example's batch (so
`bench --batch 64` ran batch 1), and pruning turned the output's `batch` into `unk__25`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn

import slimgraph as sg
from slimgraph.ir import from_torch, io_shapes, restore_dim_names
from slimgraph.runtime import create_session, run
from tests.kit.exports import exported_model


def _dims(value: ir.Value) -> list[str]:
    return [str(d) for d in value.shape]


def test_from_torch_exports_a_symbolic_batch_named_batch() -> None:
    module = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)).eval()
    model = from_torch(module, (torch.randn(1, 1, 8, 8),))  # a batch-1 example, as in the README
    assert _dims(model.graph.inputs[0]) == ["batch", "1", "8", "8"]
    assert _dims(model.graph.outputs[0]) == ["batch", "10"]
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    (got,) = run(create_session(model), {model.graph.inputs[0].name: x}).values()
    with torch.no_grad():
        np.testing.assert_allclose(got, module(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


def test_from_torch_opt_out_keeps_the_example_batch() -> None:
    module = nn.Sequential(nn.Linear(4, 3)).eval()
    model = from_torch(module, (torch.randn(1, 4),), dynamic_batch=False)
    assert _dims(model.graph.inputs[0]) == ["1", "4"]
    assert "dynamic_batch=False" in (from_torch.__doc__ or "")
    assert "symbolic by default" in " ".join((from_torch.__doc__ or "").split())


def test_from_torch_keeps_a_batch_the_model_fixes() -> None:
    """A model whose code needs the example's batch is still exported, with that batch."""

    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(2, 6) * 2

    model = from_torch(Fixed(), (torch.randn(2, 3, 2),))
    assert _dims(model.graph.inputs[0]) == ["2", "3", "2"]  # outputs lost the batch: static
    x = np.ones((2, 3, 2), np.float32)
    (got,) = run(create_session(model), {model.graph.inputs[0].name: x}).values()
    np.testing.assert_array_equal(got, np.full((2, 6), 2, np.float32))


@pytest.mark.parametrize(
    "transform",
    ["optimize", "quantize-dynamic", "quantize-static", "prune", "factorize", "fp16"],
)
def test_symbolic_names_survive_every_pass(transform: str) -> None:
    model = exported_model("resnet")
    assert _dims(model.graph.inputs[0])[0] == "batch"
    calls = {
        "optimize": lambda: sg.optimize(model),
        "quantize-dynamic": lambda: sg.quantize(model, mode="dynamic"),
        "quantize-static": lambda: sg.quantize(model, calibration=sg.random_feeds(model, batch=8)),
        "prune": lambda: sg.prune(model, ratio=0.5),
        "factorize": lambda: sg.factorize(model, rank_ratio=0.5),
        "fp16": lambda: sg.convert_fp16(model),
    }
    out = calls[transform]()
    assert _dims(out.graph.outputs[0]) == ["batch", "10"]
    invented = [
        v.name for n in out.graph.all_nodes() for v in n.outputs
        if v.shape is not None and any(str(d).startswith("unk__") for d in v.shape)
    ]  # fmt: skip
    assert invented == []


def test_restore_dim_names_puts_the_users_names_back() -> None:
    x = ir.Value(name="x", shape=ir.Shape(["batch", 4]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node("", "Relu", [x], name="relu")
    y, z = node.outputs[0], None
    y.name, y.shape = "y", ir.Shape(["batch", 4])
    second = ir.Node("", "Neg", [y], name="neg")
    z = second.outputs[0]
    z.name, z.shape = "z", ir.Shape(["batch", 4])
    graph = ir.Graph([x], [z], nodes=[node, second], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=9)
    before = io_shapes(model)
    y.shape = ir.Shape(["unk__3", 4])  # what onnx's inference writes after a rewrite
    z.shape = ir.Shape(["unk__3", 4])
    second.outputs[0].shape = ir.Shape(["unk__3", 4])
    extra = ir.Node("", "Neg", [z], name="neg2")
    extra.outputs[0].shape = ir.Shape(["unk__9", 4])  # a new value nobody named
    graph.append(extra)
    assert restore_dim_names(model, before) == 3
    assert _dims(y) == _dims(z) == ["batch", "4"]
    assert extra.outputs[0].shape[0].value is None


def test_restore_dim_names_takes_no_old_unk_name_for_a_users_name() -> None:
    # y = reshape(x) is [batch * 2, 4]: inference named its first dim unk__1 before a rewrite,
    # and a fresh inference after it names z's batch unk__1 (issue 21: y became "batch" and
    # onnxruntime planned y's buffer as z's, then failed at batch 2)
    x = ir.Value(name="x", shape=ir.Shape(["batch", 8]), type=ir.TensorType(ir.DataType.FLOAT))
    shape = ir.Value(name="shape", const_value=ir.tensor(np.array([-1, 4], np.int64)))
    reshape = ir.Node("", "Reshape", [x, shape], name="reshape")
    relu = ir.Node("", "Relu", [x], name="relu")
    y, z = reshape.outputs[0], relu.outputs[0]
    y.name, y.shape = "y", ir.Shape(["unk__1", 4])
    z.name, z.shape = "z", ir.Shape(["batch", 8])
    graph = ir.Graph([x], [y, z], nodes=[reshape, relu], initializers=[shape],
                     opset_imports={"": 18})  # fmt: skip
    model = ir.Model(graph, ir_version=9)
    before = io_shapes(model)
    y.shape, z.shape = ir.Shape(["unk__0", 4]), ir.Shape(["unk__1", 8])  # after the rewrite
    restore_dim_names(model, before)
    assert _dims(z) == ["batch", "8"]
    assert y.shape[0].value is None  # anonymous: never "batch"


def test_restore_dim_names_keeps_no_name_with_a_number_in_it() -> None:
    # heads pruned from 4 to 2: the view that was [seq, 4*batch, 16] is [seq, 2*batch, 16], and
    # another attention's view is still [seq, 4*batch, 16]; one name for both sizes made
    # onnxruntime refuse the pruned nn.TransformerDecoderLayer ("Shape mismatch attempting to
    # re-use buffer")
    x = ir.Value(name="x", shape=ir.Shape(["seq", "batch", 32]),
                 type=ir.TensorType(ir.DataType.FLOAT))  # fmt: skip
    shape = ir.Value(name="shape", const_value=ir.tensor(np.array([0, -1, 16], np.int64)))
    reshape = ir.Node("", "Reshape", [x, shape], name="view")
    y = reshape.outputs[0]
    y.name, y.shape = "y", ir.Shape(["seq", "2*batch", 16])
    relu = ir.Node("", "Relu", [y], name="relu")
    z = relu.outputs[0]
    z.name, z.shape = "z", ir.Shape(["seq", "2*batch", 16])
    graph = ir.Graph([x], [z], nodes=[reshape, relu], initializers=[shape],
                     opset_imports={"": 18})  # fmt: skip
    model = ir.Model(graph, ir_version=9)
    before = io_shapes(model)
    y.shape = z.shape = ir.Shape(["seq", "unk__4", 16])  # re-inferred after the rewrite
    restore_dim_names(model, before)
    assert y.shape[0].value == "seq"
    assert y.shape[1].value is None and z.shape[1].value is None  # anonymous, not "2*batch"


def test_from_torch_falls_back_when_outputs_lose_the_batch() -> None:
    """A time-first GRU: torch keeps axis 0 symbolic on the input but bakes its size into the
    graph; the export is redone with the example's shapes instead of a model that cannot run."""
    module = nn.GRU(4, 3).eval()
    model = from_torch(module, (torch.randn(6, 2, 4),))
    assert _dims(model.graph.inputs[0]) == ["6", "2", "4"]
    x = np.random.default_rng(0).standard_normal((6, 2, 4)).astype(np.float32)
    got = run(create_session(model), {model.graph.inputs[0].name: x})
    with torch.no_grad():
        expected = module(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(next(iter(got.values())), expected, rtol=1e-4, atol=1e-5)
