"""Data as every public function takes it (`data=`, `val=`, `sg.compare`'s data): one reader.

A data file (`.npz`) holds the model's inputs stacked on axis 0 (one row per sample) and,
optionally, a labels key (default `labels`) of class indices, one per row, that is never fed to
the model. `as_data` turns every accepted form (an `.npz` path, a dict of stacked arrays with an
optional labels key, `LabelledData`) into checked `LabelledData`; `load_data` and `split_labels`
are its two halves. Streamed calibration data has its own reader (`runtime.calibrate`), which
reads `.npz` members a slice of rows at a time.

Example:
    >>> data = as_data("val.npz", model)  # doctest: +SKIP
    >>> data.samples, data.labels is not None  # doctest: +SKIP
    (450, True)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BadDataError, BadOptionError
from slimgraph.runtime._decoder import token_feeds
from slimgraph.runtime.feeds import (
    cast_floats,
    check_feeds,
    describe_inputs,
    input_specs,
    iter_batches,
    read_npz,
    sample_count,
)

__all__ = [
    "DEFAULT_LABELS",
    "DataLike",
    "LabelledData",
    "as_data",
    "load_data",
    "check_label_range",
    "split_labels",
    "top1_correct",
]

DEFAULT_LABELS = "labels"


@dataclass(frozen=True)
class LabelledData:
    """Model inputs stacked on axis 0 and, when the data had them, one class index per row.

    Attributes:
        feeds: input name -> array [N, ...] in the model's dtype.
        labels: int64 [N] class indices, or None.
        source: where the data came from (a path, or "data"), for messages.
    """

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str = "data"

    @property
    def samples(self) -> int:
        return sample_count(self.feeds)

    def batches(self, batch_size: int, model: ir.Model | None = None) -> Iterator[
        tuple[dict[str, np.ndarray], np.ndarray | None]
    ]:
        """(feeds, labels) slices of `batch_size` rows, labels sliced alongside."""
        start = 0
        for feed in iter_batches(self.feeds, batch_size, model):
            rows = sample_count(feed)
            labels = None if self.labels is None else self.labels[start : start + rows]
            start += rows
            yield feed, labels

    def __repr__(self) -> str:
        labelled = "with labels" if self.labels is not None else "no labels"
        return f"LabelledData({self.source!r}, {self.samples} samples, {labelled})"


# Validation data as the public functions take it: a LabelledData, an .npz path, or a mapping of
# stacked arrays (with an optional labels key).
DataLike = LabelledData | str | os.PathLike[str] | Mapping[str, np.ndarray]


def as_data(data: DataLike, model: ir.Model, *, labels: str = DEFAULT_LABELS) -> LabelledData:
    """`data` as checked `LabelledData` (an .npz path is read, a mapping split into inputs and
    labels).

    Raises:
        BadDataError: data that does not fit the model (see `split_labels`).
        BadOptionError: `data` of another type.
    """
    if isinstance(data, LabelledData):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_data(data, model, labels=labels)
    if isinstance(data, Mapping):
        return split_labels(data, model, labels=labels)
    raise BadOptionError(
        f"data must be an .npz path, a dict of arrays or LabelledData, got {type(data).__name__}"
    )


def load_data(
    path: str | os.PathLike[str], model: ir.Model, *, labels: str = DEFAULT_LABELS
) -> LabelledData:
    """Read an `.npz` of inputs (and optional labels) and check it against the model.

    Raises:
        BadDataError: unreadable file, pickled objects, or data that does not fit (`split_labels`).
    """
    file = Path(path)
    data = read_npz(file, model)
    return split_labels(data, model, labels=labels, source=str(file))


def split_labels(
    data: Mapping[str, np.ndarray],
    model: ir.Model,
    *,
    labels: str = DEFAULT_LABELS,
    source: str = "data",
) -> LabelledData:
    """Separate the labels key from model inputs and check both.

    A labels key that is also one of the model's input names is fed, not taken as labels.

    Raises:
        BadDataError: inputs that do not fit the model (see `check_feeds`), a labels key that is
            missing while a key the model does not take is there (the message lists the keys and
            how to name the labels key), labels that are not one integer per row, or a count
            that differs from the inputs'.
    """
    specs = input_specs(model)
    names = {spec.name for spec in specs}
    unknown = sorted(key for key in data if key not in names and key != labels)
    if labels not in data and unknown and not names - data.keys():
        # every input is there, plus keys the model does not take: the labels key is misnamed
        listed = ", ".join(f"'{key}'" for key in unknown)
        if len(unknown) == 1:
            what = f"{listed} is not an input of the model: if it holds the labels, pass {{option}}"
            option = (f"labels={unknown[0]!r}", f"--labels {unknown[0]}")
        else:
            what = (f"{listed} are not inputs of the model: name the one that holds the labels "
                    "with {option}")
            option = ("labels=KEY", "--labels KEY")
        raise BadDataError.worded(
            "{source}: no labels key '{labels}' (its keys: {keys}), and " + what
            + "; the model expects {inputs}",
            source=source, labels=labels, keys=", ".join(sorted(data)),
            inputs=describe_inputs(specs), option=option,
        )
    feeds = {key: value for key, value in data.items() if key != labels or key in names}
    label_array = None
    if labels in data and labels not in names:
        label_array = np.asarray(data[labels])
        if label_array.ndim != 1 or label_array.dtype.kind not in "iu":
            raise BadDataError(
                f"{source}: labels '{labels}' must be one integer class index per row, got "
                f"{label_array.dtype.name} {list(label_array.shape)}"
            )
        label_array = label_array.astype(np.int64, copy=False)
    feeds = token_feeds(model, feeds) or feeds  # a decode step scored on a token file
    feeds = cast_floats(model, feeds, source=source)
    check_feeds(model, feeds, source=source)
    if label_array is not None and label_array.shape[0] != sample_count(feeds):
        raise BadDataError(
            f"{source}: {label_array.shape[0]} labels for {sample_count(feeds)} samples"
        )
    if label_array is not None:
        check_label_range(model, label_array, source)
    return LabelledData(feeds, label_array, source)


def check_label_range(model: ir.Model, labels: np.ndarray, source: str) -> None:
    """Labels must index the first output's classes (its non-batch axes, flattened, as
    `top1_correct` scores them); out of range, every row would count wrong, silently.

    Args:
        model: the model the labels are for.
        labels: int64 [N] class indices.
        source: what to name in the message (the file, "data", "val").

    Raises:
        BadDataError: a label below 0 or at least the class count (output shape static):
            "SOURCE: labels range over LOW..HIGH, but the model outputs C class scores".
    """
    outputs = model.graph.outputs
    shape = outputs[0].shape if outputs else None
    if labels.size == 0 or shape is None or len(shape) < 2:
        return
    sizes = [d for d in shape[1:] if isinstance(d, int)]
    if len(sizes) != len(shape) - 1:
        return
    classes = math.prod(sizes)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise BadDataError(f"{source}: labels range over {low}..{high}, but the model outputs "
                           f"{classes} class scores")


def top1_correct(scores: np.ndarray, labels: np.ndarray) -> int:
    """Rows whose highest score (last axis) is the label. scores [N, ..., C], labels [N]."""
    scores = np.asarray(scores)
    flat = scores.reshape(scores.shape[0], -1) if scores.ndim > 2 else scores
    return int((flat.argmax(axis=-1) == labels).sum())
