"""`--report DIR`: one place that writes a command's report (data first, page second).

A report is a JSON-safe dict. Every command builds its own and hands it to `write_report`, which
writes `DIR/report.json` (the data, always) and `DIR/report.txt` (the text the command printed,
when given). The page (`report.html`) is rendered from the same dict, from these optional keys:

- `"title"`: str, the page heading; `"command"`: the slimgraph command that made it.
- `"summary"`: {label: value} shown as a table of figures.
- `"tables"`: [{"title": str, "columns": [str], "rows": [[cell, ...]]}].
- `"plots"`: [{"kind": "bar" | "barh" | "line" | "scatter", "title": str, "x_label": str,
  "y_label": str, "series": [{"name": str, "x": [..], "y": [..], "labels": [str]?}],
  "pareto": [bool]? (scatter: points on the Pareto front)}]. Bar x values are category names
  (torch layer names where there are some).

Everything else in the dict is kept in report.json as data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slimgraph.errors import OutputPathError
from slimgraph.tools.tables import to_json

__all__ = ["check_report_dir", "write_report"]


def check_report_dir(directory: str | os.PathLike[str] | None) -> Path | None:
    """Validate `--report DIR` before any work is done (so a bad path fails early).

    Raises:
        OutputPathError: DIR exists and is not a folder, or its parent folder does not exist.
    """
    if directory is None:
        return None
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"--report {folder}: exists and is not a folder")
    if not folder.exists() and not folder.resolve().parent.is_dir():
        raise OutputPathError(f"--report {folder}: its parent folder does not exist")
    return folder


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_report(
    directory: str | os.PathLike[str], report: Mapping[str, Any], *, text: str | None = None
) -> list[Path]:
    """Write `report.json` (and `report.txt` when `text` is given) into `directory`.

    Returns the paths written.

    Raises:
        OutputPathError: the folder cannot be used (see `check_report_dir`).
    """
    folder = check_report_dir(directory)
    assert folder is not None
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "report.json"]
    _write_atomic(written[0], to_json(dict(report)) + "\n")
    if text is not None:
        written.append(folder / "report.txt")
        _write_atomic(written[1], text + "\n")
    return written
