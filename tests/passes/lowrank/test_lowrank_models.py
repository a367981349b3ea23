"""sg.factorize on real architectures: torch exports (BERT-style, ResNet-style) and a zoo file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.ir import analysis, metadata
from slimgraph.passes.lowrank import FactorizeReport
from slimgraph.runtime import create_session, random_feeds, run
from tests.kit.asserts import assert_close
from tests.kit.data import ZOO_DIR
from tests.kit.exports import exported_model


def _check_runs(model: ir.Model) -> None:
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    create_session(model, threads=1)


@pytest.mark.parametrize("name", ["bert", "resnet"])
def test_full_rank_reproduces_the_torch_model(name: str) -> None:
    model = exported_model(name)
    feeds = random_feeds(model, seed=3)
    reference = run(create_session(model, threads=1), feeds)
    full = sg.factorize(model, rank_ratio=1.0, allow_growth=True, pointwise_convs=True)
    report: FactorizeReport = full.meta[metadata.FACTORIZE_REPORT]
    expected = {"bert": 12, "resnet": 21}[name]  # bert: 4 x (q, k, v, out, fc1, fc2) / 2 layers
    assert len(report.layers) == expected
    _check_runs(full)
    got = run(create_session(full, threads=1), feeds)
    for key, value in reference.items():
        assert_close(value, got[key])


def test_bert_feed_forward_at_half_rank() -> None:
    model = exported_model("bert")
    feeds = random_feeds(model, seed=1)
    small, report = sg.factorize_with_report(
        model, rank_ratio=0.5, include=["*fc1", "*fc2"], feeds=feeds
    )
    assert sorted(layer.layer for layer in report.layers) == [
        "layers.0.fc1", "layers.0.fc2", "layers.1.fc1", "layers.1.fc2",
    ]  # fmt: skip
    for layer in report.layers:
        n, m = layer.shape
        assert layer.rank == (32,)
        assert layer.params_after == 32 * (n + m) + 0  # MatMul: the bias is a separate Add
        assert layer.output_sqnr_db is not None and math.isfinite(layer.output_sqnr_db)
    assert report.fidelity is not None and report.fidelity.worst_cosine > 0.5
    saved = sum(layer.params_before - layer.params_after for layer in report.layers)
    assert report.params_before - report.params_after == saved
    assert report.macs_after < report.macs_before
    assert analysis.parameter_count(small) == report.params_after
    _check_runs(small)
    assert report.skipped == ()  # include picked only the feed-forward layers


def test_resnet_3x3_convs_by_tucker() -> None:
    model = exported_model("resnet")
    feeds = random_feeds(model, seed=2)
    small, report = sg.factorize_with_report(
        model, rank_ratio=0.5, op_types=["Conv"], exclude=["conv1"], feeds=feeds
    )
    assert {layer.method for layer in report.layers} == {"tucker2"}
    assert "conv1" not in {layer.layer for layer in report.layers}
    assert len(report.layers) == 16
    pointwise = [s for s in report.skipped if "pointwise" in s.reason]
    assert len(pointwise) == 3  # the downsample 1x1 convs
    assert report.params_after < report.params_before
    assert report.macs_after is not None and report.macs_after < report.macs_before
    assert report.fidelity is not None and report.fidelity.samples == 1
    _check_runs(small)
    assert analysis.parameter_count(small) == report.params_after


@pytest.mark.slow
def test_zoo_shufflenet_folded_then_factorized() -> None:
    """Zoo weights are ConstantOfShape outputs: factorize folds them to initializers first."""
    path = Path(ZOO_DIR) / "light_shufflenet.onnx"
    model = sg.load(path)
    feeds = random_feeds(model, seed=0)
    small, report = sg.factorize_with_report(model, rank_ratio=0.5, feeds=feeds)
    assert report.folded > 0
    methods = {(layer.op_type, layer.method) for layer in report.layers}
    assert ("Gemm", "svd") in methods and ("Conv", "tucker2") in methods
    reasons = {s.reason.split(" (")[0] for s in report.skipped}
    assert {"grouped conv", "depthwise conv"} <= reasons
    _check_runs(small)
    got = run(create_session(small, threads=1), feeds)
    assert set(got) == {value.name for value in model.graph.outputs}
    assert all(np.isfinite(v).all() for v in got.values())
    # the zoo weights are constant tensors (rank 1), so half rank keeps the outputs
    reference = run(create_session(model, threads=1), feeds)
    for key, value in reference.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-3, atol=1e-5)


def test_passes_run_as_pipeline_steps() -> None:
    from slimgraph.passes.pipeline import run_pipeline

    model = exported_model("mlp")
    result = run_pipeline(
        model,
        ["fold-constants", {"name": "lowrank-linear", "rank_ratio": 0.25, "include": "blocks.*"}],
        verify=True,
    )
    record = result.records[-1]
    assert record.name == "lowrank-linear" and record.modified
    assert sum(node.op_type == "MatMul" for node in result.model.graph) == 9


def test_a_model_of_pointwise_and_depthwise_convs_is_told_low_rank_gains_little() -> None:
    """MobileNetV2-style: only the stem and the classifier factorize (1x1 and depthwise convs
    are skipped), so the MACs barely fall and the report says so; a ResNet-style net's do."""
    model = exported_model("mobilenetv2")
    report = sg.factorize(model, rank_ratio=0.5).meta[metadata.FACTORIZE_REPORT]
    ratio = report.macs_after / report.macs_before
    assert 0.95 < ratio < 1 and report.layers
    assert (f"note: MACs fall by {1 - ratio:.1%} only: most of them are in layers left whole "
            "(skipped, below); low rank gains little on this model, channel pruning (prune) "
            "may") in str(report).splitlines()
    assert ("1x1 (pointwise) conv: no spatial core; pointwise=True (--pointwise-convs) splits it "
            "by SVD") in str(report)
    resnet = sg.factorize(exported_model("resnet"), rank_ratio=0.5).meta[
        metadata.FACTORIZE_REPORT]
    assert resnet.macs_after < 0.95 * resnet.macs_before
    assert "gains little" not in str(resnet)
