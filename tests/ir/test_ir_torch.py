"""from_torch: every node keeps the torch module path it came from; dynamic batch; bad arguments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn

from slimgraph.errors import BadInputError, UnsupportedModelError
from slimgraph.ir import from_torch, layer_name, load, metadata, save
from slimgraph.runtime import create_session, run
from tests import models as test_models
from tests.kit.asserts import raises_exactly
from tests.kit.exports import exported_model


def _modules_of(module: nn.Module, kind: type) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, kind)]


def _layers(model: ir.Model, op_type: str) -> list[str]:
    return [layer_name(n) for n in model.graph if n.op_type == op_type]


def test_resnet_layer_names_follow_torch_modules() -> None:
    module = test_models.build("resnet")
    model = exported_model("resnet")
    convs = [n for n in model.graph if n.op_type == "Conv"]
    assert len(convs) == len(_modules_of(module, nn.Conv2d))
    parameters = dict(module.named_parameters())
    for node in convs:
        weight = node.inputs[1]
        assert weight.name in parameters and weight.name.endswith(".weight")
        assert layer_name(node) == weight.name.removesuffix(".weight")
        assert node.metadata_props[metadata.LAYER] == layer_name(node)
    assert sorted(_layers(model, "Conv")) == sorted(_modules_of(module, nn.Conv2d))
    assert "layer1.0.conv1" in _layers(model, "Conv")
    assert sorted(_layers(model, "BatchNormalization")) == sorted(
        _modules_of(module, nn.BatchNorm2d)
    )
    blocks = _modules_of(module, test_models.BasicBlock)
    assert _layers(model, "Add") == blocks  # one residual Add per block, in order
    assert _layers(model, "Gemm") == ["fc"]


def test_layer_names_survive_save_and_load(tmp_path: Path) -> None:
    model = exported_model("resnet")
    loaded = load(save(model, tmp_path / "resnet.onnx"))
    before = {n.name: n.metadata_props.get(metadata.LAYER) for n in model.graph}
    after = {n.name: n.metadata_props.get(metadata.LAYER) for n in loaded.graph}
    assert after == before
    assert sum(1 for layer in after.values() if layer) > len(after) // 2


def test_layer_name_rules() -> None:
    node = ir.node("Relu", [ir.val("x")])
    assert layer_name(node) == ""
    node.metadata_props[metadata.TORCH_NAME_SCOPES] = "['', 'block', 'block.act', 'relu']"
    assert layer_name(node) == "block.act"
    node.metadata_props[metadata.TORCH_NAME_SCOPES] = "not a list ["
    assert layer_name(node) == ""
    # torch.export's placeholder for a node created with no module is no layer
    hook = "_empty_nn_module_stack_from_metadata_hook"
    node.metadata_props[metadata.TORCH_NAME_SCOPES] = f"['{hook}', 'sym_size_int_23']"
    assert layer_name(node) == ""
    node.metadata_props[metadata.LAYER] = hook  # as files exported before this rule stored it
    assert layer_name(node) == ""
    node.metadata_props[metadata.LAYER] = "stored.name"
    assert layer_name(node) == "stored.name"


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch(batch: int, dynamic_resnet: ir.Model) -> None:
    module = test_models.build("resnet")
    (x,) = test_models.example_input("resnet", batch=batch)
    with torch.no_grad():
        expected = module(x).numpy()
    got = run(create_session(dynamic_resnet), {"x": x.numpy()})
    (output,) = got.values()
    assert output.shape == (batch, 10)
    np.testing.assert_allclose(
        output, expected, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(expected).max()))
    )


@pytest.fixture(scope="module")
def dynamic_resnet() -> ir.Model:
    model = from_torch(
        test_models.build("resnet"),
        test_models.example_input("resnet", batch=2),
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}},
    )
    first = model.graph.inputs[0].shape[0]
    assert not isinstance(first, int) and first.value, "the batch dimension must be symbolic"
    assert list(model.graph.inputs[0].shape)[1:] == [3, 32, 32]
    # the example's size of each symbolic dimension, for sample inputs (verification)
    assert json.loads(model.metadata_props[metadata.EXAMPLE_DIMS]) == {first.value: 2}
    return model


def test_single_tensor_argument() -> None:
    module = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()
    x = torch.randn(2, 4)
    model = from_torch(module, x)
    assert [[str(d) for d in v.shape] for v in model.graph.inputs] == [["batch", "4"]]
    assert json.loads(model.metadata_props[metadata.EXAMPLE_DIMS]) == {"batch": 2}
    (got,) = run(create_session(model), {model.graph.inputs[0].name: x.numpy()}).values()
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x).numpy(), rtol=1e-5, atol=1e-6)
    assert [layer_name(n) for n in model.graph if n.op_type == "Gemm"] == ["0"]


def test_not_a_module() -> None:
    message = "from_torch needs a torch.nn.Module, got function"
    with pytest.raises(UnsupportedModelError, match=message):
        from_torch(lambda x: x, (torch.zeros(1),))
    assert issubclass(UnsupportedModelError, BadInputError)


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on values: torch.export cannot trace it
            return x
        return -x


def test_export_failure_is_one_clear_error() -> None:
    # the cause, not the exporter's banner ("Failed to export the model with torch.export.
    # \x1b[96mThis is step 1/3\x1b[0m of exporting ...", issue 21)
    message = (
        "torch.onnx.export could not export _DataDependent: Could not guard on data-dependent "
        "expression Eq(u0, 1) (unhinted: Eq(u0, 1)). (Size-like symbols: none)"
    )
    with raises_exactly(UnsupportedModelError, message):
        from_torch(_DataDependent(), (torch.ones(2),))


class _Raises(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("\x1b[91mno kernel for this layer\x1b[0m\n  (details on this line)")


def test_export_failure_quotes_the_cause_without_colour_codes() -> None:
    message = "torch.onnx.export could not export _Raises: no kernel for this layer"
    with raises_exactly(UnsupportedModelError, message) as caught:
        from_torch(_Raises(), (torch.ones(2),))
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


def test_a_hugging_face_model_given_the_mask_as_its_cache_is_told_how_to_export() -> None:
    """GPT-2's second positional argument is past_key_values, not the mask: torch's error gets
    the wrapper to export instead, and that wrapper exports (the README's Transformers step 1)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50,
                                     n_positions=16)  # fmt: skip
    net = transformers.GPT2Model(config).eval()
    ids, mask = torch.randint(1, 50, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    dynamic = ({0: "batch", 1: "seq"},) * 2
    with raises_exactly(UnsupportedModelError,
                        "torch.onnx.export could not export GPT2Model: 'FakeTensor' object has "
                        "no attribute 'get_seq_length' (a Hugging Face model: export a wrapper "
                        "module whose forward returns net(input_ids=ids, attention_mask=mask, "
                        "use_cache=False).last_hidden_state)"):
        from_torch(net, (ids, mask), dynamic_shapes=dynamic)

    class Hidden(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.net(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    model = from_torch(Hidden(net), (ids, mask), dynamic_shapes=dynamic,
                       output_names=["last_hidden_state"])  # fmt: skip
    longer = torch.randint(1, 50, (3, 7))
    with torch.no_grad():
        want = net(input_ids=longer, attention_mask=torch.ones_like(longer)).last_hidden_state
    names = [v.name for v in model.graph.inputs]
    got = run(create_session(model), dict(zip(names, [longer.numpy(), np.ones((3, 7), np.int64)],
                                                strict=True)))["last_hidden_state"]  # fmt: skip
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
