"""`slimgraph.errors.first_line`: the one way a library's error becomes part of a message."""

from __future__ import annotations

import pytest

from slimgraph.errors import first_line, message_line


@pytest.mark.parametrize(
    ("error", "plain", "named"),
    [
        (ValueError("bad shape\nTraceback (most recent call last):"), "bad shape",
         "ValueError: bad shape"),
        (RuntimeError("\n\n  indented   first line  \nsecond"), "indented first line",
         "RuntimeError: indented first line"),
        (RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Load model failed"),
         "1 : FAIL : Load model failed", "RuntimeError: 1 : FAIL : Load model failed"),
        (RuntimeError("Failed to export. \x1b[96mThis is step 1/3\x1b[0m of exporting"),
         "Failed to export. This is step 1/3 of exporting",
         "RuntimeError: Failed to export. This is step 1/3 of exporting"),
        (RuntimeError(), "RuntimeError", "RuntimeError"),
        (ValueError(" \n\x1b[0m\n"), "ValueError", "ValueError"),
    ],
)
def test_first_line(error: BaseException, plain: str, named: str) -> None:
    assert first_line(error) == plain
    assert first_line(error, named=True) == named


def test_message_line_is_empty_for_a_blank_message() -> None:
    assert message_line("\x1b[96m\x1b[0m\n   \n") == ""
    assert message_line("one\ntwo") == "one"
