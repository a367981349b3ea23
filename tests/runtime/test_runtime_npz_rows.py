"""Issue 10, kind 11: calibration reads its `.npz` batch by batch (row slices), so memory stays
flat in the sample count (benchmarks/calibration_memory.py measures the peak RSS)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import slimgraph as sg
from slimgraph.errors import BadDataError
from slimgraph.runtime.calibrate import calibrate, calibration_batches
from slimgraph.runtime.npz_rows import RowArray, open_npz_rows

DIGITS = Path(sg.__file__).parent / "data"


def test_row_slices_equal_np_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {"a": rng.random((37, 3, 5), dtype=np.float32), "b": np.arange(37, dtype=np.int64)}
    np.savez(tmp_path / "d.npz", **arrays)
    rows = open_npz_rows(tmp_path / "d.npz")
    assert all(isinstance(rows[k], RowArray) for k in arrays)
    for key, array in arrays.items():
        assert rows[key].shape == array.shape and rows[key].dtype == array.dtype
        for start, stop in ((0, 5), (30, 37), (35, 50), (10, 10)):
            np.testing.assert_array_equal(rows[key][start:stop], array[start:stop])
        np.testing.assert_array_equal(np.asarray(rows[key]), array)


def test_compressed_members_are_read_whole(tmp_path: Path) -> None:
    array = np.ones((4, 2), np.float32)
    np.savez_compressed(tmp_path / "c.npz", x=array)
    rows = open_npz_rows(tmp_path / "c.npz")
    assert isinstance(rows["x"], np.ndarray)
    np.testing.assert_array_equal(rows["x"], array)


def test_calibration_from_a_file_matches_calibration_from_arrays() -> None:
    model = sg.load(DIGITS / "digits_cnn.onnx")
    path = DIGITS / "digits_calib.npz"
    with np.load(path) as archive:
        data = {key: archive[key] for key in archive.files}
    names = [model.graph.inputs[0].name, *(v.name for v in model.graph.outputs)]
    from_file = calibrate(model, path, names, histogram=False)
    from_arrays = calibrate(model, data, names, histogram=False)
    for name in names:
        assert from_file[name].count == from_arrays[name].count > 0
        assert from_file[name].min == from_arrays[name].min
        assert from_file[name].max == from_arrays[name].max


def test_a_nan_in_a_late_batch_is_refused(tmp_path: Path) -> None:
    model = sg.load(DIGITS / "digits_cnn.onnx")
    images = np.random.default_rng(1).random((100, 1, 8, 8), dtype=np.float32)
    images[90, 0, 3, 3] = np.nan
    np.savez(tmp_path / "nan.npz", image=images)
    with pytest.raises(BadDataError, match="NaN"):
        list(calibration_batches(model, tmp_path / "nan.npz", batch_size=32))


def test_batches_hold_only_their_rows(tmp_path: Path) -> None:
    """Python-level allocations while iterating 2,000 rows stay about one batch, not the file."""
    model = sg.load(DIGITS / "digits_cnn.onnx")
    images = np.random.default_rng(2).random((2000, 1, 8, 8), dtype=np.float32)  # 512 KB
    np.savez(tmp_path / "big.npz", image=images)
    batches = calibration_batches(model, tmp_path / "big.npz", batch_size=16)
    tracemalloc.start()
    total = sum(batch["image"].shape[0] for batch in batches)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == 2000
    assert peak < images.nbytes / 4
