"""The safe loader on hostile and broken files: right error class, a message naming the file and
the tensor or node, nothing read from the attack target, nothing written."""

from __future__ import annotations

import builtins
import io
import os
import re
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from slimgraph.errors import BadInputError, InvalidModelError, ModelLoadError, UnsafeModelError
from slimgraph.ir import load
from slimgraph.runtime import create_session, run
from tests.kit import protos
from tests.kit.data import ZOO_DIR
from tests.kit.files import folder_state, write

REAL_MODELS = [
    ZOO_DIR / "light_squeezenet.onnx",
    Path(__file__).resolve().parents[2] / "slimgraph" / "data" / "digits_cnn.onnx",
]


def load_bounded(path: Path, timeout: float = 20.0):
    """load() in a thread: a loader that opened a FIFO or /dev/zero would hang, not fail."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["model"] = load(path)
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"load({path}) hung: it must not open the data file"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["model"]


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path opened through open()/io.open()/os.open() while the test runs."""
    paths: list[str] = []
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def spy(real):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                paths.append(os.path.abspath(os.fsdecode(file)))
            return real(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", spy(real_open))
    monkeypatch.setattr(io, "open", spy(real_io_open))
    monkeypatch.setattr(os, "open", spy(real_os_open))
    return paths


# ---------------------------------------------------------------- external-data attacks

# name -> (location, offset, length, setup(folder, outside_dir), message fragment)
ATTACKS = {
    "traversal": ("../secret.bin", None, None, None, r"'\.\.' is not allowed"),
    "nested_traversal": ("sub/../../secret.bin", None, None, None, r"'\.\.' is not allowed"),
    "absolute": ("ABS", None, None, None, "absolute paths are not allowed"),
    "backslash": ("..\\secret.bin", None, None, None, "backslashes and NUL are not allowed"),
    "symlink_inside": (
        "link.bin", None, None,
        lambda f, o: os.symlink("w.bin", f / "link.bin"),
        "'link.bin' is a symlink",
    ),
    "symlink_outside": (
        "link.bin", None, None,
        lambda f, o: os.symlink(o / "secret.bin", f / "link.bin"),
        "'link.bin' is a symlink",
    ),
    "symlink_folder": (
        "sub/secret.bin", None, None,
        lambda f, o: os.symlink(o, f / "sub"),
        "'sub' is a symlink",
    ),
    "symlink_dev_zero": (
        "zero.bin", None, None,
        lambda f, o: os.symlink("/dev/zero", f / "zero.bin"),
        "'zero.bin' is a symlink",
    ),
    "hardlink_outside": (
        "hard.bin", None, None,
        lambda f, o: os.link(o / "secret.bin", f / "hard.bin"),
        "hardlinked files are not allowed",
    ),
    "hardlink_inside": (
        "hard.bin", None, None,
        lambda f, o: os.link(f / "w.bin", f / "hard.bin"),
        "hardlinked files are not allowed",
    ),
    "fifo": (
        "fifo.bin", None, None,
        lambda f, o: os.mkfifo(f / "fifo.bin"),
        "not a regular file",
    ),
    "folder": ("subdir", None, None, lambda f, o: (f / "subdir").mkdir(), "not a regular file"),
    "missing_file": ("nothere.bin", None, None, None, "the file does not exist"),
    "past_end": ("w.bin", "8", "24", None, r"offset 8 \+ length 24 is past the end of the file"),
    "offset_past_end": ("w.bin", "100", None, None, "past the end of the file"),
    "length_mismatch": (
        "big.bin", None, "48", None, r"length 48 does not match its shape \[2, 3\] \(24 bytes\)"
    ),
    "implicit_length_mismatch": ("big.bin", None, None, None, "length 48 does not match"),
    "no_location": (None, None, None, None, "has external data without a location"),
    "negative_offset": ("w.bin", "-4", None, None, "offset -4 is negative"),
    "text_offset": ("w.bin", "abc", None, None, "offset 'abc' is not an integer"),
    "float_offset": ("w.bin", "1.5", None, None, "offset '1.5' is not an integer"),
    "negative_length": ("w.bin", None, "-24", None, "length -24 is negative"),
}

# name -> (model builder, how the message names the tensor)
PLACEMENTS = {
    "initializer": (protos.add_model, "initializer 'w'"),
    "constant": (protos.constant_model, r"node 'const0' \(Constant\) attribute 'value'"),
    "if_branch": (protos.if_model, r"initializer 'w' in subgraph of node 'if0' \(If\)"),
    "loop_body": (protos.loop_model, r"initializer 'w' in subgraph of node 'loop0' \(Loop\)"),
    "function": (
        protos.function_model,
        r"node 'fconst' \(Constant\) in function 'AddConst' attribute 'value'",
    ),
}


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """(model folder with w.bin and big.bin, the folder above it with secret.bin)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(protos.W.tobytes())
    (folder / "w.bin").write_bytes(protos.W.tobytes())
    (folder / "big.bin").write_bytes(np.zeros(12, np.float32).tobytes())
    return folder, tmp_path


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_external_data_attack_is_refused(
    folders: tuple[Path, Path], opened: list[str], attack: str, placement: str
) -> None:
    folder, outside = folders
    location, offset, length, setup, message = ATTACKS[attack]
    if location == "ABS":
        location = str(outside / "secret.bin")
    if setup is not None:
        setup(folder, outside)
    builder, where = PLACEMENTS[placement]
    path = write(folder, builder(protos.external_tensor("w", location, offset, length)))
    before = folder_state(outside)
    opened.clear()
    with pytest.raises(UnsafeModelError, match=f"^{re.escape(str(path))}: {where}.*{message}"):
        load_bounded(path)
    assert opened == [str(path)], "only the model file may be opened"
    assert folder_state(outside) == before


def test_unsafe_model_error_is_bad_input_exit_2() -> None:
    for error in (UnsafeModelError, InvalidModelError, ModelLoadError):
        assert issubclass(error, BadInputError)
        assert error("x").exit_code == 2


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_valid_external_data_loads_lazily_and_runs(
    folders: tuple[Path, Path], opened: list[str], placement: str
) -> None:
    folder, _ = folders
    junk = b"\x00" * 8
    (folder / "sub").mkdir()
    (folder / "sub" / "packed.bin").write_bytes(junk + protos.W.tobytes() + junk)
    builder, _ = PLACEMENTS[placement]
    path = write(folder, builder(protos.external_tensor("w", "sub/packed.bin", "8", "24")))
    opened.clear()
    model = load(path)
    assert opened == [str(path)], "loading must read no weight bytes"
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    feeds = {"x": x}
    if placement == "if_branch":
        feeds["cond"] = np.array(True)
    expected = x + protos.W * (2 if placement == "loop_body" else 1)
    got = run(create_session(model), feeds)["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# ---------------------------------------------------------------- broken files


def test_missing_empty_folder_and_text_files(tmp_path: Path) -> None:
    missing = re.escape(str(tmp_path / "no.onnx"))
    with pytest.raises(ModelLoadError, match=f"^{missing}: no such file"):
        load(tmp_path / "no.onnx")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match=f"^{re.escape(str(empty))}: empty file"):
        load(empty)
    with pytest.raises(ModelLoadError, match="not a regular file"):
        load(tmp_path)
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\nir_version: 8\n")
    with pytest.raises(ModelLoadError, match=f"^{re.escape(str(text))}: not a"):
        load(text)


@pytest.mark.parametrize("real", REAL_MODELS, ids=lambda p: p.stem)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_truncated_real_model(tmp_path: Path, real: Path, data: st.DataObject) -> None:
    content = real.read_bytes()
    cut = data.draw(st.integers(0, len(content) - 1), label="cut")
    path = tmp_path / "cut.onnx"
    path.write_bytes(content[:cut])
    with pytest.raises(ModelLoadError, match=re.escape(str(path))):
        load(path)
    assert path.read_bytes() == content[:cut]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(blob=st.binary(min_size=1, max_size=512), as_graph=st.booleans())
def test_random_bytes(tmp_path: Path, blob: bytes, as_graph: bool) -> None:
    """Random bytes, or random bytes inside a well-formed ir_version + graph field envelope."""
    if as_graph:
        envelope = onnx.ModelProto(ir_version=8)
        envelope.opset_import.add(version=18)
        head = envelope.SerializeToString()
        blob = head + b"\x3a" + _varint(len(blob)) + blob
    path = tmp_path / "random.onnx"
    path.write_bytes(blob)
    try:
        load(path)
    except ModelLoadError as error:
        assert str(error).startswith(str(path))
    # a random graph can be valid (e.g. empty); then it must simply have loaded


_MUTATION_SOURCES = [
    REAL_MODELS[0].read_bytes(),
    protos.function_model(numpy_helper.from_array(protos.W, "w")).SerializeToString(),
    protos.if_model(numpy_helper.from_array(protos.W, "w")).SerializeToString(),
]


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    source=st.sampled_from(range(len(_MUTATION_SOURCES))),
    edits=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4
    ),
)
def test_corrupted_bytes(tmp_path: Path, source: int, edits: list[tuple[float, int]]) -> None:
    """A few bytes of a valid model overwritten (names turned into invalid UTF-8, lengths and
    tags broken): loading succeeds or fails with ModelLoadError, never another exception."""
    data = bytearray(_MUTATION_SOURCES[source])
    for where, byte in edits:
        data[int(where * len(data))] = byte
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(bytes(data))
    try:
        load(path)
    except ModelLoadError as error:
        assert str(error).startswith(str(path))


@pytest.mark.parametrize("name", [b"fconst", b"AddConst", b"fx"])
def test_invalid_utf8_names(tmp_path: Path, name: bytes) -> None:
    data = protos.function_model(numpy_helper.from_array(protos.W, "w")).SerializeToString()
    assert name in data
    path = tmp_path / "utf8.onnx"
    path.write_bytes(data.replace(name, b"\xff\xfe" + name[2:]))
    with pytest.raises(ModelLoadError, match="is not valid UTF-8"):
        load(path)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# ---------------------------------------------------------------- invalid graphs


def _node(op: str, inputs: list[str], outputs: list[str], name: str, **kwargs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, name=name, **kwargs)


INVALID = {
    "cycle": (
        protos.graph_model(
            [
                _node("Add", ["x", "d"], ["c"], "a"),
                _node("Relu", ["c"], ["d"], "b"),
                _node("Identity", ["d"], ["y"], "out"),
            ]
        ),
        r"graph: the graph has a cycle through node '(a|b)'",
    ),
    "self_loop": (
        protos.graph_model([_node("Add", ["x", "y"], ["y"], "a")]),
        r"cycle through node 'a' \(Add\)",
    ),
    "dangling_input": (
        protos.graph_model([_node("Add", ["x", "ghost"], ["y"], "add0")]),
        r"node 'add0' \(Add\) reads 'ghost', which no node, initializer or graph input produces",
    ),
    "two_producers": (
        protos.graph_model([_node("Relu", ["x"], ["y"], "r1"), _node("Neg", ["x"], ["y"], "r2")]),
        r"value name 'y' is defined twice \(node 'r1' \(Relu\) and node 'r2' \(Neg\)\)",
    ),
    "output_is_graph_input": (
        protos.graph_model([_node("Relu", ["x"], ["x"], "r1"), _node("Neg", ["x"], ["y"], "r2")]),
        r"value name 'x' is defined twice \(a graph input and node 'r1' \(Relu\)\)",
    ),
    "unnamed_node_duplicate": (
        protos.graph_model([_node("Relu", ["x"], ["y"], ""), _node("Neg", ["x"], ["y"], "")]),
        r"'y' is defined twice \(node #0 \(Relu\) and node #1 \(Neg\)\)",
    ),
    "output_not_produced": (
        protos.graph_model([_node("Relu", ["x"], ["z"], "r1")]),
        "output 'y' is not produced by any node",
    ),
    "no_opset": (
        protos.graph_model([_node("Relu", ["x"], ["y"], "r1")], opset_imports=[]),
        "the model imports no opset",
    ),
    "opset_999": (
        protos.graph_model(
            [_node("Relu", ["x"], ["y"], "r1")], opset_imports=[helper.make_opsetid("", 999)]
        ),
        "opset 999 of the default domain is unknown",
    ),
    "unimported_domain": (
        protos.graph_model([_node("Foo", ["x"], ["y"], "f0", domain="com.example")]),
        r"node 'f0' \(Foo\) uses domain 'com.example', which the model does not import",
    ),
    "subgraph_dangling": (
        None,  # built below
        r"subgraph of node 'if0' \(If\): node 'then_add' \(Add\) reads 'ghost'",
    ),
    "duplicate_initializer": (
        protos.add_model(numpy_helper.from_array(protos.W, "w")),  # second copy added below
        "initializer name 'w' is used twice",
    ),
    "raw_data_too_short": (
        protos.add_model(
            TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2, 3], raw_data=b"\0" * 20)
        ),
        r"initializer 'w' holds 20 bytes, but its shape \[2, 3\] needs 24",
    ),
    "float_data_too_short": (
        protos.add_model(
            TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2, 3], float_data=[1, 2])
        ),
        r"initializer 'w' holds 2 values, but its shape \[2, 3\] needs 6",
    ),
    "negative_dim": (
        protos.add_model(TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[-1, 3])),
        r"initializer 'w' has a negative dimension \[-1, 3\]",
    ),
    "future_ir_version": (
        protos.graph_model([_node("Relu", ["x"], ["y"], "r1")], ir_version=onnx.IR_VERSION + 5),
        "is newer than this onnx",
    ),
}
INVALID["duplicate_initializer"][0].graph.initializer.append(numpy_helper.from_array(protos.W, "w"))
_sub = protos.if_model(numpy_helper.from_array(protos.W, "w"))
_sub.graph.node[0].attribute[1].g.node[0].input[1] = "ghost"
INVALID["subgraph_dangling"] = (_sub, INVALID["subgraph_dangling"][1])


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_graph(tmp_path: Path, case: str) -> None:
    proto, message = INVALID[case]
    path = write(tmp_path, proto)
    before = folder_state(tmp_path)
    with pytest.raises(InvalidModelError, match=f"^{re.escape(str(path))}: .*{message}"):
        load(path)
    assert folder_state(tmp_path) == before


# ---------------------------------------------------------------- valid corner cases


def _run_both(path: Path, feeds: dict[str, np.ndarray]) -> None:
    """The loaded model and the file itself give the same outputs on onnxruntime."""
    expected = ort.InferenceSession(str(path)).run(None, feeds)
    got = list(run(create_session(load(path)), feeds).values())
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-6)


def test_ir3_initializers_listed_as_inputs(tmp_path: Path) -> None:
    proto = protos.add_model(numpy_helper.from_array(protos.W, "w"), ir_version=3)
    proto.opset_import[0].version = 9
    proto.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3]))
    path = write(tmp_path, proto)
    model = load(path)
    assert model.graph.initializers["w"].is_graph_input()
    _run_both(path, {"x": np.ones((2, 3), np.float32)})


@pytest.mark.parametrize("cond", [True, False])
def test_subgraph_reads_outer_scope(tmp_path: Path, cond: bool) -> None:
    path = write(tmp_path, protos.if_model(numpy_helper.from_array(protos.W, "w")))
    _run_both(path, {"cond": np.array(cond), "x": np.ones((2, 3), np.float32)})


def test_loop_and_function_models(tmp_path: Path) -> None:
    for builder in (protos.loop_model, protos.function_model):
        path = write(tmp_path, builder(numpy_helper.from_array(protos.W, "w")))
        _run_both(path, {"x": np.full((2, 3), 0.5, np.float32)})


def _sparse(name: str) -> onnx.SparseTensorProto:
    values = numpy_helper.from_array(np.array([5.0, -2.0], np.float32), name)
    indices = numpy_helper.from_array(np.array([1, 5], np.int64), name + "_idx")
    return helper.make_sparse_tensor(values, indices, [2, 3])


def test_constant_sparse_value(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            _node("Constant", [], ["c"], "const0", sparse_value=_sparse("c")),
            _node("Add", ["x", "c"], ["y"], "add0"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    path = write(tmp_path, helper.make_model(graph, opset_imports=protos.OPSET, ir_version=10))
    model = load(path)
    dense = model.graph.node(0).attributes["value"].value.numpy()
    np.testing.assert_array_equal(dense, [[0, 5, 0], [0, 0, -2]])
    _run_both(path, {"x": np.ones((2, 3), np.float32)})


def test_sparse_initializer_becomes_dense(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [_node("Add", ["x", "s"], ["y"], "add0")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        sparse_initializer=[_sparse("s")],
    )
    path = write(tmp_path, helper.make_model(graph, opset_imports=protos.OPSET, ir_version=10))
    model = load(path)
    np.testing.assert_array_equal(
        model.graph.initializers["s"].const_value.numpy(), [[0, 5, 0], [0, 0, -2]]
    )
    _run_both(path, {"x": np.ones((2, 3), np.float32)})


def test_sparse_indices_out_of_range(tmp_path: Path) -> None:
    sparse = _sparse("c")
    sparse.indices.CopyFrom(numpy_helper.from_array(np.array([1, 6], np.int64), "c_idx"))
    proto = protos.graph_model(
        [
            _node("Constant", [], ["c"], "const0", sparse_value=sparse),
            _node("Add", ["x", "c"], ["y"], "add0"),
        ]
    )
    path = write(tmp_path, proto)
    with pytest.raises(InvalidModelError, match="sparse tensor 'c' has indices out of range"):
        load(path)


def test_unsorted_graph_is_sorted_on_load(tmp_path: Path) -> None:
    proto = protos.graph_model(
        [_node("Neg", ["a"], ["y"], "second"), _node("Relu", ["x"], ["a"], "first")]
    )
    path = write(tmp_path, proto)
    model = load(path)
    assert [n.name for n in model.graph] == ["first", "second"]
    _run_both(path, {"x": np.full((2, 3), -2.0, np.float32)})
    sorted_proto = protos.graph_model(
        [_node("Relu", ["x"], ["a"], "first"), _node("Neg", ["a"], ["y"], "second")]
    )
    assert [n.name for n in load(write(tmp_path, sorted_proto, "s.onnx")).graph] == [
        "first",
        "second",
    ]


def test_huge_sparse_tensor_is_not_densified(tmp_path: Path) -> None:
    sparse = _sparse("c")
    del sparse.dims[:]
    sparse.dims.extend([1 << 20, 1 << 20])  # 4 TB dense from a few bytes
    sparse.indices.CopyFrom(numpy_helper.from_array(np.array([1, 5], np.int64), "c_idx"))
    proto = protos.graph_model(
        [
            _node("Constant", [], ["c"], "const0", sparse_value=sparse),
            _node("Add", ["x", "c"], ["y"], "add0"),
        ]
    )
    path = write(tmp_path, proto)
    with pytest.raises(InvalidModelError, match=r"sparse tensor 'c' has dims \[1048576, 1048576\]"):
        load(path)
