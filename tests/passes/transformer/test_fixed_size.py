"""Attention fusion and head pruning on fixed-size exports: `sg.from_torch(model, args)` with
every size as in the example (`dynamic_batch=False`), or with the default symbolic batch and a
literal sequence. The exporter folds the sizes into constants (head-split Reshapes to literal
[2, 8, 4, 16], Expand sizes, rotary cos/sin tables of fixed length, masks), and the transformer
preset still fuses every attention block, exactly on onnxruntime at the export's sizes (a
fixed-size graph runs only at those), and `prune --heads 0.5` removes half the heads with the
outputs' shapes unchanged.

Also: `FuseAttentionPass` run directly on a raw Gemma 2 or BLOOM decode step, whose Softmax
output the export leaves untyped before a Cast to the same type, fuses (the pass finds the
type by dataflow; the presets typed it in an earlier pass).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

import slimgraph as sg
from slimgraph.passes.pipeline import run_pipeline
from slimgraph.passes.prune import prune_heads
from slimgraph.passes.transformer import FuseAttentionPass
from tests import models_hf, models_lm
from tests.kit.asserts import assert_close, assert_same_outputs, output_list
from tests.kit.heads import assert_half_the_heads_went

pytestmark = pytest.mark.slow  # exports of the zoo: about 40 s in all on 2 cores

FUSED = ("MultiHeadAttention", "GroupQueryAttention")
# (model, export): "static" every size as in the example, "default" `sg.from_torch(module,
# args)` as users call it (batch symbolic where the export keeps it, the sequence literal)
CASES = [("llama", "static"), ("bert", "static"), ("gpt2", "static"), ("vit", "static"),
         ("torch-encoder", "static"), ("torch-encoder", "default")]
_EXPORTS: dict[tuple[str, str], bytes] = {}
_FUSED: dict[tuple[str, str], tuple[bytes, Any]] = {}


def fixed_export(name: str, mode: str) -> tuple[models_hf.Case, ir.Model]:
    """The zoo model `name` exported without dynamic_shapes, once per session; a fresh copy."""
    case = models_hf.build(name)
    if (name, mode) not in _EXPORTS:
        torch.set_num_threads(1)
        model = sg.from_torch(case.module, case.args, input_names=list(case.names),
                              dynamic_batch=mode == "default")
        _EXPORTS[name, mode] = ir.to_proto(model).SerializeToString()
    return case, ir.from_proto(onnx.load_model_from_string(_EXPORTS[name, mode]))


def fixed_fused(name: str, mode: str) -> tuple[ir.Model, Any]:
    """The transformer preset on `fixed_export(name, mode)`, run once per session: (a fresh copy
    of its model, its fuse-attention record)."""
    if (name, mode) not in _FUSED:
        result = run_pipeline(fixed_export(name, mode)[1], ["transformer"], verify=False)
        record = next(r for r in result.records if r.name == "fuse-attention")
        _FUSED[name, mode] = (ir.to_proto(result.model).SerializeToString(), record)
    data, record = _FUSED[name, mode]
    return ir.from_proto(onnx.load_model_from_string(data)), record


def feeds_at_export_size(case: models_hf.Case, batch: int = 2) -> dict[str, np.ndarray]:
    """The case's inputs at the export's sequence (row 1 padded where the model takes a mask)."""
    return case.feeds(batch, case.args[0].shape[1], 1)


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_a_fixed_size_export_fuses_every_block_exactly(name: str, mode: str) -> None:
    case, model = fixed_export(name, mode)
    first = model.graph.inputs[0].shape
    assert first is not None
    assert (first[0] == "batch") == (mode == "default" and name.startswith("torch"))
    fused, record = fixed_fused(name, mode)
    blocks = case.blocks
    summary = f"fuse-attention: {blocks} of {blocks} attention blocks fused"
    assert record.details["summary"] == summary
    ops = Counter(n.op_type for n in fused.graph)
    assert ops["Softmax"] == 0 and sum(ops[op] for op in FUSED) == blocks
    if name == "llama":  # grouped-query attention with rotary tables folded to constants
        assert ops["GroupQueryAttention"] == 2 and ops["RotaryEmbedding"] == 4
    for batch in (2, 3) if mode == "default" else (2,):
        assert_same_outputs(model, fused, feeds_at_export_size(case, batch),
                            rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "mode"), CASES)
@pytest.mark.parametrize("form", ["plain", "fused"])
def test_a_fixed_size_export_loses_half_its_heads(name: str, mode: str, form: str) -> None:
    case, model = fixed_export(name, mode)
    if form == "fused":
        model = fixed_fused(name, mode)[0]
    result = prune_heads(model, 0.5)
    assert_half_the_heads_went(result, case.blocks)
    feeds = feeds_at_export_size(case)
    want, got = output_list(model, feeds), output_list(result.model, feeds)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(np.isfinite(g).all() for g in got)


def test_the_batch_symbol_is_renamed_inside_products() -> None:
    """`from_torch`'s default symbolic batch is `batch` in every recorded shape, also where
    the exporter wrote it in a product (`4*s31`), so shapes computed from the graph's inputs
    meet the recorded ones (DeBERTa-v2 merges batch and heads and did not fuse otherwise)."""

    class Merge(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x.reshape(-1, 8) * 2.0).reshape(x.shape[0], 4, 8)

    model = sg.from_torch(Merge(), (torch.randn(2, 4, 8),))
    dims = {str(d) for n in model.graph for v in n.outputs if v.shape is not None
            for d in v.shape if not isinstance(d, int)}
    assert dims == {"batch", "4*batch"}


@pytest.mark.parametrize("name", ["gemma2", "bloom"])
def test_fuse_attention_alone_takes_a_raw_step_with_an_untyped_softmax(name: str) -> None:
    _, model = models_lm.exported(name)
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    cast = next(iter(softmax.outputs[0].uses())).node
    assert softmax.outputs[0].dtype is None and cast.op_type == "Cast"  # the case at hand
    feeds = models_lm.step_feeds(model, 2, 3, 2)
    want = output_list(model, feeds)
    result = FuseAttentionPass()(model)
    assert result.summary == "fuse-attention: 2 of 2 attention blocks fused"
    for expected, actual, value in zip(want, output_list(result.model, feeds),
                                       result.model.graph.outputs, strict=True):
        assert_close(expected, actual, rtol=1e-4, atol=1e-5, name=value.name)
