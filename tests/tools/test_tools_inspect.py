"""`slimgraph inspect`: values checked against onnx's own view of the file and MAC formulas."""

from __future__ import annotations

import copy
import math
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper, shape_inference

from slimgraph import ir as sg_ir
from slimgraph.ir.summary import TOP_LAYERS, summarize
from tests import models as test_models
from tests.kit.data import DIGITS, zoo
from tests.kit.exports import exported_model
from tests.kit.files import save_ir, save_proto
from tests.kit.graphs import single_op_model


def onnx_parameters(proto: onnx.ModelProto) -> int:
    """Elements of all numeric initializers, counted with numpy from onnx's own parse."""
    total = 0
    for tensor in proto.graph.initializer:
        if tensor.data_type != onnx.TensorProto.STRING:
            total += numpy_helper.to_array(tensor).size
    return total


def onnx_macs(proto: onnx.ModelProto, dims: dict[str, int] | None = None) -> int:
    """MACs of Conv/Gemm/MatMul from onnx shape inference, counted independently of slimgraph."""
    dims = dims or {}
    proto = copy.deepcopy(proto)
    graph = proto.graph
    for value in (*graph.input, *graph.value_info, *graph.output):  # same name, same value
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = dims.get(dim.dim_param, 1)
    graph = shape_inference.infer_shapes(proto, data_prop=True).graph
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*graph.input, *graph.value_info, *graph.output)
    }
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    total = 0
    for node in graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "Conv":  # output elements x (C_in / group) x kernel
            total += math.prod(shapes[node.output[0]]) * math.prod(shapes[node.input[1]][1:])
        elif node.op_type == "ConvTranspose":  # input elements x (C_out / group) x kernel
            total += math.prod(shapes[node.input[0]]) * math.prod(shapes[node.input[1]][1:])
        elif node.op_type == "Gemm":
            a, b = shapes[node.input[0]], shapes[node.input[1]]
            m, k = (a[1], a[0]) if attrs.get("transA") else (a[0], a[1])
            total += m * k * (b[0] if attrs.get("transB") else b[1])
        elif node.op_type == "MatMul":
            total += math.prod(shapes[node.output[0]]) * shapes[node.input[0]][-1]
    return total


def check_against_onnx(data: dict, path: Path) -> None:
    proto = onnx.load(path, load_external_data=False)
    assert data["nodes"] == len(proto.graph.node)
    assert data["ops"] == dict(Counter(node.op_type for node in proto.graph.node))
    assert list(data["ops"].values()) == sorted(data["ops"].values(), reverse=True)
    assert data["opset"] == {entry.domain: entry.version for entry in proto.opset_import}
    assert data["ir_version"] == proto.ir_version
    initializer_names = {t.name for t in proto.graph.initializer}
    real_inputs = [v for v in proto.graph.input if v.name not in initializer_names]
    assert [i["name"] for i in data["inputs"]] == [v.name for v in real_inputs]
    assert [o["name"] for o in data["outputs"]] == [v.name for v in proto.graph.output]
    for spec, value in zip(data["inputs"], real_inputs, strict=True):
        dims = value.type.tensor_type.shape.dim
        expected = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
        assert spec["shape"] == expected
        elem = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        assert spec["dtype"] == elem.name


