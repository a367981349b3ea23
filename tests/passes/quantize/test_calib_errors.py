"""Calibration and quantization on bad input: one clear error naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import slimgraph as sg
from slimgraph.errors import BadDataError, BadOptionError, UnsupportedModelError
from slimgraph.runtime.calibrate import calibrate
from tests.kit.data import DIGITS_CALIB, digits, linear_feeds
from tests.kit.graphs import linear_model, make_model

EXPECTS = r"the model expects image: float32\[batch, 1, 8, 8\]"


def _images(rows: int = 4, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(0).random((rows, 1, 8, 8)).astype(dtype)


def test_empty_iterable_is_an_error() -> None:
    with pytest.raises(BadDataError, match=r"^calibration data is empty \(no batches\)$"):
        sg.quantize(digits(), calibration=[])


def test_empty_generator_is_an_error() -> None:
    with pytest.raises(BadDataError, match=r"^calibration data is empty \(no batches\)$"):
        sg.quantize(digits(), calibration=(x for x in []))


def test_zero_rows_is_an_error(tmp_path) -> None:
    path = tmp_path / "empty.npz"
    np.savez(path, image=np.zeros((0, 1, 8, 8), np.float32))
    with pytest.raises(BadDataError, match="'image' holds no samples"):
        sg.quantize(digits(), calibration=path)


def test_wrong_input_name_lists_what_the_model_expects() -> None:
    with pytest.raises(BadDataError, match=r"missing image; not inputs of the model: pixels\); "
                       + EXPECTS):
        sg.quantize(digits(), calibration=[{"pixels": _images()}])


def test_wrong_dtype_lists_what_the_model_expects() -> None:
    with pytest.raises(BadDataError, match=r"'image' is int32, but " + EXPECTS):
        sg.quantize(digits(), calibration={"image": _images(dtype=np.int32)})


def test_wrong_shape_lists_what_the_model_expects() -> None:
    with pytest.raises(BadDataError, match=r"'image' has shape \[4, 1, 9, 9\], but the model takes "
                       r"\[N, 1, 8, 8\] for it \(samples stacked on axis 0\); " + EXPECTS):
        sg.quantize(digits(), calibration=[{"image": np.zeros((4, 1, 9, 9), np.float32)}])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_data_names_the_input(bad: float) -> None:
    images = _images()
    images[1, 0, 2, 3] = bad
    with pytest.raises(BadDataError, match="'image' contains NaN or Inf"):
        sg.quantize(digits(), calibration=[{"image": images}])


@pytest.mark.parametrize("method", ["minmax", "moving-average", "entropy"])
@pytest.mark.parametrize("position", [0, 2, 3])
def test_nan_inside_the_model_names_the_tensor(method: str, position: int) -> None:
    # minmax reduces ranges inside onnxruntime, whose ReduceMin/ReduceMax skip a NaN that is
    # not the first element: every position must still be caught, on both calibration paths.
    nodes = [
        helper.make_node("Log", ["x"], ["logged"], name="log"),
        helper.make_node("MatMul", ["logged", "w"], ["y"], name="mm"),
    ]
    model = make_model(nodes, [("x", TensorProto.FLOAT, ["n", 4])],
                       [("y", TensorProto.FLOAT, ["n", 2])],
                       {"w": np.ones((4, 2), np.float32)})
    row = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    row[0, position] = -1.0  # log(-1) = NaN
    feeds = [{"x": np.ones((1, 4), np.float32)}, {"x": row}]
    with pytest.raises(BadDataError,
                       match="tensor 'logged' contains NaN or Inf on calibration batch 1"):
        sg.quantize(model, calibration=feeds, method=method)


def test_not_a_feed_dict_is_an_error() -> None:
    with pytest.raises(BadDataError, match="calibration data item 0 is a ndarray, not a dict"):
        sg.quantize(digits(), calibration=[_images()])


def test_model_with_nothing_to_quantize() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    model = make_model(nodes, [("x", TensorProto.FLOAT, ["n", 4])],
                       [("y", TensorProto.FLOAT, ["n", 4])])
    with pytest.raises(UnsupportedModelError, match="^nothing to quantize: the model has no Conv"):
        sg.quantize(model, calibration=[{"x": np.ones((2, 4), np.float32)}])


def test_everything_excluded_is_nothing_to_quantize() -> None:
    with pytest.raises(UnsupportedModelError, match="outside the exclusions"):
        sg.quantize(linear_model(), calibration=linear_feeds(), exclude=["*"])


def test_unknown_method_and_format() -> None:
    with pytest.raises(BadOptionError, match="unknown calibration method 'kl'"):
        sg.quantize(digits(), calibration=DIGITS_CALIB, method="kl")
    with pytest.raises(BadOptionError, match="unknown format 'tflite'"):
        sg.quantize(digits(), calibration=DIGITS_CALIB, fmt="tflite")


def test_generator_data_streams_once_and_feeds_the_report() -> None:
    model = linear_model()
    feeds = linear_feeds(count=6)
    quantized = sg.quantize(model, calibration=(f for f in feeds), report=True, progress=False)
    report = sg.report_of(quantized)
    assert report.outputs.batches == 6 and report.outputs.samples == 6 * 8  # runs, rows
    assert report.outputs.worst_cosine > 0.99


def test_calibrate_streams_statistics_of_named_values() -> None:
    stats = calibrate(linear_model(), linear_feeds(count=5), ["h0", "r0"], progress=False)
    assert stats["h0"].min < 0 and stats["r0"].min == 0.0
    assert stats["r0"].count == 5 * 8 * 8
    assert stats["h0"].counts.shape == (2048,)


def test_in_graph_ranges_match_the_values_copied_out() -> None:
    # Ranges-only calibration reduces inside onnxruntime; the histogram path copies the values
    # out and reduces in numpy: same min, max, moving average and count.
    feeds = linear_feeds(count=5)
    names = ["x", "h0", "r0", "h1", "y"]
    ranges = calibrate(linear_model(), feeds, names, histogram=False, progress=False)
    full = calibrate(linear_model(), feeds, names, histogram=True, progress=False)
    for name in names:
        got, want = ranges[name], full[name]
        assert (got.min, got.max, got.count) == (want.min, want.max, want.count), name
        assert got.ema_min == pytest.approx(want.ema_min, rel=1e-6), name
        assert got.ema_max == pytest.approx(want.ema_max, rel=1e-6), name
