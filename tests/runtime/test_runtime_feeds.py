"""Feeds: generated from the input spec, or read from .npz and checked against the model."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from slimgraph.errors import BadDataError, BadInputError
from slimgraph.runtime import (
    check_feeds,
    create_session,
    input_specs,
    iter_batches,
    iter_feeds,
    load_npz,
    random_feeds,
    run,
)

INPUTS = [
    ("image", TensorProto.FLOAT, ["batch", 3, 4, 4]),
    ("input_ids", TensorProto.INT64, ["batch", "seq"]),
    ("attention_mask", TensorProto.INT64, ["batch", "seq"]),
    ("flag", TensorProto.BOOL, [1]),
    ("half", TensorProto.FLOAT16, [2, None]),
    ("small", TensorProto.UINT8, [5]),
]
EXPECTS = re.escape(
    "the model expects image: float32[batch, 3, 4, 4]; input_ids: int64[batch, seq]; "
    "attention_mask: int64[batch, seq]; flag: bool[1]; half: float16[2, ?]; small: uint8[5]"
)


@pytest.fixture(scope="module")
def typed_model() -> ir.Model:
    """Identity on six inputs of different dtypes, symbolic and fixed dims (and one initializer
    listed as an input, as old exporters do)."""
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in INPUTS]
    graph = helper.make_graph(
        nodes,
        "typed",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in INPUTS]
        + [helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info(f"{n}_out", t, None) for n, t, _ in INPUTS],
        [helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])],
    )
    return ir.from_proto(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    )


@pytest.fixture(scope="module")
def fixed_model() -> ir.Model:
    """y = relu(x) for x of the fixed shape [4, 3]."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
    )
    return ir.from_proto(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    )


def _good_data(samples: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "image": rng.standard_normal((samples, 3, 4, 4)).astype(np.float32),
        "input_ids": rng.integers(0, 100, (samples, 7)),
        "attention_mask": np.ones((samples, 7), np.int64),
        "flag": np.ones((samples,), bool),
        "half": np.zeros((samples, 3), np.float16),
        "small": np.zeros((samples,), np.uint8),
    }


# ---------------------------------------------------------------- specs and random feeds


def test_input_specs_skip_initializers(typed_model: ir.Model) -> None:
    specs = input_specs(typed_model)
    assert [s.name for s in specs] == [n for n, _, _ in INPUTS]
    assert specs[0].shape == ("batch", 3, 4, 4)
    assert specs[4].shape == (2, None)
    assert [s.dtype for s in specs] == [
        np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.int64),
        np.dtype(bool), np.dtype(np.float16), np.dtype(np.uint8),
    ]


def test_random_feeds_follow_the_spec(typed_model: ir.Model) -> None:
    feeds = random_feeds(typed_model, batch=3, dims={"seq": 9}, seed=4)
    shapes = {name: array.shape for name, array in feeds.items()}
    assert shapes == {
        "image": (3, 3, 4, 4),
        "input_ids": (3, 9),
        "attention_mask": (3, 9),
        "flag": (1,),
        "half": (2, 1),
        "small": (5,),
    }
    for spec in input_specs(typed_model):
        assert feeds[spec.name].dtype == spec.dtype
    assert set(np.unique(feeds["input_ids"])) <= {0, 1}
    # a padded batch: row b of 3 keeps the first 9 - floor(9 * b / 6) positions
    np.testing.assert_array_equal(feeds["attention_mask"].sum(axis=1), [9, 8, 6])
    np.testing.assert_array_equal(feeds["attention_mask"][2], [1] * 6 + [0] * 3)
    assert (random_feeds(typed_model, batch=1, dims={"seq": 9})["attention_mask"] == 1).all()
    assert feeds["flag"].all()
    assert feeds["image"].std() > 0.5
    # named dims beat the batch rule, also on axis 0
    assert random_feeds(typed_model, batch=3, dims={"batch": 2})["image"].shape[0] == 2
    # reproducible per seed, different across seeds
    again = random_feeds(typed_model, batch=3, dims={"seq": 9}, seed=4)
    np.testing.assert_array_equal(again["image"], feeds["image"])
    other = random_feeds(typed_model, batch=3, dims={"seq": 9}, seed=5)
    assert not np.array_equal(other["image"], feeds["image"])
    # onnxruntime accepts them
    outputs = run(create_session(typed_model), feeds)
    np.testing.assert_array_equal(outputs["half_out"], feeds["half"])


# ---------------------------------------------------------------- .npz data


def _save_npz(tmp_path: Path, data: dict[str, np.ndarray]) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **data)
    return path


def test_load_npz_good(typed_model: ir.Model, tmp_path: Path) -> None:
    data = _good_data()
    loaded = load_npz(_save_npz(tmp_path, data), typed_model)
    assert loaded.keys() == data.keys()
    for name in data:
        np.testing.assert_array_equal(loaded[name], data[name])


