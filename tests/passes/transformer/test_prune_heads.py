"""prune-heads (issue 16): whole heads removed, head counts updated in Reshape constants and in
fused attention ops, output shapes kept, dead heads removed exactly."""

from __future__ import annotations

import numpy as np
import pytest

from slimgraph.errors import BadOptionError
from slimgraph.passes._kit import constant_array
from slimgraph.passes.pipeline import run_pipeline
from slimgraph.passes.prune_heads import prune_heads
from tests.kit.asserts import assert_same_outputs, cosine, output_list
from tests.kit.data import transformer_feeds
from tests.kit.exports import export_transformer


def _model(name: str, fused: bool, dead: tuple[int, ...] = ()):  # noqa: ANN202
    model = export_transformer(name, dead)
    return run_pipeline(model, ["transformer"], verify=False).model if fused else model


def _weight_shapes(model) -> list[tuple[int, ...]]:  # noqa: ANN001
    return [tuple(constant_array(n.inputs[1]).shape) for n in model.graph
            if n.op_type == "MatMul" and constant_array(n.inputs[1]) is not None]


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_half_the_heads_go_with_head_counts_updated(name: str, fused: bool) -> None:
    model = _model(name, fused)
    result = prune_heads(model, 0.5)
    assert [(b.heads, b.kept, len(b.removed)) for b in result.blocks] == [(4, 2, 2)] * 2
    pruned = result.model
    shapes = _weight_shapes(pruned)
    if name == "bert":  # q, k, v [64, 32], out [32, 64] per layer; fc1/fc2 untouched
        assert shapes.count((64, 32)) == 6 and shapes.count((32, 64)) == 2
        assert shapes.count((64, 256)) == 2
    else:  # packed qkv [64, 96] and its Split sizes
        assert shapes.count((64, 96)) == 2 and shapes.count((32, 64)) == 2
        sizes = [constant_array(n.inputs[1]).tolist() for n in pruned.graph if n.op_type == "Split"]
        assert sizes == [[32, 32, 32]] * 2
        for split in (n for n in pruned.graph if n.op_type == "Split"):  # rewired to the new sizes
            assert split.inputs[1] is pruned.graph.initializers[split.inputs[1].name]
    if fused:
        heads = [n.attributes["num_heads"].value for n in pruned.graph
                 if n.op_type == "MultiHeadAttention"]
        assert heads == [2, 2]
    else:
        reshapes = sorted(constant_array(n.inputs[1]).tolist() for n in pruned.graph
                          if n.op_type == "Reshape" and constant_array(n.inputs[1]) is not None
                          and len(constant_array(n.inputs[1])) in (3, 4))
        assert [0, 0, 2, 16] in reshapes and [0, 0, 32] in reshapes
        rewired = [n.inputs[1] for n in pruned.graph if n.op_type == "Reshape"
                   and constant_array(n.inputs[1]) is not None
                   and constant_array(n.inputs[1]).tolist() in ([0, 0, 2, 16], [0, 0, 32])]
        assert len(rewired) >= 4  # the head split and merge of both layers read new shapes
        assert all(v is pruned.graph.initializers.get(v.name) for v in rewired)
    for batch, seq in [(3, 11), (1, 29)]:
        feed = transformer_feeds(name, batch, seq)
        want, got = output_list(model, feed)[0], output_list(pruned, feed)[0]
        assert got.shape == want.shape
        assert cosine(want, got) > 0.8  # half the heads of random weights: approximate


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_zero_weight_heads_are_removed_exactly(name: str, fused: bool) -> None:
    model = _model(name, fused, dead=(1, 2))
    result = prune_heads(model, 0.5)
    assert [b.removed for b in result.blocks] == [(1, 2)] * 2
    assert all(b.scores[1] == b.scores[2] == 0.0 for b in result.blocks)
    for batch, seq in [(3, 11), (2, 30)]:
        assert_same_outputs(model, result.model, transformer_feeds(name, batch, seq))


def test_dead_only_removes_just_the_dead_heads() -> None:
    model = _model("bert", False, dead=(3,))
    result = prune_heads(model, 0.0, dead_only=True)
    assert [b.kept for b in result.blocks] == [3, 3]
    assert_same_outputs(model, result.model, transformer_feeds("bert", 2, 13))


def test_bad_ratio_is_one_clear_error() -> None:
    with pytest.raises(BadOptionError, match=r"head ratio must be in \[0, 1\) \(got 1.0\)"):
        prune_heads(export_transformer("bert"), 1.0)


def test_head_pruned_model_still_fuses_and_quantizes() -> None:
    model = export_transformer("bert")
    pruned = prune_heads(model, 0.5).model
    fused = run_pipeline(pruned, ["transformer"], verify=True).model
    assert sum(n.op_type == "MultiHeadAttention" for n in fused.graph) == 2
    import slimgraph as sg

    quantized = sg.quantize(fused, mode="dynamic")
    feed = transformer_feeds("bert", 2, 15)
    assert np.isfinite(output_list(quantized, feed)[0]).all()
    assert cosine(output_list(pruned, feed)[0], output_list(quantized, feed)[0]) > 0.999
