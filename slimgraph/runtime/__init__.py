"""The runtime layer: onnxruntime sessions, sample feeds, fidelity and side-by-side latency."""

from __future__ import annotations

from slimgraph.runtime.bench import BenchmarkResult, Timing, benchmark
from slimgraph.runtime.compare import (
    Fidelity,
    FidelityAccumulator,
    OutputFidelity,
    compare,
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
