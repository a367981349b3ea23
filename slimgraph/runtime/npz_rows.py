"""Row slices of an `.npz` read on demand, so calibration memory stays flat in the sample count.

`np.load` on an `.npz` decompresses each array whole. `open_npz_rows` instead finds, for every
member stored uncompressed (what `np.savez` writes), where its `.npy` data starts inside the zip
file and returns `RowArray`s whose `[start:stop]` reads just those rows with `os.pread` (no
memory map: mapped pages would count in the process's resident memory once read). Compressed
members (`np.savez_compressed`) cannot be sliced without inflating them, so they are read whole
(logged).
"""

from __future__ import annotations

import logging
import math
import os
import struct
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

__all__ = ["RowArray", "NpzRows", "open_npz_rows"]

logger = logging.getLogger(__name__)

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header (30 bytes)


class RowArray:
    """A C-ordered array inside a file, read row slices at a time along axis 0.

    Attributes:
        shape, dtype: of the whole array (as `np.load` would return it).
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path = path
        self.offset = offset
        self.shape = shape
        self.dtype = dtype
        self.ndim = len(shape)
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize if shape else dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1) or not self.shape:
            return np.asarray(self)[key]
        start, stop, _ = key.indices(self.shape[0])
        rows = max(0, stop - start)
        out = np.empty((rows, *self.shape[1:]), dtype=self.dtype)
        if rows:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset + start * self.row_bytes)
                handle.readinto(out.data.cast("B"))
        return out

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        whole = self[0 : self.shape[0]] if self.shape else self._scalar()
        return whole if dtype is None else whole.astype(dtype)

    def _scalar(self) -> np.ndarray:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            return np.frombuffer(handle.read(self.dtype.itemsize), self.dtype).reshape(())


class NpzRows(Mapping[str, "RowArray | np.ndarray"]):
    """The arrays of an `.npz` by key: `RowArray` for stored members, arrays for the others."""

    def __init__(self, arrays: dict[str, RowArray | np.ndarray]) -> None:
        self._arrays = arrays

    def __getitem__(self, key: str) -> RowArray | np.ndarray:
        return self._arrays[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)


def open_npz_rows(path: str | os.PathLike[str]) -> NpzRows:
    """Open an `.npz` for row slicing (see the module docstring).

    Raises:
        OSError, ValueError, zipfile.BadZipFile: an unreadable file or member (the caller turns
            them into its own error; object arrays raise ValueError, as with `np.load`).
    """
    file = Path(path)
    arrays: dict[str, RowArray | np.ndarray] = {}
    with zipfile.ZipFile(file) as archive, open(file, "rb") as raw:
        for info in archive.infolist():
            key = info.filename.removesuffix(".npy")
            lazy = _row_array(file, raw, info) if info.compress_type == zipfile.ZIP_STORED else None
            if lazy is None:
                logger.info("%s: '%s' is compressed: read whole", file, key)
                with archive.open(info) as member:
                    arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
            else:
                arrays[key] = lazy
    return NpzRows(arrays)


def _row_array(file: Path, raw, info: zipfile.ZipInfo) -> RowArray | None:  # noqa: ANN001
    raw.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
    if fields[0] != b"PK\x03\x04":
        return None
    start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
    raw.seek(start)
    version = np.lib.format.read_magic(raw)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(raw)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(raw)
    else:
        return None
    if fortran or dtype.hasobject:
        if dtype.hasobject:
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        return None
    return RowArray(file, raw.tell(), tuple(shape), dtype)
