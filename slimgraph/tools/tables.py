"""Plain-text tables and number formats for the command line: `slimgraph._tables`, re-exported.

They live at the package's top level so the runtime's results print the same tables
(`print(sg.compare(...))`) without the runtime importing `tools`.
"""

from __future__ import annotations

from slimgraph._tables import (
    emit,
    format_bytes,
    format_count,
    format_float,
    format_ratio,
    format_shape,
    render_fields,
    render_table,
    to_json,
)

__all__ = [
    "render_table",
    "render_fields",
    "format_count",
    "format_bytes",
    "format_ratio",
    "format_float",
    "format_shape",
    "to_json",
    "emit",
]
