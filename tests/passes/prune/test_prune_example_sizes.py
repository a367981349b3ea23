"""Pruning reads shapes at the export's example sizes (`from_torch` records them): an audio model
whose symbolic sample count is 1 gives its convolutions negative lengths, which aborted shape
inference; channel tracing and the MACs the report gives use the recorded sizes (the batch
counted as 1)."""

from __future__ import annotations

import pytest

from slimgraph.api.prune import prune_with_report
from slimgraph.ir import metadata
from slimgraph.ir._dims import example_dims
from slimgraph.passes.prune import prepare_for_pruning
from tests import models_hf
from tests.kit.asserts import output_list

pytest.importorskip("transformers")


def test_preparation_records_shapes_at_the_export_sizes() -> None:
    _, model = models_hf.exported("wav2vec2")
    assert example_dims(model) == {"batch": 2, "samples": 400}
    prepared = prepare_for_pruning(model)
    values = {v.name: v for v in prepared.graph.inputs}
    assert values["input_values"].meta[metadata.STATIC_SHAPE] == (2, 400)
    given = prepare_for_pruning(model, {"samples": 800})  # given sizes win
    assert {v.name: v for v in given.graph.inputs}["input_values"].meta[
        metadata.STATIC_SHAPE] == (2, 800)


def test_audio_model_with_a_symbolic_sample_count_prunes() -> None:
    case, model = models_hf.exported("wav2vec2")
    pruned, report = prune_with_report(model, ratio=0.3, round_to=1)
    assert report.mac_dims == {"samples": 400}
    assert 0 < report.macs_after < report.macs_before
    ffn = [x for x in report.layers if x.layer.endswith("feed_forward.intermediate_dense")]
    assert [(x.before, x.after) for x in ffn] == [(64, 44)] * 2
    feed = case.feeds(3, 9, 1)
    assert [o.shape for o in output_list(pruned, feed)] == [
        o.shape for o in output_list(model, feed)]
