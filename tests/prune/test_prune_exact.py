"""Exactness: removing channels whose producing weights are zero leaves the outputs unchanged."""

from __future__ import annotations

import pytest

from slimgraph import runtime
from slimgraph.ir.analysis import model_macs
from slimgraph.passes.prune import prune, prune_with_report
from tests.conftest import exported_model
from tests.prune.prune_helpers import assert_same_outputs, check_valid, zero_channels

CASES = [
    (name, pad)
    for name in ("resnet", "densenet", "mobilenetv2", "mlp", "convtranspose")
    for pad in (False, True)
] + [("grouped", True)]


@pytest.mark.parametrize(("name", "pad"), CASES)
def test_prune_exact_on_zeroed_channels(name: str, pad: bool) -> None:
    zeroed, analysis, count = zero_channels(exported_model(name), 0.5, pad=pad, seed=1)
    assert count > 0
    pruned, report = prune_with_report(zeroed, ratio=0.5, criterion="l1", pad=pad)
    assert sum(g.channels - g.kept for g in report.groups) == count
    assert report.params_after < report.params_before
    check_valid(pruned)
    feeds = runtime.random_feeds(zeroed, batch=2, seed=3)
    assert_same_outputs(zeroed, pruned, feeds)


@pytest.mark.parametrize("name", ["resnet", "densenet", "mobilenetv2", "mlp"])
def test_prune_pad_keeps_output_shapes_and_prunes_heads(name: str) -> None:
    model = exported_model(name)
    plain, plain_report = prune_with_report(model, ratio=0.5)
    padded, pad_report = prune_with_report(model, ratio=0.5, pad=True)
    # pad mode also shrinks the group ending at the graph output, then pads it back
    assert any(g.padded for g in pad_report.groups)
    assert pad_report.params_after < plain_report.params_after
    assert [tuple(v.shape) for v in padded.graph.outputs] == [
        tuple(v.shape) for v in model.graph.outputs
    ]
    feeds = runtime.random_feeds(model, batch=2)
    got = runtime.run(runtime.create_session(padded, threads=1), feeds)
    ref = runtime.run(runtime.create_session(model, threads=1), feeds)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}


def test_prune_resnet_macs_ratio() -> None:
    model = exported_model("resnet")
    pruned = prune(model, ratio=0.5)
    before, after = sum(model_macs(model).values()), sum(model_macs(pruned).values())
    assert 0.25 <= after / before <= 0.35
