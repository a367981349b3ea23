"""Fixtures of the command-line tests."""

from __future__ import annotations

import pytest

from slimgraph.tools.cli import main
from tests.kit.cli import Result


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run `slimgraph ARGS...` in-process; returns exit code, stdout and stderr."""

    def run(*args: object) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
