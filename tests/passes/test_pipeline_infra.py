"""The pipeline: registry, steps from data and recipes, records, verification, optimize + CLI."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import slimgraph as sg
from slimgraph.errors import BadOptionError, UnsupportedModelError, VerificationError
from slimgraph.passes import PASSES, lossless, run_pipeline
from slimgraph.passes.base import SlimgraphPass
from slimgraph.passes.pipeline import build_pipeline, load_recipe, register_pass
from slimgraph.tools.cli import main
from tests.kit.asserts import assert_same_outputs
from tests.kit.graphs import initializer, make_model, ops

RNG = np.random.default_rng(2)


def conv_bn_model() -> ir.Model:
    c = 4
    return make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"]),
            helper.make_node("Relu", ["n"], ["r"]),
            helper.make_node("Dropout", ["r"], ["y"]),
        ],
        [("x", [1, 3, 8, 8])],
        ["y"],
        [
            initializer("w", RNG.standard_normal((c, 3, 3, 3)).astype(np.float32)),
            initializer("g", RNG.uniform(0.5, 1.5, c).astype(np.float32)),
            initializer("b", RNG.standard_normal(c).astype(np.float32)),
            initializer("m", RNG.standard_normal(c).astype(np.float32)),
            initializer("v", RNG.uniform(0.5, 1.5, c).astype(np.float32)),
        ],
    )


class _ScaleFirstWeight(SlimgraphPass):
    """Deliberately wrong: multiplies the first Conv weight by `factor`."""

    exact: ClassVar[bool] = True

    def __init__(self, *, factor: float = 1.01) -> None:
        super().__init__()
        self.factor = factor

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        conv = next(n for n in model.graph if n.op_type == "Conv")
        weight = conv.inputs[1]
        array = weight.const_value.numpy() * np.float32(self.factor)
        new = ir.Value(name=f"{weight.name}_scaled", const_value=ir.tensor(array))
        model.graph.register_initializer(new)
        conv.replace_input_with(1, new)
        return ir.passes.PassResult(model, True)


class _ApproxScale(_ScaleFirstWeight):
    exact: ClassVar[bool] = False


@pytest.fixture
def wrong_passes() -> Iterator[None]:
    register_pass("test-scale-weight")(_ScaleFirstWeight)
    register_pass("test-approx-scale")(_ApproxScale)
    yield
    del PASSES["test-scale-weight"], PASSES["test-approx-scale"]


def test_lossless_records_every_pass_and_leaves_the_input_alone() -> None:
    model = conv_bn_model()
    result = lossless(model)
    assert ops(model)["BatchNormalization"] == 1  # input untouched
    assert ops(result.model) == {"Conv": 1, "Relu": 1}
    names = [r.name for r in result.records]
    assert names[0] == "cleanup" and "fuse-batchnorm" in names
    bn = next(r for r in result.records if r.name == "fuse-batchnorm")
    assert bn.modified and bn.exact and (bn.nodes_before, bn.nodes_after) == (3, 2)
    assert bn.fidelity is not None and bn.fidelity.worst_cosine > 0.999999
    assert result.fidelity is not None and result.fidelity.worst_cosine > 0.999999
    unchanged = next(r for r in result.records if r.name == "fuse-pad")
    assert not unchanged.modified and unchanged.fidelity is None  # nothing to verify
    conv = next(n for n in result.model.graph if n.op_type == "Conv")
    assert conv.metadata_props[sg.ir.metadata.UNIT] == "conv"
    assert_same_outputs(model, result.model)


def test_a_wrong_exact_rewrite_is_caught_with_the_pass_name(wrong_passes: None) -> None:
    model = conv_bn_model()
    message = "exact pass 'test-scale-weight' changed output 'y'"
    with pytest.raises(VerificationError, match=message):
        run_pipeline(model, ["cleanup", "test-scale-weight", "fuse-batchnorm"], verify=True)
    # the same pass without verification goes through: the check is what catches it
    result = run_pipeline(model, ["test-scale-weight"], verify=False)
    assert result.records[0].fidelity is None


def test_an_approximate_pass_reports_fidelity_and_fails_only_below_min_cosine(
    wrong_passes: None,
) -> None:
    model = conv_bn_model()
    result = run_pipeline(model, ["test-approx-scale"], verify=True)
    record = result.records[0]
    assert not record.exact and record.fidelity is not None
    assert record.fidelity.worst_cosine > 0.99 and record.fidelity.outputs[0].max_abs_error > 0
    steps = [{"name": "test-approx-scale", "factor": -1.0, "min_cosine": 0.9}]
    with pytest.raises(VerificationError, match="pass 'test-approx-scale' lowered the output"):
        run_pipeline(model, steps, verify=True)


def test_tolerance_and_user_feeds() -> None:
    model = conv_bn_model()
    feeds = [{"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    result = run_pipeline(model, ["fuse-batchnorm"], verify=True, feeds=feeds)
    fidelity = result.records[0].fidelity
    assert fidelity.samples == 2 and 0 < fidelity.outputs[0].max_abs_error < 1e-4
    # folding rounds differently: a zero tolerance must catch it
    with pytest.raises(VerificationError, match="exceeds rtol 0 / atol 0"):
        run_pipeline(model, ["fuse-batchnorm"], verify=True, feeds=feeds, tolerance=(0, 0))


def test_unknown_names_and_bad_options_list_what_is_known() -> None:
    known = r"unknown pass 'nope' \(known passes: .*fuse-batchnorm"
    with pytest.raises(BadOptionError, match=known):
        build_pipeline(["cleanup", "nope"])
    with pytest.raises(BadOptionError, match="presets: cleanup-only, int8, lossless"):
        build_pipeline([{"name": "nope"}])
    message = (
        "recipe step 'cleanup': unknown option 'rounds' (did you mean 'max-rounds'?); "
        "it takes: max-rounds, keep-initializer-inputs"
    )
    with pytest.raises(BadOptionError, match=re.escape(message)):
        build_pipeline([{"name": "cleanup", "rounds": 3}])
    with pytest.raises(BadOptionError, match="has no 'name'"):
        build_pipeline([{"max_rounds": 3}])
    with pytest.raises(BadOptionError, match="unknown preset 'fast'"):
        sg.optimize(conv_bn_model(), preset="fast")
    with pytest.raises(BadOptionError, match="opset must be an integer"):
        build_pipeline([{"name": "convert-opset", "opset": 99}])


def test_presets_expand_and_steps_take_options() -> None:
    steps = build_pipeline(["lossless", {"name": "cleanup", "max_rounds": 1}])
    assert steps[0].name == "cleanup" and steps[-1].pass_.max_rounds == 1
    assert all(step.exact for step in steps)


def test_recipes_from_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "recipe.yaml"
    yaml_file.write_text("passes:\n  - cleanup\n  - name: fuse-batchnorm\n")
    assert load_recipe(yaml_file) == ["cleanup", {"name": "fuse-batchnorm"}]
    json_file = tmp_path / "recipe.json"
    json_file.write_text(json.dumps(["lossless"]))
    optimized = sg.optimize(conv_bn_model(), recipe=json_file)
    assert ops(optimized) == {"Conv": 1, "Relu": 1}
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [cleanup\n")
    with pytest.raises(BadOptionError, match="not valid YAML/JSON"):
        load_recipe(bad)
    bad.write_text("passes: 3\n")
    with pytest.raises(BadOptionError, match="expected a non-empty list of steps"):
        load_recipe(bad)
    with pytest.raises(BadOptionError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml")


def save_proto(model: ir.Model, path: Path) -> Path:
    onnx.save(ir.to_proto(model), path)
    return path


def test_cli_optimize_prints_each_pass_and_writes_the_output(tmp_path: Path, capsys) -> None:
    source = save_proto(conv_bn_model(), tmp_path / "in.onnx")
    before = source.read_bytes()
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(source), "-o", str(out), "--preset", "lossless"]) == 0
    text = capsys.readouterr().out
    assert "fuse-batchnorm" in text and "exact" in text and "3 -> 2" in text
    assert "nodes 4 -> 2" in text and f"wrote {out}" in text
    assert source.read_bytes() == before
    assert_same_outputs(sg.load(source), sg.load(out))
    assert main(["optimize", str(source), "-o", str(out), "--json", "--no-verify"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["nodes_before"] == 4 and data["nodes_after"] == 2 and not data["verified"]
    assert {p["name"] for p in data["passes"]} >= {"cleanup", "fuse-batchnorm", "mark-units"}


def test_cli_errors_exit_codes_and_no_partial_output(
    tmp_path: Path, capsys, wrong_passes: None
) -> None:
    source = save_proto(conv_bn_model(), tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(source), "-o", str(out), "--preset", "nope"]) == 2
    error = capsys.readouterr().err
    known = "cleanup-only, int8, lossless, transformer"
    assert f"unknown preset 'nope' (known presets: {known})" in error
    recipe = tmp_path / "wrong.yaml"
    recipe.write_text("- cleanup\n- test-scale-weight\n")
    assert main(["optimize", str(source), "-o", str(out), "--recipe", str(recipe)]) == 1
    assert "exact pass 'test-scale-weight' changed output" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".slimgraph-*"))
    recipe.write_text("- cleanup\n- bogus\n")
    assert main(["optimize", str(source), "-o", str(out), "--recipe", str(recipe)]) == 2
    assert "unknown pass 'bogus'" in capsys.readouterr().err
    assert main(["optimize", str(source), "-o", str(source)]) == 2


def test_opset_is_kept_unless_asked_and_conversion_is_verified(tmp_path: Path) -> None:
    model = conv_bn_model()  # opset 17
    kept = sg.optimize(model)
    assert kept.opset_imports[""] == 17
    converted = sg.optimize(model, opset=21)
    assert converted.opset_imports[""] == 21
    assert_same_outputs(model, converted)
    with pytest.raises(UnsupportedModelError, match="cannot convert opset 17 to 11: .*Batch"):
        sg.optimize(model, opset=11)  # onnx has no BatchNormalization down-adapter


class _RenameOutput(ir.passes.InPlacePass):  # a foreign pass: no SlimgraphPass output guard
    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model.graph.outputs[0].name = "renamed"
        return ir.passes.PassResult(model, True)


def test_a_pass_renaming_outputs_is_caught() -> None:
    register_pass("test-rename")(_RenameOutput)
    try:
        message = "pass 'test-rename' changed the model's output"
        with pytest.raises(VerificationError, match=message):
            run_pipeline(conv_bn_model(), ["test-rename"], verify=True)
    finally:
        del PASSES["test-rename"]


class _Crash(SlimgraphPass):
    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise KeyError("boom")


def test_a_crashing_pass_is_named(tmp_path: Path, capsys) -> None:
    register_pass("test-crash")(_Crash)
    try:
        with pytest.raises(ir.passes.PassError, match="pass 'test-crash' failed: KeyError"):
            run_pipeline(conv_bn_model(), ["cleanup", "test-crash"])
        source = save_proto(conv_bn_model(), tmp_path / "in.onnx")
        recipe = tmp_path / "crash.json"
        recipe.write_text('["test-crash"]')
        out = tmp_path / "out.onnx"
        assert main(["optimize", str(source), "-o", str(out), "--recipe", str(recipe)]) == 1
        assert "pass 'test-crash' failed" in capsys.readouterr().err
        assert not out.exists()
    finally:
        del PASSES["test-crash"]


def test_an_input_model_onnxruntime_cannot_run_is_a_clear_input_error() -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])], [("x", [2, 3])], ["y"]
    )
    next(iter(model.graph)).domain = "com.example"
    model.opset_imports["com.example"] = 1
    with pytest.raises(UnsupportedModelError, match="the input model does not run on onnxruntime"):
        lossless(model)
    assert ops(lossless(model, verify=False).model) == {"Relu": 1}


def test_cli_verifies_on_user_data_with_the_bundled_model(tmp_path: Path, capsys) -> None:
    data_dir = Path(sg.__file__).parent / "data"
    out = tmp_path / "digits.onnx"
    args = ["optimize", str(data_dir / "digits_cnn.onnx"), "-o", str(out), "--json"]
    assert main([*args, "--data", str(data_dir / "digits_calib.npz")]) == 0
    report = json.loads(capsys.readouterr().out)
    fidelity = report["fidelity"]
    assert (fidelity["samples"], fidelity["batches"]) == (32, 4)  # 4 batches of 8 images
    assert report["nodes_after"] < report["nodes_before"]
    # a labels key is never fed to the model (issue 14): verification runs on the images
    assert main([*args, "--data", str(data_dir / "digits_test.npz")]) == 0
    assert json.loads(capsys.readouterr().out)["fidelity"]["samples"] == 32


class _NeedsCalibration(_ScaleFirstWeight):
    exact: ClassVar[bool] = False

    def __init__(self, *, calibration=None, factor: float = 1.0) -> None:
        super().__init__(factor=factor)
        self.calibration = calibration


def test_run_time_context_reaches_passes_that_take_it() -> None:
    register_pass("test-calibrated")(_NeedsCalibration)
    try:
        data = {"x": np.zeros((2, 3, 8, 8), np.float32)}
        steps = build_pipeline(["cleanup", "test-calibrated"], context={"calibration": data})
        assert steps[-1].pass_.calibration is data  # cleanup does not take it: not given
        own = build_pipeline(
            [{"name": "test-calibrated", "calibration": "mine"}], context={"calibration": data}
        )
        assert own[0].pass_.calibration == "mine"
        model = sg.optimize(conv_bn_model(), recipe=["test-calibrated"], calibration=data)
        assert ops(model)["Conv"] == 1
    finally:
        del PASSES["test-calibrated"]


def test_optimize_is_functional() -> None:
    model = conv_bn_model()
    before = ir.to_proto(model).SerializeToString()
    optimized = sg.optimize(model, opset=21)
    assert ir.to_proto(model).SerializeToString() == before
    assert optimized is not model and ops(optimized) == {"Conv": 1, "Relu": 1}


def test_opset_conversion_keeps_layer_names() -> None:
    # onnx's version converter drops node metadata; exclusions by layer rely on it.
    from tests.kit.exports import exported_model

    model = exported_model("resnet")
    layers = {n.name: n.metadata_props.get(sg.ir.metadata.LAYER) for n in model.graph}
    assert sum(1 for layer in layers.values() if layer) > 10
    opset = model.opset_imports[""]
    result = run_pipeline(model, [{"name": "convert-opset", "opset": opset + 1}], verify=True)
    converted = result.model
    assert converted.opset_imports[""] == opset + 1
    assert {n.name: n.metadata_props.get(sg.ir.metadata.LAYER) for n in converted.graph} == layers
