"""Plain-text tables and number formats (stdlib only; importable from every layer).

The one home of how figures read: the command line prints with these, and so do the results of
the Python API (`print(sg.compare(...))` shows the same table as `slimgraph compare`). One figure
reads the same everywhere: a cosine with six decimals (`format_cosine`: 0.999955, never "1"
beside "0.999987"), SQNR in dB with one (`format_db`), accuracy and agreement in percent with
two (`format_percent`), an accuracy change in points (`format_points`), MACs with their unit
(`format_macs`: "1.67 M MACs").

Example:
    >>> print(render_table(["op", "count"], [["Conv", 3], ["Relu", 12]]))
    op    count
    ----  -----
    Conv      3
    Relu     12
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from numbers import Number

__all__ = [
    "render_table",
    "render_fields",
    "format_count",
    "format_bytes",
    "format_ratio",
    "format_float",
    "format_cosine",
    "format_db",
    "format_percent",
    "format_points",
    "format_macs",
    "format_metric",
    "format_metric_change",
    "format_shape",
    "to_json",
    "emit",
]

Cell = object


def _cell_text(cell: Cell) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, bool):
        return "yes" if cell else "no"
    if isinstance(cell, int):
        return f"{cell:,}"
    if isinstance(cell, float):
        return format_float(cell)
    return str(cell)


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    indent: str = "",
    align: str | None = None,
) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned.

    Cells may be numbers (ints get thousands separators), None (shown as "-") or strings.
    A column is right-aligned when every non-empty cell in it is a number, unless `align`
    gives one letter per column ('l' or 'r').
    """
    texts = [[_cell_text(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in texts:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells for {len(headers)} headers: {row}")
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    numeric = [
        any(isinstance(row[i], Number) for row in rows)
        and all(row[i] is None or isinstance(row[i], Number) for row in rows)
        for i in range(len(headers))
    ]
    if align is not None:
        if len(align) != len(headers) or set(align) - {"l", "r"}:
            raise ValueError(f"align '{align}' needs one 'l' or 'r' per column")
        numeric = [letter == "r" for letter in align]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(cells, widths, numeric, strict=True)
        ]
        return (indent + "  ".join(padded)).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out.extend(line(row) for row in texts)
    return "\n".join(out)


def render_fields(fields: Sequence[tuple[str, Cell]], *, indent: str = "") -> str:
    """`name  value` lines with the names padded to one width."""
    width = max((len(name) for name, _ in fields), default=0)
    return "\n".join(f"{indent}{name.ljust(width)}  {_cell_text(value)}" for name, value in fields)


def format_count(value: int | float) -> str:
    """1234567 -> '1.23 M' (thousands, millions, giga); small values as they are."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {suffix}"
    return f"{value:,}" if isinstance(value, int) else f"{value:.3g}"


def format_bytes(value: int) -> str:
    """Bytes in binary units: 1536 -> '1.5 KiB'."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{value} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_ratio(value: float | None) -> str:
    """A ratio after/before: '0.52x'; '-' when undefined."""
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.2f}x"


def format_float(value: float, digits: int = 4) -> str:
    """Short float text: 'inf', '1.23e-07', '0.9999', '41.2'."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def format_cosine(value: float | None) -> str:
    """A cosine with six decimals, enough to tell 0.99995 from 1: '0.999955', '1.000000'."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return format_float(value)
    return f"{value:.6f}"


def format_db(value: float | None) -> str:
    """A signal-to-noise ratio in dB with one decimal: '40.4', 'inf' (identical outputs)."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return format_float(value)
    return f"{value:.1f}"


def format_percent(value: float | None) -> str:
    """A fraction in [0, 1] as a percentage with two decimals: 0.99556 -> '99.56%'."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return format_float(value)
    return f"{value:.2%}"


def format_points(value: float | None) -> str:
    """A change of a fraction in percentage points: 0.0123 -> '1.23 points'."""
    if value is None:
        return "-"
    return f"{value * 100:.2f} points"


def format_macs(value: int | float | None) -> str:
    """Multiply-accumulates with their unit: 1672704 -> '1.67 M MACs'."""
    if value is None:
        return "-"
    return f"{format_count(value)} MACs"


def format_metric(value: float | None, name: str | None) -> str:
    """A model's metric by its name: accuracy in percent, a cosine with six decimals, anything
    else (a user's metric) as a short float."""
    if value is None:
        return "-"
    if name == "accuracy":
        return format_percent(value)
    if name == "cosine":
        return format_cosine(value)
    return format_float(value)


def format_metric_change(value: float | None, name: str | None) -> str:
    """A change of a metric, signed: accuracy in points ('-1.23 points'), a cosine with six
    decimals ('-0.000123'), anything else as a short float."""
    if value is None:
        return "-"
    if name == "accuracy":
        return f"{round(value * 100, 2) + 0.0:+.2f} points"  # + 0.0: never "-0.00"
    if name == "cosine":
        return f"{round(value, 6) + 0.0:+.6f}"
    return ("+" if value >= 0 else "") + format_float(value)


def format_shape(shape: Sequence[int | str | None] | None) -> str:
    """[batch, 3, 224, 224]; '?' for an unknown rank or dimension."""
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def to_json(data: object) -> str:
    """Strict JSON (no NaN/Infinity tokens): non-finite floats become "inf", "-inf" or "nan"."""
    return json.dumps(_json_safe(data), indent=2, allow_nan=False)


def _json_safe(data: object) -> object:
    if isinstance(data, float) and not math.isfinite(data):
        return format_float(data)
    if isinstance(data, dict):
        return {str(k): _json_safe(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_json_safe(v) for v in data]
    return data


def emit(text: str) -> None:
    """Print command output; a reader that closed the pipe early (`| head`) is not an error."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
