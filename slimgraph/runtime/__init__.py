"""The runtime layer: onnxruntime sessions, sample feeds, fidelity and side-by-side latency.

The public names below are imported on first use (PEP 562), and the modules behind them import
onnxruntime only when a session is created (`slimgraph.runtime.session`), so a pass that reads
`slimgraph.runtime.feeds` does not load onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# `compare` is also the name of a submodule: bound here, the function wins over the module that
# importing `slimgraph.runtime.compare` would otherwise set as this package's attribute.
from slimgraph.runtime.compare import compare

if TYPE_CHECKING:
    from slimgraph.runtime.bench import BenchmarkResult, Timing, benchmark
    from slimgraph.runtime.compare import (
        Fidelity,
        FidelityAccumulator,
        OutputFidelity,
        compare_outputs,
    )
    from slimgraph.runtime.feeds import (
        InputSpec,
        calibrated_ranges,
        cast_floats,
        check_batch,
        check_feeds,
        input_specs,
        iter_batches,
        iter_feeds,
        load_npz,
        random_feeds,
        sample_count,
    )
    from slimgraph.runtime.session import OptLevel, create_session, model_bytes, run

__all__ = [
    "BenchmarkResult",
    "Timing",
    "benchmark",
    "Fidelity",
    "FidelityAccumulator",
    "OutputFidelity",
    "compare",
    "compare_outputs",
    "InputSpec",
    "calibrated_ranges",
    "cast_floats",
    "check_batch",
    "check_feeds",
    "input_specs",
    "iter_batches",
    "iter_feeds",
    "load_npz",
    "random_feeds",
    "sample_count",
    "OptLevel",
    "create_session",
    "model_bytes",
    "run",
]

# Public name -> the module that defines it, imported when the name is first used.
_LAZY: dict[str, str] = {
    **dict.fromkeys(("BenchmarkResult", "Timing", "benchmark"), "slimgraph.runtime.bench"),
    **dict.fromkeys(
        ("Fidelity", "FidelityAccumulator", "OutputFidelity", "compare_outputs"),
        "slimgraph.runtime.compare",
    ),
    **dict.fromkeys(
        ("InputSpec", "calibrated_ranges", "cast_floats", "check_batch", "check_feeds",
         "input_specs", "iter_batches", "iter_feeds", "load_npz", "random_feeds",
         "sample_count"),
        "slimgraph.runtime.feeds",
    ),  # fmt: skip
    **dict.fromkeys(
        ("OptLevel", "create_session", "model_bytes", "run"), "slimgraph.runtime.session"
    ),
}


def __getattr__(name: str) -> Any:
    """Import a public name on first use; later lookups find it bound."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


# Names this module uses for its own machinery, left out of `dir(slimgraph.runtime)`.
_MACHINERY = frozenset({"Any", "TYPE_CHECKING", "importlib", "_LAZY", "_MACHINERY"})


def __dir__() -> list[str]:
    """The public names, imported or not, and the submodules already imported."""
    return sorted((set(globals()) - _MACHINERY) | set(__all__))
