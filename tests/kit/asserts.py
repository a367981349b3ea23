"""Assertions: outputs on onnxruntime within explicit tolerances, rewired edges by identity,
exact error messages, valid models; and the measures tests compare against (cosine, accuracy).

The project's exact-pass rule: |got - want| <= atol * max(1, max |want|) + rtol * |want| with
rtol = 1e-4 and atol = 1e-5, per output, integer outputs equal exactly.
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np
import onnx
import onnx_ir as ir
import pytest

__all__ = [
    "RTOL",
    "ATOL",
    "outputs_of",
    "output_list",
    "assert_close",
    "assert_same_outputs",
    "assert_rewired",
    "assert_fed_by",
    "raises_exactly",
    "check_valid",
    "cosine",
    "accuracy",
    "ort_optimized_ops",
]

RTOL = 1e-4
ATOL = 1e-5  # as a fraction of the output's scale: max(scale_floor, max |want|)


def outputs_of(
    model: ir.Model,
    feeds: Mapping[str, np.ndarray],
    optimization: str = "disable",
    *,
    threads: int | None = 1,
) -> dict[str, np.ndarray]:
    """Outputs by name of one onnxruntime CPU run. Graph optimizations are off by default, so the
    graph a pass wrote is what runs, not what onnxruntime rewrites it to."""
    from slimgraph.runtime import create_session, run

    session = create_session(model, threads=threads, optimization=optimization)  # type: ignore[arg-type]
    return run(session, dict(feeds))


def output_list(
    model: ir.Model, feeds: Mapping[str, np.ndarray], **options: object
) -> list[np.ndarray]:
    """`outputs_of` in graph-output order."""
    return list(outputs_of(model, feeds, **options).values())  # type: ignore[arg-type]


def assert_close(
    reference: np.ndarray,
    actual: np.ndarray,
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
    scale_floor: float = 1.0,
    name: str = "",
) -> None:
    """`actual` has `reference`'s shape and values: integers and booleans exactly, floats within
    `rtol` and an absolute tolerance of `atol * max(scale_floor, max |reference|)`."""
    reference, actual = np.asarray(reference), np.asarray(actual)
    assert actual.shape == reference.shape, (name, actual.shape, reference.shape)
    if reference.dtype.kind in "biu":
        np.testing.assert_array_equal(actual, reference, err_msg=name)
        return
    peak = float(np.abs(reference).max()) if reference.size else 0.0
    scale = max(scale_floor, peak)
    np.testing.assert_allclose(actual, reference, rtol=rtol, atol=atol * scale, err_msg=name)


def assert_same_outputs(
    reference: ir.Model,
    candidate: ir.Model,
    feeds: Mapping[str, np.ndarray] | None = None,
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
    optimization: str = "disable",
) -> None:
    """Both models have the same outputs (names, order, shapes) and values within the exact-pass
    tolerance (see `assert_close`) on `feeds` (random feeds of `reference` by default)."""
    if feeds is None:
        from tests.kit.data import random_feeds

        feeds = random_feeds(reference)
    want = outputs_of(reference, feeds, optimization=optimization)
    got = outputs_of(candidate, feeds, optimization=optimization)
    assert list(got) == list(want)
    for name, expected in want.items():
        assert_close(expected, got[name], rtol=rtol, atol=atol, name=name)


def assert_rewired(consumer: ir.Node, index: int, value: ir.Value | None) -> None:
    """Input `index` of `consumer` is `value` itself (identity, not an equal name), and `value`
    records that use (the IR's use lists agree with the edge)."""
    got = consumer.inputs[index]
    assert value is not None, f"expected value of {consumer.name!r} input {index} is None"
    assert got is value, (
        f"{consumer.op_type} {consumer.name!r} input {index} reads "
        f"{None if got is None else got.name!r}, not {value.name!r}"
    )
    uses = [(use.node, use.idx) for use in value.uses()]
    assert any(node is consumer and idx == index for node, idx in uses), (
        f"{value.name!r} does not list {consumer.name!r} input {index} among its uses"
    )


def assert_fed_by(consumer: ir.Node, index: int, op_type: str) -> ir.Node:
    """Input `index` of `consumer` is produced by a node of `op_type`; returns that node, whose
    output is the very value the consumer reads (`assert_rewired`)."""
    value = consumer.inputs[index]
    producer = value.producer() if value is not None else None
    assert producer is not None and producer.op_type == op_type, (
        f"{consumer.op_type} {consumer.name!r} input {index} comes from "
        f"{None if producer is None else producer.op_type}, not {op_type}"
    )
    assert value is not None
    assert_rewired(consumer, index, value)
    return producer


@contextlib.contextmanager
def raises_exactly(error: type[BaseException], message: str) -> Iterator[pytest.ExceptionInfo]:
    """The block raises `error` (or a subclass) whose message is exactly `message`."""
    with pytest.raises(error) as info:
        yield info
    assert str(info.value) == message


def check_valid(model: ir.Model) -> None:
    """The full onnx checker (with strict shape inference) accepts `model`."""
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays taken as flat vectors."""
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def accuracy(model: ir.Model, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of a classifier whose first output is scores [n, classes] for input
    "image"."""
    scores = next(iter(outputs_of(model, {"image": images}, optimization="all", threads=None)
                       .values()))  # fmt: skip
    return float((scores.argmax(axis=1) == labels).mean())


def ort_optimized_ops(model: ir.Model) -> collections.Counter[str]:
    """Op types of the graph onnxruntime actually runs (its optimized model, extended level)."""
    import onnxruntime as ort

    from slimgraph.runtime import model_bytes

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimized.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = path
        ort.InferenceSession(model_bytes(model), options, providers=["CPUExecutionProvider"])
        return collections.Counter(node.op_type for node in onnx.load(path).graph.node)
