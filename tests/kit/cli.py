"""Running the command line: results of in-process runs and of the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = ["Result", "console_script", "run_script"]


@dataclass(frozen=True)
class Result:
    """Exit code, stdout and stderr of one command-line run."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        """stdout parsed as strict JSON (NaN and Infinity rejected)."""

        def reject(token: str) -> None:
            raise AssertionError(f"non-standard JSON token {token}")

        return json.loads(self.out, parse_constant=reject)


def console_script() -> str:
    """The installed `slimgraph` console script (next to this Python first)."""
    beside = Path(sys.executable).with_name("slimgraph")
    found = str(beside) if beside.exists() else shutil.which("slimgraph")
    if found is None:
        pytest.fail("the slimgraph console script is not installed (pip install -e .)")
    return found


def run_script(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real console script in a subprocess (one OpenMP thread, 120 s at most)."""
    return subprocess.run(
        [console_script(), *[str(a) for a in args]],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
