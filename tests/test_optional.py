"""`slimgraph._optional.require_torch`: torch's OpenMP threads wait passively unless told."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

_SCRIPT = (
    "import os, sys; from slimgraph._optional import require_torch; "
    "assert 'torch' not in sys.modules; require_torch(); print(os.environ['OMP_WAIT_POLICY'])"
)


def test_torch_loads_with_passive_waiting_unless_the_environment_says() -> None:
    """(A value the environment gives is kept: `os.environ.setdefault`.)"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert (done.returncode, done.stdout.strip()) == (0, "PASSIVE"), done.stderr
