"""Lowering the torch test models (tests/models.py) and the onnx zoo files: eval outputs equal
onnxruntime's for the exported, lossless (`sg.optimize`) and static int8 QDQ forms; the errors.

Tolerance: rtol 1e-4 plus an absolute 1e-5 of each output's largest magnitude
(backend_helpers.assert_matches_ort). QDQ forms run on onnxruntime with graph optimizations off
(ORT_DISABLE_ALL), which executes the QuantizeLinear/DequantizeLinear nodes as written.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import slimgraph as sg
from slimgraph.errors import UnsupportedModelError
from tests import models
from tests.kit.data import DATA, ZOO_FILES, ZOO_IDS, digits_arrays
from tests.kit.exports import exported_model
from tests.runtime.torch_backend.backend_helpers import assert_matches_ort

torch = pytest.importorskip("torch")

from slimgraph.runtime.torch_backend import lower  # noqa: E402

FORMS = ["exported", "lossless", "qdq"]


def _feeds(model: ir.Model, name: str, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    if name == "bert":
        ids, mask = models.example_input("bert", batch)
        return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    return sg.random_feeds(model, batch=batch, seed=seed)


def _form(
    model: ir.Model, form: str, feeds: dict[str, np.ndarray], calibration_batches: int = 3
) -> ir.Model:
    """The model as exported, its lossless form (not verified here: the test compares it on
    onnxruntime anyway) or its static int8 QDQ form calibrated on shifted copies of `feeds`."""
    if form == "lossless":
        return sg.optimize(model, verify=False)
    if form == "qdq":
        calibration = [feeds] + [_shifted(feeds, s) for s in range(1, calibration_batches)]
        return sg.quantize(model, calibration=calibration, progress=False)
    return model


def _shifted(feeds: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: (v + rng.standard_normal(v.shape).astype(v.dtype) * 0.5 if v.dtype.kind == "f" else v)
        for k, v in feeds.items()
    }


@pytest.mark.parametrize("form", FORMS)
def test_torch_models_match_onnxruntime(torch_model_name, form):
    model = exported_model(torch_model_name)
    feeds = _feeds(model, torch_model_name)
    lowered_model = _form(model, form, feeds)
    if form == "qdq":
        assert any(n.op_type == "QuantizeLinear" for n in lowered_model.graph)
    assert_matches_ort(
        lowered_model, _shifted(feeds, 7),
        optimization="disable" if form == "qdq" else "all",
    )


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("path", ZOO_FILES, ids=ZOO_IDS)
def test_zoo_matches_onnxruntime(path, form):
    model = sg.load(path)
    feeds = _feeds(model, path.stem)
    assert_matches_ort(
        _form(model, form, feeds, calibration_batches=1), _shifted(feeds, 7),
        optimization="disable" if form == "qdq" else "all",
    )


@pytest.mark.parametrize("form", ["exported", "lossless"])
def test_digits_forms_match_onnxruntime(form):
    """(The digits QDQ form on real data: test_qat_lowering.py.)"""
    model = _form(sg.load(DATA / "digits_cnn.onnx"), form, {})
    assert_matches_ort(model, {"image": digits_arrays(rows=100)["image"]})


@pytest.mark.parametrize("name", ["grouped", "bert"])
def test_shape_subgraphs_follow_the_batch_size(name):
    """Exported with a dynamic batch, run at batch 3: Shape->Gather->Concat->Reshape recomputes."""
    module = models.build(name)
    args = models.example_input(name, batch=2)
    dims = {0: "batch"}
    dynamic = {"input_ids": dims, "attention_mask": dims} if name == "bert" else {"x": dims}
    model = sg.from_torch(module, args, dynamic)
    assert any(n.op_type == "Shape" for n in model.graph)
    feeds = {
        v.name: t.numpy()
        for v, t in zip(model.graph.inputs, models.example_input(name, batch=3), strict=True)
    }
    assert_matches_ort(model, feeds)
    with torch.no_grad():
        got = lower(model).run(feeds)[model.graph.outputs[0].name].numpy()
        want = module(*(torch.from_numpy(f) for f in feeds.values())).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def _single_node_model(node: onnx.NodeProto, opset: list) -> ir.Model:
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=opset, ir_version=10))


def test_unknown_op_is_named_before_anything_runs():
    model = _single_node_model(
        helper.make_node("Mystery", ["x"], ["y"], name="odd0", domain="com.example"),
        [helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)],
    )
    with pytest.raises(UnsupportedModelError) as error:
        lower(model)
    assert str(error.value) == "the torch backend cannot lower com.example::Mystery (node 'odd0')"


def test_unknown_onnx_op_names_the_default_domain():
    model = _single_node_model(
        helper.make_node("Col2Im", ["x"], ["y"], name="c2i"), [helper.make_opsetid("", 18)]
    )
    with pytest.raises(UnsupportedModelError, match=r"^the torch backend cannot lower "
                       r"ai\.onnx::Col2Im \(node 'c2i'\)$"):
        lower(model)


def test_qoperator_model_is_refused_saying_to_train_the_qdq_form():
    model = sg.load(DATA / "digits_cnn.onnx")
    qop = sg.quantize(model, calibration=digits_arrays("digits_calib.npz"), fmt="qoperator",
                      progress=False)
    first = next(n for n in qop.graph if n.op_type.startswith(("QLinear", "MatMulInteger")))
    with pytest.raises(UnsupportedModelError) as error:
        lower(qop)
    assert str(error.value) == (
        f"QOperator model (ai.onnx::{first.op_type} node '{first.name}'): the torch backend "
        "trains the QDQ form; quantize with --format qdq and train that model"
    )


def test_unknown_extra_output_is_refused():
    model = sg.load(DATA / "digits_cnn.onnx")
    with pytest.raises(sg.BadOptionError, match="^extra output 'nope' is not a value"):
        lower(model, extra_outputs=["nope"])


def test_dropout_is_identity_in_eval_and_active_in_train():
    model = _single_node_model(
        helper.make_node("Dropout", ["x"], ["y"], name="drop", ratio=0.5),
        [helper.make_opsetid("", 11)],
    )
    lowered = lower(model)
    x = torch.ones(2, 3)
    assert torch.equal(lowered(x)[0], x)
    lowered.train()
    torch.manual_seed(0)
    y = lowered(torch.ones(200, 3))[0]
    assert set(torch.unique(y).tolist()) == {0.0, 2.0}


def test_every_op_without_a_kernel_is_named_once_before_training():
    nodes = [helper.make_node("Mystery", ["x"], ["a"], name="odd0", domain="com.example"),
             helper.make_node("Col2Im", ["a"], ["b"], name="c2i"),
             helper.make_node("Mystery", ["b"], ["y"], name="odd1", domain="com.example")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = ir.from_proto(helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]))
    with pytest.raises(UnsupportedModelError) as error:
        lower(model)
    assert str(error.value) == (
        "the torch backend cannot lower com.example::Mystery (node 'odd0'), ai.onnx::Col2Im "
        "(node 'c2i')"
    )
