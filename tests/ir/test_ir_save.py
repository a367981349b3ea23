"""save(): exact round trip, atomic writes, never over the input, external data under our name."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

import slimgraph.ir._save as save_module
from slimgraph.errors import OutputPathError
from slimgraph.ir import load, metadata, save
from slimgraph.runtime import create_session, random_feeds, run
from tests.kit import protos
from tests.kit.data import ZOO_DIR
from tests.kit.exports import exported_model
from tests.kit.files import write

SQUEEZENET = ZOO_DIR / "light_squeezenet.onnx"
DIGITS = Path(__file__).resolve().parents[2] / "slimgraph" / "data" / "digits_cnn.onnx"


def _proto_bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


def _external_locations(path: Path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return locations


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".slimgraph-"))


@pytest.fixture
def external_model(tmp_path: Path) -> Path:
    """A model whose initializer 'w' and Constant value live in weights/w.bin (external data)."""
    big = np.arange(128, dtype=np.float32).reshape(2, 64) / 7
    return protos.external_add_mul(tmp_path / "src", "weights/w.bin", big, big * 3)


def _expected(x: np.ndarray) -> np.ndarray:
    big = np.arange(128, dtype=np.float32).reshape(2, 64) / 7
    return (x + big) * (big * 3)


X = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)


# ---------------------------------------------------------------- round trip


def test_round_trip_zoo_model_is_identical(tmp_path: Path) -> None:
    model = load(SQUEEZENET)
    path = save(model, tmp_path / "squeezenet.onnx")
    assert path == tmp_path / "squeezenet.onnx"
    assert _proto_bytes(load(path)) == _proto_bytes(model)
    assert os.listdir(tmp_path) == ["squeezenet.onnx"]


def test_round_trip_torch_model_keeps_metadata(tmp_path: Path) -> None:
    model = exported_model("resnet")
    model.metadata_props["pkg.slimgraph.test"] = "kept"
    model.doc_string = "a doc string"
    path = save(model, tmp_path / "resnet.onnx")
    loaded = load(path)
    assert _proto_bytes(loaded) == _proto_bytes(model)
    assert loaded.metadata_props["pkg.slimgraph.test"] == "kept"
    layers = [n.metadata_props.get(metadata.LAYER) for n in loaded.graph]
    assert "layer1.0.conv1" in layers


def test_initializer_value_info_that_repeats_the_tensor_is_not_written(tmp_path: Path) -> None:
    from slimgraph.passes.cleanup import StripDebugMetadataPass

    # The exporter's per-weight metadata is not a repetition: strip it first.
    model = StripDebugMetadataPass()(exported_model("resnet")).model
    model.graph.initializers["fc.weight"].metadata_props["note"] = "kept"
    before = _proto_bytes(model)
    proto = onnx.load(save(model, tmp_path / "resnet.onnx"))
    initializers = {tensor.name for tensor in proto.graph.initializer}
    assert {info.name for info in proto.graph.value_info} & initializers == {"fc.weight"}
    assert {value.name for value in proto.graph.input} == {"x"}  # inputs keep their types
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _proto_bytes(model) == before  # the in-memory model still has every type
    loaded = load(tmp_path / "resnet.onnx")  # types come back from the tensors on load
    weight = loaded.graph.initializers["layer1.0.conv1.weight"]
    assert weight.dtype == ir.DataType.FLOAT and weight.shape == weight.const_value.shape
    feeds = random_feeds(model)
    for name, value in run(create_session(model), feeds).items():
        np.testing.assert_array_equal(run(create_session(loaded), feeds)[name], value)


def test_save_does_not_change_the_model(external_model: Path, tmp_path: Path) -> None:
    model = load(external_model)
    before_init = model.graph.initializers["w"].const_value
    before_attr = model.graph.node(0).attributes["value"]
    before = _proto_bytes(model)
    save(model, tmp_path / "a.onnx")
    save(model, tmp_path / "onnx", external_data=True)
    assert model.graph.initializers["w"].const_value is before_init
    assert model.graph.node(0).attributes["value"] is before_attr
    assert isinstance(before_init, ir.ExternalTensor)
    assert _proto_bytes(model) == before


# ---------------------------------------------------------------- atomicity


def _failing_save(model: ir.Model, path: str | os.PathLike, **kwargs: object) -> None:
    """Writes half a model (and half the data file when asked) and then fails."""
    Path(path).write_bytes(b"partial")
    if kwargs.get("external_data"):
        (Path(path).parent / str(kwargs["external_data"])).write_bytes(b"partial data")
    raise RuntimeError("disk full")


@pytest.mark.parametrize("external_data", [False, True])
def test_failed_save_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external_data: bool
) -> None:
    model = load(SQUEEZENET)
    monkeypatch.setattr(ir, "save", _failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save(model, tmp_path / "out.onnx", external_data=external_data)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("external_data", [False, True])
def test_failed_save_keeps_existing_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external_data: bool
) -> None:
    model = load(SQUEEZENET)
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old model")
    (tmp_path / "out.onnx.data").write_bytes(b"old data")
    monkeypatch.setattr(ir, "save", _failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save(model, target, external_data=external_data)
    assert target.read_bytes() == b"old model"
    assert (tmp_path / "out.onnx.data").read_bytes() == b"old data"
    assert _leftovers(tmp_path) == []


def test_missing_folder_and_folder_target(tmp_path: Path) -> None:
    model = load(SQUEEZENET)
    with pytest.raises(OutputPathError, match="the folder '.*nowhere' does not exist"):
        save(model, tmp_path / "nowhere" / "m.onnx")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(OutputPathError, match=r"dir\.onnx: is a folder, not a file"):
        save(model, tmp_path / "dir.onnx")


def test_unwritable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(save_module.tempfile, "mkdtemp", refuse)
    message = r"m\.onnx: cannot write in '.*' \(Permission denied\)"
    with pytest.raises(OutputPathError, match=message):
        save(load(SQUEEZENET), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- never over the input


def test_refuses_to_overwrite_input(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(SQUEEZENET.read_bytes())
    model = load(source)
    os.symlink(source, tmp_path / "link.onnx")
    os.link(source, tmp_path / "hard.onnx")
    for target in (source, tmp_path / "link.onnx", tmp_path / "hard.onnx"):
        with pytest.raises(OutputPathError, match="refusing to write over the model's own input"):
            save(model, target)
    assert source.read_bytes() == SQUEEZENET.read_bytes()
    assert _leftovers(tmp_path) == []


def test_results_of_every_transform_still_refuse_to_overwrite_the_input(tmp_path: Path) -> None:
    # Copies drop onnx_ir's Model.meta, where load records the source: every public transform
    # must carry it, or sg.save(sg.factorize(sg.load(p)), p) would write over p.
    import slimgraph as sg

    source = tmp_path / "model.onnx"
    source.write_bytes(DIGITS.read_bytes())
    model = load(source)
    results = {
        "optimize": sg.optimize(model),
        "quantize static": sg.quantize(model, calibration=random_feeds(model, batch=4)),
        "quantize dynamic": sg.quantize(model),
        "prune": sg.prune(model, ratio=0.25),
        "factorize": sg.factorize(model, rank_ratio=0.5),
        "fp16": sg.convert_fp16(model),
    }
    for name, result in results.items():
        with pytest.raises(OutputPathError, match="refusing to write over the model's own input"):
            save(result, source)
        assert source.read_bytes() == DIGITS.read_bytes(), name


def test_refuses_to_overwrite_input_external_data(external_model: Path) -> None:
    folder = external_model.parent
    data = folder / "weights" / "w.bin"
    before = data.read_bytes()
    model = load(external_model)
    with pytest.raises(OutputPathError, match=re.escape(f"'{data}'")):
        save(model, data)
    # a target whose <name>.data would be the input's data file
    os.replace(data, folder / "m.onnx.data")
    model = load(_relocated(external_model, "m.onnx.data"))
    with pytest.raises(OutputPathError, match=r"m\.onnx\.data: refusing to write over"):
        save(model, folder / "m.onnx", external_data=True)
    assert (folder / "m.onnx.data").read_bytes() == before


def _relocated(path: Path, location: str) -> Path:
    proto = onnx.load(str(path), load_external_data=False)
    tensors = [*proto.graph.initializer, proto.graph.node[0].attribute[0].t]
    for tensor in tensors:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    return write(path.parent, proto, "relocated.onnx")


# ---------------------------------------------------------------- external data


def test_external_data_uses_our_own_name(external_model: Path, tmp_path: Path) -> None:
    model = load(external_model)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    path = save(model, out_dir / "result.onnx", external_data=True)
    assert sorted(os.listdir(out_dir)) == ["result.onnx", "result.onnx.data"]
    assert _external_locations(path) == {"result.onnx.data"}
    assert b"weights/w.bin" not in path.read_bytes()
    loaded = load(path)
    np.testing.assert_array_equal(
        loaded.graph.initializers["w"].const_value.numpy(),
        model.graph.initializers["w"].const_value.numpy(),
    )
    np.testing.assert_allclose(run(create_session(loaded), {"x": X})["y"], _expected(X), rtol=1e-6)


def test_model_with_external_data_resaved_inline_elsewhere(
    external_model: Path, tmp_path: Path
) -> None:
    model = load(external_model)
    out_dir = tmp_path / "inline"
    out_dir.mkdir()
    path = save(model, out_dir / "m.onnx")
    assert os.listdir(out_dir) == ["m.onnx"]
    assert _external_locations(path) == set()
    onnx.checker.check_model(str(path))
    np.testing.assert_allclose(
        run(create_session(load(path)), {"x": X})["y"], _expected(X), rtol=1e-6
    )
    # the source folder can go: the copy stands alone
    (external_model.parent / "weights" / "w.bin").unlink()
    np.testing.assert_allclose(
        run(create_session(load(path)), {"x": X})["y"], _expected(X), rtol=1e-6
    )


def test_large_models_go_to_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = exported_model("convtranspose")
    size = save_module.tensor_bytes(model)
    assert size > 0
    monkeypatch.setattr(save_module, "EXTERNAL_DATA_THRESHOLD", size - 1)
    path = save(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size > 0
    assert _external_locations(path) == {"big.onnx.data"}
    monkeypatch.setattr(save_module, "EXTERNAL_DATA_THRESHOLD", size)
    small = save(model, tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()
    assert _external_locations(small) == set()
    feeds = random_feeds(model)
    for ref, got in zip(
        run(create_session(load(small)), feeds).values(),
        run(create_session(load(path)), feeds).values(),
        strict=True,
    ):
        np.testing.assert_array_equal(got, ref)


def test_tiny_tensors_stay_inline_without_data_file(tmp_path: Path) -> None:
    path = save(load(SQUEEZENET), tmp_path / "m.onnx", external_data=True)
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert _external_locations(path) == set()


def test_external_data_false_overrides_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load(SQUEEZENET)
    monkeypatch.setattr(save_module, "EXTERNAL_DATA_THRESHOLD", 0)
    save(model, tmp_path / "m.onnx", external_data=False)
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_tensor_bytes_counts_subgraph_initializers() -> None:
    proto = protos.if_model(numpy_helper.from_array(protos.W, "w"))
    assert save_module.tensor_bytes(ir.from_proto(proto)) == protos.W.nbytes
