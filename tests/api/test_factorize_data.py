"""`factorize(data=...)` measures the result on all of the data, as `quantize --data` does."""

from __future__ import annotations

import pytest

import slimgraph as sg
from slimgraph.ir import metadata
from slimgraph.runtime.compare import compare
from slimgraph.runtime.metrics import load_data
from tests.kit.data import DIGITS, DIGITS_TEST


def test_fidelity_and_accuracy_come_from_the_whole_data() -> None:
    model = sg.load(DIGITS)
    values = load_data(DIGITS_TEST, model)
    feeds = [{"image": values.feeds["image"][i : i + 1]} for i in range(4)]
    factorized, report = sg.factorize_with_report(model, rank_ratio=0.5, data=DIGITS_TEST,
                                                  feeds=feeds)  # fmt: skip
    assert report.fidelity is not None and report.fidelity.samples == values.samples
    expected = compare(model, factorized, values)
    assert report.fidelity.worst_cosine == pytest.approx(expected.worst_cosine, rel=1e-9)
    assert report.fidelity.accuracy is not None and expected.accuracy is not None
    assert report.fidelity.accuracy.candidate == expected.accuracy.candidate
    assert all(layer.output_sqnr_db is not None for layer in report.layers)  # on the 4 feeds
    assert f"accuracy:   {expected.accuracy}" in str(report)
    assert factorized.meta[metadata.FACTORIZE_REPORT] is report
