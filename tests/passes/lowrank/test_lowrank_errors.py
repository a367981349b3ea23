"""Bad options and bad models give one clear error (BadOptionError / UnsupportedModelError)."""

from __future__ import annotations

import numpy as np
import pytest

import slimgraph as sg
from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.passes.lowrank import LowRankLinear, TuckerConv
from tests.kit.graphs import matmul_model


def _model():  # noqa: ANN202
    return matmul_model(np.ones((8, 6), dtype=np.float32), (2, 8))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank_ratio": 0.0}, r"rank_ratio must be in \(0, 1\], got 0.0"),
        ({"rank_ratio": 1.5}, r"rank_ratio must be in \(0, 1\], got 1.5"),
        ({"rank_ratio": float("nan")}, r"rank_ratio must be in \(0, 1\], got nan"),
        ({"energy": -0.1}, r"energy must be in \(0, 1\], got -0.1"),
        ({"energy": 2}, r"energy must be in \(0, 1\], got 2"),
        ({"error_budget": 1.0}, r"error_budget must be in \[0, 1\), got 1.0"),
        ({"rank": 0}, r"rank must be an integer >= 1 or 'auto', got 0"),
        ({"rank": "fast"}, r"rank must be an integer >= 1 or 'auto', got 'fast'"),
        ({}, r"give one of rank_ratio, energy, error_budget or rank \('auto'\)"),
        ({"rank_ratio": 0.5, "energy": 0.9}, r"give only one of rank_ratio, energy"),
        ({"rank_ratio": 0.5, "op_types": ["Relu"]}, r"cannot factorize op type 'Relu'"),
        ({"rank_ratio": 0.5, "include": ["nothing*"]}, r"include pattern 'nothing\*' matches no"),
        ({"rank_ratio": 0.5, "exclude": ["fc9"]}, r"exclude pattern 'fc9' matches no layer"),
    ],
)
def test_bad_options_are_named(options: dict[str, object], message: str) -> None:
    with pytest.raises(BadOptionError, match=message):
        sg.factorize(_model(), **options)  # type: ignore[arg-type]


def test_passes_check_options_too() -> None:
    with pytest.raises(BadOptionError, match=r"energy must be in \(0, 1\]"):
        LowRankLinear(energy=0)
    with pytest.raises(BadOptionError, match="matches no layer or node"):
        TuckerConv(rank_ratio=0.5, include="conv*")(_model())


def test_included_layer_with_a_runtime_weight_is_an_error() -> None:
    model = _model()
    weight = model.graph.initializers.pop("W")
    weight.const_value = None
    model.graph.inputs.append(weight)
    skipped = sg.factorize_with_report(model, rank_ratio=0.5)[1]
    assert [s.reason for s in skipped.skipped] == ["weight 'W' is not a constant"]
    with pytest.raises(UnsupportedModelError, match=r"layer 'mm' \(MatMul\) was included"):
        sg.factorize(model, rank_ratio=0.5, include=["mm"])


def test_weight_listed_as_a_graph_input_is_not_treated_as_constant() -> None:
    model = _model()
    model.graph.inputs.append(model.graph.initializers["W"])  # overridable at run time
    _, report = sg.factorize_with_report(model, rank_ratio=0.2, fold=False)
    assert not report.layers
    assert "also a graph input" in report.skipped[0].reason



def test_a_rule_that_splits_no_layer_exits_2_instead_of_writing_a_copy(tmp_path, capsys) -> None:
    """Rank ratio 0.95 of an 8x6 weight: the factors would hold more than the weight, every
    layer stays whole; the command says so and writes nothing (the Python call returns the
    report with the reasons, as above)."""
    from slimgraph.tools.cli import main

    source, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    sg.save(_model(), source)
    assert main(["factorize", str(source), "-o", str(out), "--rank-ratio", "0.95",
                 "--no-speed-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimgraph factorize: error: nothing to factorize: no layer gets "
                          "smaller under this rank rule (")
    assert err.endswith("); nothing written") and "\n" not in err
    assert not out.exists()
