"""Ratio 0.5 on the architectures shipped with onnx (opset 9, weights from ConstantOfShape)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimgraph import ir as sg_ir
from slimgraph import runtime
from slimgraph.api.prune import prune, prune_with_report
from slimgraph.errors import UnsupportedModelError
from tests.kit.asserts import check_valid


@pytest.mark.slow
def test_prune_zoo_half_ratio(zoo_path: Path) -> None:
    model = sg_ir.load(zoo_path)
    pad = "shufflenet" in zoo_path.name
    if pad:  # every group meets a channel shuffle: only pad mode can prune the head
        with pytest.raises(UnsupportedModelError, match="nothing to prune: .*channel shuffle"):
            prune(model, ratio=0.5)
    pruned, report = prune_with_report(model, ratio=0.5, pad=pad)
    check_valid(pruned)
    assert report.params_after < 0.85 * report.params_before
    # the light zoo builds its weights with ConstantOfShape: the pruned file stores them
    stored = sg_ir.analysis.parameter_count(model, constant_nodes=True)
    assert stored < report.params_after
    assert (
        f"note: the result stores {report.params_after:,} parameters, the input {stored:,}: the "
        "input builds weights at run time (ConstantOfShape, Expand, ...), the result stores them "
        "as folded constants"
    ) in report.notes
    if not pad:
        assert report.macs_after < 0.75 * report.macs_before
    feeds = runtime.random_feeds(model)
    got = runtime.run(runtime.create_session(pruned, threads=1), feeds)
    assert [got[v.name].shape for v in pruned.graph.outputs] == [
        tuple(v.shape) for v in model.graph.outputs
    ]
