"""`slimgraph optimize --preset lossless` on real third-party architectures (the ONNX files that
ship in the onnx package, opset 9) and on the torch models of tests/models.py: outputs unchanged
within the exact tolerance, no BatchNormalization left after a Conv, fewer nodes."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.ir import from_torch
from slimgraph.runtime import create_session, random_feeds, run
from slimgraph.tools.cli import main
from tests import models as test_models
from tests.kit.data import ZOO_FILES
from tests.kit.exports import exported_model

pytestmark = pytest.mark.slow

_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def bn_after_layer(model: ir.Model) -> list[str]:
    """BatchNormalizations that read a Conv/ConvTranspose/Gemm/MatMul output nothing else reads.

    (A BN whose layer output also feeds something else, like DenseNet's Concat, cannot be folded
    without computing the layer twice; fuse-batchnorm reports it as skipped.)
    """
    found = []
    for node in model.graph:
        if node.op_type != "BatchNormalization":
            continue
        value = node.inputs[0]
        source = value.producer()
        alone = len(value.uses()) == 1 and not value.is_graph_output()
        if source is not None and source.op_type in _LAYERS and alone:
            found.append(node.name or "?")
    return found


def check_optimized(source: Path, out: Path, capsys, extra: Sequence[str] = ()) -> dict:
    """Run the CLI, then check the written file independently of the pipeline's own verifier:
    other random inputs, sessions read from the files."""
    args = ["optimize", str(source), "-o", str(out), "--preset", "lossless", "--json", *extra]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    before, after = sg.load(source), sg.load(out)
    assert report["nodes_after"] < report["nodes_before"] == sum(1 for _ in before.graph)
    assert report["nodes_after"] == sum(1 for _ in after.graph)
    assert not bn_after_layer(after)
    # the pipeline's own end-to-end check (input model vs written model, on onnxruntime)
    for output in report["fidelity"]["outputs"]:
        atol = 1e-5 * max(1.0, output["reference_max_abs"])
        assert output["max_abs_error"] <= atol + 1e-4 * output["reference_max_abs"], output
    if out.stat().st_size > 100_000_000:
        return {"before": before, "after": after, "report": report}  # keep the giants bounded
    feeds = random_feeds(before, seed=1)  # independently: not the seed the pipeline used
    expected = run(create_session(source, optimization="disable"), feeds)
    got = run(create_session(out, optimization="disable"), feeds)
    assert expected.keys() == got.keys()
    for name, ref in expected.items():
        atol = 1e-5 * max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=atol, err_msg=name)
    return {"before": before, "after": after, "report": report}


def test_zoo_model_lossless(zoo_path: Path, tmp_path: Path, capsys) -> None:
    result = check_optimized(zoo_path, tmp_path / "out.onnx", capsys)
    before, after = result["before"], result["after"]
    assert after.opset_imports[""] == before.opset_imports[""] == 9
    ops_before = Counter(n.op_type for n in before.graph)
    ops_after = Counter(n.op_type for n in after.graph)
    assert ops_after["Dropout"] == 0
    assert ops_after["Conv"] == ops_before["Conv"]
    # weights built by ConstantOfShape were folded (no BN left above) and stored compactly again:
    # a lossless run never inflates the file (light_resnet50 went from 78 KiB to 97 MiB). Only
    # the inferred shapes and unit annotations may add a little to the smallest files.
    size_before, size_after = zoo_path.stat().st_size, (tmp_path / "out.onnx").stat().st_size
    assert size_after <= 1.25 * size_before + 2048, (size_before, size_after)
    if "resnet50" in zoo_path.name:
        assert size_after <= size_before


def test_torch_model_lossless(torch_model_name: str, tmp_path: Path, capsys) -> None:
    source = tmp_path / "in.onnx"
    model = exported_model(torch_model_name)
    onnx.save(ir.to_proto(model), source)
    result = check_optimized(source, tmp_path / "out.onnx", capsys)
    assert result["after"].opset_imports[""] == model.opset_imports[""]


@pytest.mark.parametrize("name", ["resnet", "mlp"])
def test_torch_export_at_opset_18_kept_and_converted_to_21(
    name: str, tmp_path: Path, capsys
) -> None:
    source = tmp_path / "in.onnx"
    module = test_models.build(name)
    model = from_torch(module, test_models.example_input(name), opset_version=18)
    assert model.opset_imports[""] == 18
    onnx.save(ir.to_proto(model), source)
    kept = check_optimized(source, tmp_path / "kept.onnx", capsys)
    assert kept["after"].opset_imports[""] == 18
    result = check_optimized(source, tmp_path / "out.onnx", capsys, ["--opset", "21"])
    assert result["after"].opset_imports[""] == 21
    assert result["report"]["passes"][0]["name"] == "convert-opset"


def test_zoo_opset_9_converted_to_13(tmp_path: Path, capsys) -> None:
    source = next(p for p in ZOO_FILES if "squeezenet" in p.name)
    result = check_optimized(source, tmp_path / "out.onnx", capsys, ["--opset", "13"])
    assert result["after"].opset_imports[""] == 13


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "inception_v2", "shufflenet"])
def test_zoo_architecture_with_random_weights(name: str) -> None:
    """The zoo files fill every weight with 0.02, so their class scores are all equal and a wrong
    fold could hide. Same architectures with seeded random weights (fan-in scaled; 1-D parameters
    in [0.5, 1.5], valid for BN variances): lossless must still match at the exact tolerance."""
    from slimgraph.passes import lossless, run_pipeline

    source = next(p for p in ZOO_FILES if name in p.name)
    model = run_pipeline(sg.load(source), ["initializer-inputs", "constant-of-shape"]).model
    rng = np.random.default_rng(0)
    for value in model.graph.initializers.values():
        array = value.const_value.numpy()
        if array.dtype != np.float32:
            continue
        if array.ndim == 1:
            new = rng.uniform(0.5, 1.5, array.shape)
        else:
            new = rng.standard_normal(array.shape) / np.sqrt(np.prod(array.shape[1:]))
        value.const_value = ir.tensor(new.astype(np.float32), name=value.name)
    result = lossless(model)  # verified pass by pass
    assert not bn_after_layer(result.model)
    feeds = random_feeds(model, seed=3)
    expected = run(create_session(model, optimization="disable"), feeds)
    got = run(create_session(result.model, optimization="disable"), feeds)
    for output, ref in expected.items():
        assert np.ptp(ref) > 1e-4  # the outputs are not degenerate
        atol = 1e-5 * max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got[output], ref, rtol=1e-4, atol=atol, err_msg=output)
