"""Every pass family is reachable from a recipe, and a mixed recipe runs verified end to end."""

from __future__ import annotations

import pytest

from slimgraph import runtime
from slimgraph.passes.pipeline import PASSES, _ensure_registered, run_pipeline
from tests.conftest import exported_model


def test_every_family_is_registered() -> None:
    _ensure_registered()
    for name in ("cleanup", "fuse-batchnorm", "prune", "lowrank-linear", "tucker-conv", "fp16",
                 "quantize-dynamic", "quantize-weight-only", "convert-opset"):
        assert name in PASSES, name


def test_recipe_mixing_exact_and_approximate_passes() -> None:
    model = exported_model("resnet")
    feeds = runtime.random_feeds(model, seed=3)
    result = run_pipeline(
        model,
        ["lossless", {"name": "prune", "ratio": 0.5}, {"name": "tucker-conv", "rank_ratio": 0.5}],
        verify=True,
        feeds=feeds,
    )
    names = [record.name for record in result.records]
    assert names[-2:] == ["prune", "tucker-conv"]
    exact = [r for r in result.records if r.exact and r.modified and r.fidelity is not None]
    assert exact and all(r.fidelity.worst_cosine > 0.99999 for r in exact)
    approximate = [r for r in result.records if not r.exact]
    assert all(r.fidelity is not None for r in approximate)
    assert result.model.graph.num_nodes() < model.graph.num_nodes()
    out = runtime.run(runtime.create_session(result.model), feeds)
    assert next(iter(out.values())).shape == (1, 10)


def test_unknown_step_lists_known_names() -> None:
    from slimgraph.errors import BadOptionError

    with pytest.raises(BadOptionError, match="prune"):
        run_pipeline(exported_model("mlp"), ["no-such-pass"])
