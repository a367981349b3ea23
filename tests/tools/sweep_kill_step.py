"""A test-only pipeline step that kills the worker process running it, once.

Loaded into dask workers with `dask worker --preload <this file>` and imported by the test, so
the main process (which checks the grid) and the workers (which run it) know the step. The first
run creates `marker` and exits the process without cleanup, as a crash or an OOM kill would; the
retry (on a restarted or another worker) finds the marker and leaves the model unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import onnx_ir as ir

from slimgraph.passes.base import SlimgraphPass, SlimgraphPassResult
from slimgraph.passes.pipeline import PASSES, register_pass

__all__ = ["STEP", "KillWorkerOnce"]

STEP = "test-kill-worker-once"


class KillWorkerOnce(SlimgraphPass):
    """Exits the process the first `times` runs (counted as lines of `marker`); later runs change
    nothing."""

    exact: ClassVar[bool] = True

    def __init__(self, *, marker: str, times: int = 1) -> None:
        super().__init__()
        self.marker = marker
        self.times = times

    def call(self, model: ir.Model) -> SlimgraphPassResult:
        marker = Path(self.marker)
        deaths = marker.read_text().splitlines() if marker.exists() else []
        if len(deaths) < self.times:
            marker.write_text("".join(f"{line}\n" for line in [*deaths, str(os.getpid())]))
            os._exit(1)
        return SlimgraphPassResult(model, modified=False)


if STEP not in PASSES:
    register_pass(STEP)(KillWorkerOnce)
