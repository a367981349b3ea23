"""The ONNX backend test suite as differential data (issue 21): every node, simple,
pytorch-converted and pytorch-operator case the installed onnx package generates or ships that
onnxruntime runs correctly, plus each case with its inputs frozen into weights (which lets
constant folding run over the op). `optimize` must not change an output with the verifier off,
write no file onnxruntime refuses and never crash; the default call (no user inputs) verifies at
least 98% of the cases; dynamic int8 writes no invalid file. One process, single-threaded
sessions; `benchmarks/backend_suite.py` prints the same figures."""

from __future__ import annotations

import logging

import pytest

from tests.kit.backend import (
    all_cases,
    dynamic_int8,
    optimize_default,
    optimize_verifier_off,
    valid_cases,
    with_frozen,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def valid() -> list:
    """(case, onnxruntime's outputs) for every valid case and frozen variant."""
    logging.disable(logging.WARNING)  # the folder logs a warning per op it cannot evaluate
    try:
        return list(valid_cases(with_frozen(all_cases())))
    finally:
        logging.disable(logging.NOTSET)


def _base(valid: list) -> list:
    return [(case, out) for case, out in valid if "_frozen" not in case.name]


def test_the_suite_is_what_the_figures_say(valid: list) -> None:
    base = _base(valid)
    assert len(base) > 1600 and len(valid) > 4000  # node + data kinds, frozen variants
    assert {case.kind for case, _ in base} == {
        "node", "simple", "pytorch-converted", "pytorch-operator"
    }


def test_optimize_with_the_verifier_off_changes_no_output(valid: list) -> None:
    tally = optimize_verifier_off(valid)
    assert tally.failures() == []
    assert tally["ok"] + tally["refused"] == len(valid)
    assert tally["refused"] < 50, tally.examples["refused"]  # NaN/Inf weights of frozen cases


def test_the_default_call_verifies_almost_every_case(valid: list) -> None:
    base = _base(valid)
    tally = optimize_default(base)
    assert tally.failures() == []
    assert tally["verified"] >= 0.98 * len(base), tally.examples.get("unverified")
    for line in tally.examples.get("unverified", []):  # says so, never blames the user's data
        assert ": UnsupportedModelError: cannot build sample inputs the input model runs" in line


def test_dynamic_int8_writes_no_invalid_model(valid: list) -> None:
    tally = dynamic_int8(valid)
    assert tally.failures() == []
    assert tally["ok"] >= 20
