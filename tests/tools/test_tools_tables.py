"""Text tables and number formats of the command line."""

from __future__ import annotations

import json
import math

import pytest

from slimgraph._tables import (
    format_bytes,
    format_count,
    format_float,
    format_ratio,
    format_shape,
    render_table,
    to_json,
)


def test_render_table_aligns_numbers_right_and_text_left() -> None:
    text = render_table(["op", "count"], [["Conv", 3], ["BatchNormalization", 1234]])
    assert text.splitlines() == [
        "op                  count",
        "------------------  -----",
        "Conv                    3",
        "BatchNormalization  1,234",
    ]


def test_render_table_explicit_alignment_and_missing_cells() -> None:
    text = render_table(["a", "b"], [["x", None], ["yy", "12%"]], align="rr", indent="  ")
    assert text.splitlines() == ["   a    b", "  --  ---", "   x    -", "  yy  12%"]
    with pytest.raises(ValueError, match="2 cells for 3 headers"):
        render_table(["a", "b", "c"], [[1, 2]])


@pytest.mark.parametrize(
    ("value", "text"),
    [(999, "999"), (1_500, "1.5 K"), (2_673_280, "2.67 M"), (4_089_184_256, "4.09 G")],
)
def test_format_count(value: int, text: str) -> None:
    assert format_count(value) == text


def test_other_formats() -> None:
    assert format_bytes(1023) == "1023 B" and format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"
    assert format_ratio(0.5) == "0.50x" and format_ratio(None) == "-"
    assert format_float(math.inf) == "inf" and format_float(1.5e-7) == "1.500e-07"
    assert format_shape(["batch", 3, None]) == "[batch, 3, ?]" and format_shape(None) == "?"


def test_to_json_is_strict() -> None:
    text = to_json({"sqnr": math.inf, "low": -math.inf, "bad": math.nan, "rows": [1.5, (2,)]})
    assert json.loads(text) == {"sqnr": "inf", "low": "-inf", "bad": "nan", "rows": [1.5, [2]]}
    assert "Infinity" not in text and "NaN" not in text
