"""slimgraph: compiler-style model compression for ONNX, every rewrite verified on onnxruntime.

Example:
    >>> import slimgraph as sg
    >>> model = sg.load("model.onnx")  # doctest: +SKIP
    >>> sg.save(model, "copy.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

from slimgraph.errors import (
    BadDataError,
    BadInputError,
    BadOptionError,
    InvalidModelError,
    ModelLoadError,
    SlimgraphError,
    UnsafeModelError,
    UnsupportedModelError,
    VerificationError,
)
from slimgraph.ir import from_torch, load, save
from slimgraph.passes.lowrank import factorize, factorize_with_report
from slimgraph.passes.pipeline import optimize
from slimgraph.passes.precision import convert_fp16
from slimgraph.passes.prune import prune, prune_with_report
from slimgraph.passes.quantize import quantize, report_of
from slimgraph.passes.quantize.api import budget_search_of
from slimgraph.passes.sensitivity import sensitivity
from slimgraph.runtime import benchmark, compare, random_feeds
from slimgraph.runtime.budget import check_budget
from slimgraph.runtime.finetune import FinetuneReport, finetune, finetune_with_report
from slimgraph.tools.sweep import sweep

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "load",
    "save",
    "from_torch",
    "compare",
    "benchmark",
    "random_feeds",
    "optimize",
    "quantize",
    "report_of",
    "prune",
    "prune_with_report",
    "factorize",
    "factorize_with_report",
    "convert_fp16",
    "sensitivity",
    "check_budget",
    "budget_search_of",
    "finetune",
    "finetune_with_report",
    "FinetuneReport",
    "sweep",
    "SlimgraphError",
    "BadInputError",
    "BadDataError",
    "BadOptionError",
    "InvalidModelError",
    "ModelLoadError",
    "UnsafeModelError",
    "UnsupportedModelError",
    "VerificationError",
]
