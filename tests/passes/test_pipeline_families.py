"""Every pass family is reachable from a recipe, and a mixed recipe runs verified end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import slimgraph
from slimgraph import runtime
from slimgraph.passes.pipeline import run_pipeline
from slimgraph.passes.registry import PASSES, ensure_registered
from slimgraph.tools.cli import main
from tests.kit.exports import exported_model


def test_every_family_is_registered() -> None:
    ensure_registered()
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


DATA = Path(slimgraph.__file__).parent / "data"


def test_int8_preset_quantizes_verified_on_calibration_data(tmp_path: Path, capsys) -> None:
    out = tmp_path / "digits.int8.onnx"
    code = main([
        "optimize", str(DATA / "digits_cnn.onnx"), "-o", str(out), "--preset", "int8",
        "--calib", str(DATA / "digits_calib.npz"), "--json",
    ])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    quantize_record = report["passes"][-1]
    assert quantize_record["name"] == "quantize" and quantize_record["exact"] is False
    # verified on the calibration images, not on random noise the ranges were never fit to
    fidelity = quantize_record["fidelity"]
    assert (fidelity["samples"], fidelity["batches"]) == (64, 4)  # 64 rows in batches of 16
    assert min(o["cosine"] for o in fidelity["outputs"]) > 0.999
    test = np.load(DATA / "digits_test.npz")
    fp32 = runtime.run(runtime.create_session(slimgraph.load(DATA / "digits_cnn.onnx")),
                       {"image": test["image"]})
    int8_model = slimgraph.load(out)
    assert {n.op_type for n in int8_model.graph} >= {"QuantizeLinear", "DequantizeLinear"}
    # the same deployable model `slimgraph quantize` writes: no exporter debug props, no marks
    props = {key for node in int8_model.graph for key in node.metadata_props}
    assert not props & {*slimgraph.ir.metadata.EXPORTER_DEBUG_KEYS, slimgraph.ir.metadata.UNIT}
    int8 = runtime.run(runtime.create_session(int8_model), {"image": test["image"]})
    fp32_acc = (next(iter(fp32.values())).argmax(1) == test["labels"]).mean()
    int8_acc = (next(iter(int8.values())).argmax(1) == test["labels"]).mean()
    assert int8_acc >= fp32_acc - 0.003


def test_int8_preset_without_calibration_is_bad_input(tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.onnx"
    code = main(["optimize", str(DATA / "digits_cnn.onnx"), "-o", str(out), "--preset", "int8"])
    assert code == 2
    assert "'quantize' step needs calibration data" in capsys.readouterr().err
    assert not out.exists()


def test_optimize_report_dir(tmp_path: Path, capsys) -> None:
    out, report = tmp_path / "o.onnx", tmp_path / "rep"
    source = str(DATA / "digits_cnn.onnx")
    code = main(["optimize", source, "-o", str(out), "--report", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    data = json.loads((report / "report.json").read_text())
    assert [p["name"] for p in data["passes"]][:2] == ["cleanup", "fuse-pad"]
    assert data["nodes_after"] < data["nodes_before"] and data["output"] == str(out)
    assert (report / "report.txt").read_text().strip() == printed.strip()
    clash = tmp_path / "file"
    clash.write_text("x")
    assert main(["optimize", str(DATA / "digits_cnn.onnx"), "-o", str(tmp_path / "p.onnx"),
                 "--report", str(clash)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "p.onnx").exists()