def test_inspect_digits_json_matches_onnx(cli) -> None:
    result = cli("inspect", DIGITS, "--json")
    assert result.code == 0 and result.err == ""
    data = result.json()
    proto = onnx.load(DIGITS)
    check_against_onnx(data, DIGITS)
    assert data["parameters"] == onnx_parameters(proto) == 112_682
    assert data["size_bytes"] == DIGITS.stat().st_size
    assert data["macs"] == onnx_macs(proto) and data["macs_unknown"] == 0
    assert data["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
    assert data["outputs"] == [{"name": "linear", "dtype": "float32", "shape": ["batch", 10]}]
    # Initializer bytes by dtype add up to the numpy byte sizes.
    by_dtype = Counter()
    for tensor in proto.graph.initializer:
        by_dtype[numpy_helper.to_array(tensor).dtype.name] += numpy_helper.to_array(tensor).nbytes
    assert {g["dtype"]: g["bytes"] for g in data["initializer_bytes"]} == dict(by_dtype)
    # Layers carry the torch module names; the four 3x3 64->64 convs on 4x4 maps lead.
    top = data["top_layers"]
    assert [layer["layer"] for layer in top[:4]] == sorted(
        ["block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2"]
    )
    assert top[0]["macs"] == 64 * 4 * 4 * 64 * 3 * 3
    assert sum(layer["macs"] for layer in top) == data["macs"]  # 7 layers, all listed


def test_inspect_digits_text_table(cli) -> None:
    result = cli("inspect", DIGITS)
    assert result.code == 0
    text = result.out
    assert "parameters  112,682 (113 K)" in text
    assert f"size        {DIGITS.stat().st_size:,} bytes" in text
    assert "  image  float32  [batch, 1, 8, 8]" in text
    ops = Counter(node.op_type for node in onnx.load(DIGITS).graph.node)
    for op, count in ops.items():
        assert any(line.split() == [op, str(count)] for line in text.splitlines()), op
    assert "  block1.conv1  Conv  589,824  22.1%" in text


def test_inspect_dim_scales_macs(cli) -> None:
    one = cli("inspect", DIGITS, "--json").json()["macs"]
    eight = cli("inspect", DIGITS, "--json", "--dim", "batch=8").json()
    assert eight["macs"] == 8 * one
    assert eight["dims"] == {"batch": 8}


# Single-op models: (op, input shape, weight shape, attributes, expected MACs by formula).
SINGLE_OPS = [
    # Conv: N * C_out * H_out * W_out * (C_in / group) * kh * kw
    ("Conv", [2, 8, 10, 10], [16, 8, 3, 3], {}, 2 * 16 * 8 * 8 * 8 * 3 * 3),
    ("Conv", [1, 8, 10, 10], [16, 8, 3, 3], {"pads": [1, 1, 1, 1], "strides": [2, 2]},
     1 * 16 * 5 * 5 * 8 * 9),
    ("Conv", [1, 8, 9, 9], [8, 2, 3, 3], {"group": 4}, 1 * 8 * 7 * 7 * 2 * 9),
    ("Conv", [1, 6, 9, 9], [6, 1, 5, 5], {"group": 6, "dilations": [2, 2]}, 6 * 1 * 1 * 1 * 25),
    # Gemm: M * K * N
    ("Gemm", [4, 32], [32, 10], {}, 4 * 32 * 10),
    ("Gemm", [4, 32], [10, 32], {"transB": 1}, 4 * 32 * 10),
    ("Gemm", [32, 4], [32, 10], {"transA": 1}, 4 * 32 * 10),
    # MatMul: output elements * K (batched and broadcast)
    ("MatMul", [2, 3, 4, 5], [5, 6], {}, 2 * 3 * 4 * 6 * 5),
    ("MatMul", [7, 5], [5, 3], {}, 7 * 3 * 5),
    ("ConvTranspose", [1, 4, 5, 5], [4, 8, 3, 3], {}, 1 * 4 * 5 * 5 * 8 * 9),
]


@pytest.mark.parametrize(
    ("op", "input_shape", "weight_shape", "attrs", "expected"),
    SINGLE_OPS,
    ids=[f"{op}-{i}" for i, (op, *_) in enumerate(SINGLE_OPS)],
)
def test_inspect_single_op_macs(cli, tmp_path, op, input_shape, weight_shape, attrs, expected):
    path = save_proto(single_op_model(op, input_shape, weight_shape, **attrs), tmp_path / "m.onnx")
    data = cli("inspect", path, "--json").json()
    assert data["macs"] == expected
    assert data["macs_unknown"] == 0
    assert data["parameters"] == math.prod(weight_shape)
    assert data["top_layers"] == [
        {"layer": f"the_{op.lower()}", "ops": [op], "macs": expected, "share": 1.0}
    ]


def test_inspect_symbolic_batch_conv(cli, tmp_path) -> None:
    proto = single_op_model("Conv", ["N", 3, 6, 6], [4, 3, 3, 3])
    path = save_proto(proto, tmp_path / "conv.onnx")
    per_sample = 4 * 4 * 4 * 3 * 9
    assert cli("inspect", path, "--json").json()["macs"] == per_sample
    assert cli("inspect", path, "--json", "--dim", "N=5").json()["macs"] == 5 * per_sample


def test_inspect_unknown_shape_is_reported_not_guessed(cli, tmp_path) -> None:
    """A MatMul whose input rank is unknown: its MACs are left out and counted as unknown."""
    proto = single_op_model("MatMul", None, [5, 3])
    path = save_proto(proto, tmp_path / "unknown.onnx")
    data = cli("inspect", path, "--json").json()
    assert data["macs"] == 0 and data["macs_unknown"] == 1
    assert data["inputs"][0]["shape"] is None
    assert "1 node(s) with unknown shapes left out" in cli("inspect", path).out


@pytest.mark.parametrize("name", ["squeezenet", "resnet50", "alexnet"])
def test_inspect_zoo_models(cli, name) -> None:
    path = zoo(name)
    data = cli("inspect", path, "--json").json()
    check_against_onnx(data, path)
    proto = onnx.load(path)
    assert data["parameters"] == onnx_parameters(proto)
    assert data["macs"] == onnx_macs(proto)
    assert data["size_bytes"] == path.stat().st_size
    # No torch names here: each node is its own layer, listed by MACs.
    top = data["top_layers"]
    mac_nodes = sum(count for op, count in data["ops"].items() if op in ("Conv", "Gemm", "MatMul"))
    assert len(top) == min(TOP_LAYERS, mac_nodes) == len({layer["layer"] for layer in top})
    macs = [layer["macs"] for layer in top]
    assert macs == sorted(macs, reverse=True)
    assert sum(layer["share"] for layer in top) == pytest.approx(
        sum(layer["macs"] for layer in top) / data["macs"]
    )


def test_inspect_macs_match_published_figures(cli) -> None:
    """ResNet-50 is 4.1 GMACs and VGG-19 19.6 GMACs at 224x224 (He et al.; Simonyan et al.)."""
    resnet = cli("inspect", zoo("resnet50"), "--json").json()["macs"]
    vgg = cli("inspect", zoo("vgg19"), "--json").json()["macs"]
    assert resnet == pytest.approx(4.1e9, rel=0.01)
    assert vgg == pytest.approx(19.6e9, rel=0.01)


@pytest.mark.slow
def test_inspect_every_zoo_model(cli, zoo_path) -> None:
    data = cli("inspect", zoo_path, "--json").json()
    check_against_onnx(data, zoo_path)
    proto = onnx.load(zoo_path)
    assert data["parameters"] == onnx_parameters(proto)
    assert data["macs"] == onnx_macs(proto) > 0
    assert data["macs_unknown"] == 0


@pytest.mark.parametrize("name", ["resnet", "bert"])
def test_inspect_torch_exported(cli, tmp_path, name) -> None:
    path = save_ir(exported_model(name), tmp_path / f"{name}.onnx")
    data = cli("inspect", path, "--json").json()
    check_against_onnx(data, path)
    assert data["parameters"] == onnx_parameters(onnx.load(path))
    assert data["macs"] == onnx_macs(onnx.load(path)) > 0
    # Layer names are module paths of the torch model, not node names.
    modules = dict(test_models.build(name).named_modules())
    assert 0 < len(data["top_layers"]) <= TOP_LAYERS
    for layer in data["top_layers"]:
        assert layer["layer"] in modules, layer


@pytest.mark.slow
def test_inspect_every_torch_model(cli, tmp_path, torch_model_name) -> None:
    path = save_ir(exported_model(torch_model_name), tmp_path / "m.onnx")
    data = cli("inspect", path, "--json").json()
    check_against_onnx(data, path)
    assert data["parameters"] == onnx_parameters(onnx.load(path))
    assert data["macs"] == onnx_macs(onnx.load(path)) > 0


def test_summary_of_in_memory_model_uses_serialized_size() -> None:
    model = sg_ir.load(DIGITS)
    from_file = summarize(model, DIGITS)
    in_memory = summarize(model)
    assert from_file.size_bytes == DIGITS.stat().st_size
    proto_size = len(onnx.load(DIGITS).SerializeToString())
    assert in_memory.size_bytes == proto_size
    assert in_memory.path is None and in_memory.parameters == from_file.parameters


# ---------------------------------------------------------------- external data: no weight read

HOOK = textwrap.dedent(
    """
    import os, sys
    DATA = os.path.realpath(sys.argv[1])

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            if os.path.realpath(os.fsdecode(args[0])) == DATA:
                os.write(2, b"weights opened\\n")
                os._exit(99)
        elif event == "mmap.__new__" and args[0] >= 0:
            try:
                target = os.readlink(f"/proc/self/fd/{args[0]}")
            except OSError:
                return
            if target == DATA:
                os.write(2, b"weights mapped\\n")
                os._exit(99)

    sys.addaudithook(hook)
    from slimgraph.tools.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.fixture(scope="module")
def external_model(tmp_path_factory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("external")
    model = save_ir(sg_ir.load(DIGITS), folder / "digits.onnx", external_data=True)
    data = folder / "digits.onnx.data"
    assert data.stat().st_size > 400_000  # the conv and fc weights live there
    hook = folder / "hook.py"
    hook.write_text(HOOK)
    return model, data, hook


def run_hooked(hook: Path, data: Path, *args: object) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(hook), str(data), *[str(a) for a in args]]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_inspect_reads_no_weight_bytes(external_model) -> None:
    """The required test: inspect answers while any open/mmap of the .data file aborts."""
    import json

    model, data, hook = external_model
    result = run_hooked(hook, data, "inspect", "--json", model)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["parameters"] == 112_682
    assert summary["macs"] == onnx_macs(onnx.load(DIGITS))
    assert summary["size_bytes"] == model.stat().st_size + data.stat().st_size
    assert summary["external_data"] == ["digits.onnx.data"]


def test_diff_reads_no_weight_bytes(external_model) -> None:
    model, data, hook = external_model
    result = run_hooked(hook, data, "diff", model, DIGITS)
    assert result.returncode == 0, result.stderr
    assert "no structural change" in result.stdout


def test_weight_read_hook_fires_when_weights_are_read(external_model) -> None:
    """compare must read the weights: the hook aborts it, so the tests above can fail."""
    model, data, hook = external_model
    result = run_hooked(hook, data, "compare", model, model, "--samples", "1")
    assert result.returncode == 99
    assert "weights opened" in result.stderr or "weights mapped" in result.stderr


def test_inspect_external_weights_in_numpy_are_untouched(external_model) -> None:
    """Sanity of the fixture: the external file holds the real weights (read here on purpose)."""
    model, _, _ = external_model
    proto = onnx.load(model)  # loads external data
    inline = {t.name: numpy_helper.to_array(t) for t in onnx.load(DIGITS).graph.initializer}
    for tensor in proto.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), inline[tensor.name])


def test_inspect_custom_domain_ops(cli, tmp_path) -> None:
    """Ops outside the default domain are keyed domain::Op, and the opset lists the domain."""
    nodes = [
        onnx.helper.make_node("Relu", ["x"], ["r"]),
        onnx.helper.make_node("Gelu", ["r"], ["y"], domain="com.microsoft"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
    )
    opsets = [onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.microsoft", 1)]
    proto = onnx.helper.make_model(graph, opset_imports=opsets)
    data = cli("inspect", save_proto(proto, tmp_path / "ms.onnx"), "--json").json()
    assert data["ops"] == {"Relu": 1, "com.microsoft::Gelu": 1}
    assert data["opset"] == {"": 17, "com.microsoft": 1}
    assert data["parameters"] == 0 and data["macs"] == 0 and data["top_layers"] == []


@pytest.mark.parametrize("form", ["weight-only", "dynamic", "qoperator", "qdq"])
def test_quantized_forms_count_the_macs_of_the_op_they_replace(cli, tmp_path, form) -> None:
    """MatMulNBits, MatMulInteger, QLinearConv, MatMulIntegerToFloat: M x K x N as the float
    op (MatMulNBits once counted 0)."""
    import slimgraph as sg

    flat = DIGITS
    if form == "weight-only":  # a [64, 64] MatMul (the digits CNN's one MatMul is its head)
        flat = save_proto(single_op_model("MatMul", [3, 64], [64, 64]), tmp_path / "mm.onnx")
    model = sg.load(flat)
    if form == "weight-only":
        quantized = sg.quantize(model, mode="weight-only", block_size=32)
    elif form == "dynamic":
        quantized = sg.quantize(model, mode="dynamic")
    else:
        quantized = sg.quantize(model, calibration=DIGITS.with_name("digits_calib.npz"),
                                fmt=form)  # fmt: skip
    ops = {node.op_type for node in quantized.graph}
    assert ops & {"MatMulNBits", "MatMulInteger", "QLinearConv", "MatMul", "Conv"}
    expected = cli("inspect", flat, "--json").json()["macs"]
    data = cli("inspect", save_ir(quantized, tmp_path / "q.onnx"), "--json").json()
    assert expected > 0 and data["macs"] == expected and data["macs_unknown"] == 0


def test_inspect_counts_at_the_export_sizes_and_names_sizes_too_small(cli, tmp_path) -> None:
    """Wav2Vec2's feature convolutions at 1 or 6 samples have negative lengths, and onnx's Slice
    inference aborts the process (a C++ assertion) on such a value: `inspect` counts MACs at the
    export's example sizes unless told otherwise, and a size too small is one line, exit 2."""
    from tests import models_hf

    case, model = models_hf.exported("wav2vec2")
    path = save_ir(model, tmp_path / "wav2vec2.onnx")
    before = path.read_bytes()
    samples = int(case.args[0].shape[1])
    data = cli("inspect", path, "--json").json()
    assert data["dims"] == {"samples": samples}
    assert data["macs"] > 0 and data["macs_unknown"] == 0
    assert cli("inspect", path, "--json", "--dim", f"samples={samples}").json()["macs"] == (
        data["macs"])
    for size in (1, 6):
        result = cli("inspect", path, "--dim", f"samples={size}")
        assert result.code == 2 and result.out == ""
        assert re.fullmatch(
            r"slimgraph inspect: error: symbolic dimension sizes too small for this model "
            rf"\(samples={size}, other symbolic dims 1\): node '[^']+' \(\w+\) would have shape "
            r"\[1, -1\]; give larger sizes with --dim NAME=VALUE\n", result.err), result.err
    assert path.read_bytes() == before