def _broken(change: str) -> dict[str, np.ndarray]:
    data = _good_data()
    if change == "missing":
        del data["flag"]
    elif change == "extra":
        data["labels"] = np.zeros(6, np.int64)
    elif change == "dtype":
        data["image"] = data["image"].astype(np.int32)  # float64 is cast (test_float64_is_cast)
    elif change == "rank":
        data["input_ids"] = data["input_ids"][:, :, None]
    elif change == "fixed_dim":
        data["image"] = np.zeros((6, 3, 5, 4), np.float32)
    elif change == "zero_samples":
        data = {name: array[:0] for name, array in data.items()}
    elif change == "nan":
        data["image"][2, 0, 0, 0] = np.nan
    elif change == "inf":
        data["half"][1, 1] = np.inf
    elif change == "counts":
        data["input_ids"] = data["input_ids"][:4]
    return data


BROKEN = {
    "missing": r"its keys \(.*\) do not match the model's input names \(missing flag\)",
    "extra": r"its keys \(.*, labels, small\) do not match the model's input names \(not "
             r"inputs of the model: labels\)",
    "dtype": "'image' is int32, but",
    "rank": r"'input_ids' has shape \[6, 7, 1\], but",
    "fixed_dim": r"'image' has shape \[6, 3, 5, 4\], but",
    "zero_samples": "'image' holds no samples",
    "nan": r"'image' contains NaN or Inf in row 2 \(1 of 6 rows, stacked on axis 0\)",
    "inf": r"'half' contains NaN or Inf in row 1 \(1 of 6 rows, stacked on axis 0\)",
    "counts": r"inputs hold different numbers of samples \(.*input_ids: 4.*\)",
}


@pytest.mark.parametrize("change", sorted(BROKEN))
def test_bad_data(typed_model: ir.Model, tmp_path: Path, change: str) -> None:
    data = _broken(change)
    with pytest.raises(BadDataError, match=f"^data: {BROKEN[change]}.*{EXPECTS}$"):
        check_feeds(typed_model, data)
    path = _save_npz(tmp_path, data)
    with pytest.raises(BadDataError, match=f"^{re.escape(str(path))}: {BROKEN[change]}"):
        load_npz(path, typed_model)


def test_pickled_objects_are_never_loaded(
    typed_model: ir.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append(a))
    data = _good_data()
    data["input_ids"] = np.array([{"evil": 1}] * 6, dtype=object)
    path = _save_npz(tmp_path, data)
    message = f"^{re.escape(str(path))}: holds pickled Python objects.*{EXPECTS}"
    with pytest.raises(BadDataError, match=message):
        load_npz(path, typed_model)
    raw_pickle = tmp_path / "raw.npz"
    raw_pickle.write_bytes(pickle.dumps({"image": [1, 2]}))
    with pytest.raises(BadDataError, match="pickled"):
        load_npz(raw_pickle, typed_model)
    assert calls == []


def test_unreadable_data_files(typed_model: ir.Model, tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match="nothere.npz: no such file"):
        load_npz(tmp_path / "nothere.npz", typed_model)
    text = tmp_path / "text.npz"
    text.write_text("image,label\n1,2\n")
    with pytest.raises(BadDataError, match=r"text\.npz: not a readable \.npz file \(not the zip "
                       r"archive of named arrays that np\.savez writes\); the model expects"):
        load_npz(text, typed_model)  # not numpy's advice to unpickle it
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((2, 3), np.float32))
    message = r"single\.npy: not a readable \.npz file \(a single array"
    with pytest.raises(BadDataError, match=message):
        load_npz(single, typed_model)
    assert issubclass(BadDataError, BadInputError)


# ---------------------------------------------------------------- batches


def test_iter_batches_free_batch() -> None:
    data = {"x": np.arange(10).reshape(10, 1), "y": np.arange(10)}
    batches = list(iter_batches(data, 4))
    assert [len(b["x"]) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["y"] for b in batches]), data["y"])
    with pytest.raises(BadDataError, match="batch size must be at least 1, got 0"):
        list(iter_batches(data, 0))


def test_iter_batches_fixed_batch_model(fixed_model: ir.Model) -> None:
    data = {"x": np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)}
    batches = list(iter_batches(data, 3, fixed_model))
    assert [b["x"].shape for b in batches] == [(4, 3), (4, 3)]  # the ragged tail is left out
    np.testing.assert_array_equal(batches[1]["x"], data["x"][4:8])
    session = create_session(fixed_model)
    for batch in batches:
        np.testing.assert_array_equal(run(session, batch)["y"], np.maximum(batch["x"], 0))


def test_iter_feeds() -> None:
    one = {"x": np.zeros(2)}
    assert list(iter_feeds(one)) == [one]
    many = [one, {"x": np.ones(2)}]
    assert list(iter_feeds(iter(many))) == many


