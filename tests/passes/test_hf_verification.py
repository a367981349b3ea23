"""Hugging Face architectures from tiny configs (seeded random weights, nothing downloaded),
exported with `from_torch` with batch and sequence symbolic: the default calls (no user inputs)
verify them on inputs that drive them (issue 21; issue 20 item 4) and lossless never adds nodes.

Before: every symbolic dimension was 1, so Wav2Vec2's convolutions refused the inputs ("Invalid
input shape: {1}", blamed on the user's data) and text models were verified at sequence 1 with
an all-ones mask, where no mask or head-split bug can show.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.api.optimize import optimize_report
from slimgraph.ir import metadata
from slimgraph.passes.pipeline import node_count
from slimgraph.runtime import create_session, run
from slimgraph.runtime.exact import exact_difference
from slimgraph.runtime.feeds import driving_feeds, example_dims

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


class _Text(torch.nn.Module):
    """`input_ids`, `attention_mask` -> last hidden state (no cache), positional for export."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        options = {"use_cache": False} if hasattr(self.model.config, "use_cache") else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **options)
        return out.last_hidden_state


def _text(model: torch.nn.Module) -> ir.Model:
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", min=2, max=64)}
    return sg.from_torch(_Text(model.eval()), (ids, mask), (dims, dims))


def wav2vec2() -> ir.Model:
    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=32,
    )
    torch.manual_seed(0)
    module = transformers.Wav2Vec2Model(config).eval()
    audio = torch.randn(2, 1600)
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", min=400, max=32000)},)
    return sg.from_torch(module, (audio,), dims)


def gpt2() -> ir.Model:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    return _text(transformers.GPT2Model(config))


def albert() -> ir.Model:
    torch.manual_seed(0)
    config = transformers.AlbertConfig(
        embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, vocab_size=100, max_position_embeddings=64,
    )
    return _text(transformers.AlbertModel(config))


def bert() -> ir.Model:
    """A MiniLM-shaped BertModel, much smaller (its LayerNorm scales are uniform at init)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64,
    )
    return _text(transformers.BertModel(config))


def convnext() -> ir.Model:
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(
        num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32,
        num_labels=4,
    )
    module = transformers.ConvNextForImageClassification(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = module

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.module(pixel_values=pixels).logits

    return sg.from_torch(Logits(), (torch.randn(1, 3, 32, 32),))


BUILDERS: dict[str, Callable[[], ir.Model]] = {
    "wav2vec2": wav2vec2, "gpt2": gpt2, "albert": albert, "bert": bert, "convnext": convnext,
}
_CACHE: dict[str, bytes] = {}


@pytest.fixture(scope="module")
def hf_model() -> Callable[[str], ir.Model]:
    """A fresh copy of each architecture, exported once per module."""

    def get(name: str) -> ir.Model:
        if name not in _CACHE:
            _CACHE[name] = ir.to_proto(BUILDERS[name]()).SerializeToString()
        return ir.from_proto(__import__("onnx").load_from_string(_CACHE[name]))

    return get


def _same_outputs(reference: ir.Model, candidate: ir.Model, feeds: dict) -> None:
    want = run(create_session(reference, optimization="disable"), feeds)
    got = run(create_session(candidate, optimization="disable"), feeds)
    for name, expected in want.items():
        assert exact_difference(expected, got[name]) is None, name


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_lossless_and_dynamic_int8_run_without_user_inputs(name: str, hf_model) -> None:
    model = hf_model(name)
    result = optimize_report(model)  # verified on generated inputs: no user data
    assert result.fidelity is not None  # verified end to end
    assert node_count(result.model) <= node_count(model)
    assert "ConstantOfShape" not in {n.op_type for n in result.model.graph}  # none came in
    feeds, _ = driving_feeds(model, seed=1)  # other values than the verifier's
    _same_outputs(model, result.model, feeds)
    quantized = sg.quantize(model, mode="dynamic")
    assert "MatMulInteger" in {n.op_type for n in quantized.graph}
    expected = run(create_session(model), feeds)
    got = run(create_session(quantized), feeds)
    for output, reference in expected.items():
        cosine = float(
            np.dot(reference.ravel(), got[output].ravel())
            / (np.linalg.norm(reference) * np.linalg.norm(got[output]))
        )
        assert cosine > 0.95, (output, cosine)


def test_text_models_are_verified_at_the_export_sizes_with_padded_rows(hf_model) -> None:
    model = hf_model("gpt2")
    assert example_dims(model) == {"batch": 2, "sequence": 8}
    feeds, outputs = driving_feeds(model)
    assert feeds["input_ids"].shape == (2, 8) and feeds["attention_mask"].shape == (2, 8)
    np.testing.assert_array_equal(feeds["attention_mask"].sum(axis=1), [8, 6])  # a padded row
    assert np.isfinite(outputs[next(iter(outputs))]).all()


def test_audio_is_driven_at_a_length_its_convolutions_take(hf_model) -> None:
    """Without the recorded example (a file exported elsewhere), longer inputs are tried until
    the feature extractor's convolutions take them: 8 and 32 samples leave the third
    convolution (kernel 3 after strides 5 and 2) fewer frames than its kernel, 128 do not."""
    model = hf_model("wav2vec2")
    assert example_dims(model) == {"batch": 2, "sequence": 1600}
    del model.metadata_props[metadata.EXAMPLE_DIMS]
    feeds, _ = driving_feeds(model)
    assert feeds["input_values"].shape == (2, 128)
    assert sg.optimize(model) is not None
