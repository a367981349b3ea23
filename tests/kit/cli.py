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

__all__ = ["Result", "installed_command", "console_script", "run_script"]


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


def installed_command(name: str, install: str) -> str:
    """The path of the command-line program `name`, next to this Python first, then on PATH;
    fails the test with the `install` hint when it is not installed."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"the {name} command line is not installed ({install})")
    return found


def console_script() -> str:
    """The installed `slimgraph` console script."""
    return installed_command("slimgraph", "pip install -e .")


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