# ---------------------------------------------------------------- inputs that drive the model


def _ints(*names_shapes: tuple[str, list]) -> list:
    return [helper.make_tensor_value_info(n, TensorProto.INT64, s) for n, s in names_shapes]


def _graph_model(nodes, inputs, outputs, opset: int = 18) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return ir.from_proto(proto)


def test_inputs_get_values_their_slots_accept() -> None:
    """Integer divisors away from zero, a Reshape target read from the declared result, axes
    that exist, a Split that adds up, training_mode false: every draw runs, every seed."""
    model = _graph_model(
        [
            helper.make_node("Div", ["a", "b"], ["q"]),
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("Unsqueeze", ["x", "axes"], ["u"]),
            helper.make_node("Split", ["x", "split"], ["s0", "s1"], axis=1),
            helper.make_node("Dropout", ["x", "ratio", "training"], ["d"]),
            helper.make_node("Slice", ["x", "starts", "ends", "slice_axes", "steps"], ["sl"]),
        ],
        [
            *_ints(("a", [6]), ("b", [6])),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4]),
            *_ints(("shape", [2]), ("axes", [2]), ("split", [2])),
            helper.make_tensor_value_info("ratio", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("training", TensorProto.BOOL, []),
            *_ints(("starts", [2]), ("ends", [2]), ("slice_axes", [2]), ("steps", [2])),
        ],
        [
            helper.make_tensor_value_info("q", TensorProto.INT64, [6]),
            helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 6]),
            helper.make_tensor_value_info("u", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("s0", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("s1", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("d", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("sl", TensorProto.FLOAT, None),
        ],
    )
    session = create_session(model)
    for seed in range(5):
        feeds = random_feeds(model, seed=seed)
        assert (feeds["b"] != 0).all() and set(np.abs(feeds["b"])) <= {1, 2, 3}
        np.testing.assert_array_equal(feeds["shape"], [2, 6])
        np.testing.assert_array_equal(feeds["axes"], [0, 1])
        assert feeds["split"].sum() == 4 and not feeds["training"]
        outputs = run(session, feeds)
        np.testing.assert_array_equal(outputs["sl"], feeds["x"])  # a neutral slice
        np.testing.assert_array_equal(outputs["d"], feeds["x"])  # inference: no dropout


def test_token_ids_range_over_the_whole_vocabulary() -> None:
    """An id read by Gather from a 50-row embedding table (through a Cast) is drawn from all 50
    rows, not 0 and 1 only: an LM's random-data fidelity reads most of its vocabulary."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [50, 4],
                               np.arange(200, dtype=np.float32).tolist())  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
         helper.make_node("Gather", ["table", "ids32"], ["embedded"])],
        "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("embedded", TensorProto.FLOAT, ["batch", "seq", 4])],
        [table],
    )
    model = ir.from_proto(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    ids = random_feeds(model, dims={"batch": 8, "seq": 16}, seed=0)["ids"]
    assert ids.dtype == np.int64 and ids.shape == (8, 16)
    assert ids.min() >= 0 and ids.max() <= 49 and len(np.unique(ids)) > 40


def test_sequence_inputs_are_lists() -> None:
    model = _graph_model(
        [helper.make_node("SequenceLength", ["seq"], ["n"])],
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("n", TensorProto.INT64, [])],
    )
    assert input_specs(model)[0].describe() == "seq: sequence(float32)"
    feeds = random_feeds(model)
    assert isinstance(feeds["seq"], list) and len(feeds["seq"]) == 2
    assert run(create_session(model), feeds)["n"] == 2


def test_generated_inputs_that_cannot_run_the_model_say_so_and_how_to_pass_data() -> None:
    """A Reshape with allowzero=1 to a target nothing declares: no generated target has the 12
    elements of x. The error says what was tried, never that the user's data is wrong."""
    import slimgraph as sg
    from slimgraph.errors import UnsupportedModelError
    from slimgraph.runtime.feeds import driving_feeds

    model = _graph_model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4]), *_ints(("shape", [2]))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    with pytest.raises(UnsupportedModelError) as caught:
        driving_feeds(model)
    message = str(caught.value)
    assert message.startswith(
        "cannot build sample inputs the input model runs on, to verify it: tried 1 sets of "
        "generated inputs, the first inputs x[3, 4], shape[2]: "
    )
    assert message.endswith(
        "; give real inputs (feeds= in Python, --data DATA.npz on the command line) or skip "
        "verification (verify=False / --no-verify)"
    )
    assert not isinstance(caught.value, BadDataError)
    with pytest.raises(UnsupportedModelError, match="cannot build sample inputs"):
        sg.optimize(model)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert sg.optimize(model, feeds={"x": x, "shape": np.array([4, 3])}) is not None
