"""Issue 10, kind 10 at scale: a model over 2 GB made of Linear layers with bias (MatMul + Add)
goes through `quantize --mode weight-only`. Built layer by layer into external data (never
whole in memory), deleted afterwards. Slow: about 2.3 GB written."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import slimgraph as sg
from slimgraph.runtime import create_session, run
from slimgraph.tools.cli import main

pytestmark = pytest.mark.slow

LAYERS, WIDTH = 9, 8192  # 9 x 8192 x 8192 float32 = 2.25 GiB of weights


def _external(
    name: str, shape: list[int], data: Path, offset: int, nbytes: int
) -> onnx.TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def build(folder: Path) -> Path:
    data = folder / "weights.bin"
    rng = np.random.default_rng(0)
    nodes, inits, x, offset = [], [], "x", 0
    with open(data, "wb") as handle:
        for i in range(LAYERS):
            for name, shape in ((f"W{i}", [WIDTH, WIDTH]), (f"B{i}", [WIDTH])):
                if len(shape) == 2:  # written in 512-row slabs: never the whole layer twice
                    for _ in range(0, WIDTH, 512):
                        # uniform, variance 1/WIDTH: a third of the normal draw's time on
                        # 2.25 GiB (the values only need to be random and finite)
                        slab = rng.random((512, WIDTH), dtype=np.float32)
                        slab -= np.float32(0.5)
                        slab *= np.float32(np.sqrt(12 / WIDTH))
                        handle.write(slab.data)  # no copy
                else:
                    handle.write(rng.standard_normal(WIDTH, dtype=np.float32).tobytes())
                nbytes = int(np.prod(shape)) * 4
                inits.append(_external(name, shape, data, offset, nbytes))
                offset += nbytes
            nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"], name=f"fc{i}"),
                      helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"], name=f"bias{i}")]
            x = f"a{i}"
    graph = helper.make_graph(
        nodes, "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", WIDTH])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "big.onnx"
    onnx.save(model, path)
    return path


def test_weight_only_on_a_2gb_stack_of_linear_layers_with_bias(tmp_path: Path) -> None:
    if shutil.disk_usage(tmp_path).free < 8 * 2**30:
        pytest.skip("needs 8 GiB of free disk")
    folder = tmp_path / "big"
    folder.mkdir()
    try:
        source = build(folder)
        assert (folder / "weights.bin").stat().st_size > 2 * 10**9
        out = folder / "big.int4.onnx"
        assert main(["quantize", str(source), "-o", str(out), "--mode", "weight-only",
                     "--no-verify"]) == 0
        quantized = sg.load(out)
        ops = [node.op_type for node in quantized.graph]
        assert ops.count("MatMulNBits") == LAYERS and "MatMul" not in ops
        written = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("big.int4"))
        assert written < (folder / "weights.bin").stat().st_size / 5
        feeds = {"x": np.random.default_rng(1).standard_normal((2, WIDTH), dtype=np.float32)}
        got = run(create_session(out), feeds)
        assert all(np.isfinite(value).all() for value in got.values())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
