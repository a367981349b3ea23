"""slimgraph: compiler-style model compression for ONNX, every rewrite verified on onnxruntime.

The public names below are imported on first use (PEP 562), so `import slimgraph` is cheap: it
imports neither torch (an extra: `slimgraph[torch]`) nor onnxruntime until a function that needs
one is called.

Example:
    >>> import slimgraph as sg
    >>> model = sg.load("model.onnx")  # doctest: +SKIP
    >>> sg.save(model, "copy.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from slimgraph.errors import (
    BadDataError,
    BadInputError,
    BadOptionError,
    InvalidModelError,
    MissingExtraError,
    ModelLoadError,
    SlimgraphError,
    UnsafeModelError,
    UnsupportedModelError,
    VerificationError,
)

if TYPE_CHECKING:
    from slimgraph.ir import from_torch, from_torch_causal_lm, load, save
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
    from slimgraph.runtime.generate import GenerateResult, generate
    from slimgraph.tools.sweep import sweep

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "load",
    "save",
    "from_torch",
    "from_torch_causal_lm",
    "generate",
    "GenerateResult",
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
    "MissingExtraError",
    "ModelLoadError",
    "UnsafeModelError",
    "UnsupportedModelError",
    "VerificationError",
]

# Public name -> the module that defines it, imported when the name is first used.
_LAZY: dict[str, str] = {
    "load": "slimgraph.ir",
    "save": "slimgraph.ir",
    "from_torch": "slimgraph.ir",
    "from_torch_causal_lm": "slimgraph.ir",
    "generate": "slimgraph.runtime.generate",
    "GenerateResult": "slimgraph.runtime.generate",
    "compare": "slimgraph.runtime",
    "benchmark": "slimgraph.runtime",
    "random_feeds": "slimgraph.runtime",
    "optimize": "slimgraph.passes.pipeline",
    "quantize": "slimgraph.passes.quantize",
    "report_of": "slimgraph.passes.quantize",
    "prune": "slimgraph.passes.prune",
    "prune_with_report": "slimgraph.passes.prune",
    "factorize": "slimgraph.passes.lowrank",
    "factorize_with_report": "slimgraph.passes.lowrank",
    "convert_fp16": "slimgraph.passes.precision",
    "sensitivity": "slimgraph.passes.sensitivity",
    "check_budget": "slimgraph.runtime.budget",
    "budget_search_of": "slimgraph.passes.quantize.api",
    "finetune": "slimgraph.runtime.finetune",
    "finetune_with_report": "slimgraph.runtime.finetune",
    "FinetuneReport": "slimgraph.runtime.finetune",
    "sweep": "slimgraph.tools.sweep",
}
# Subpackages reachable as attributes (`sg.runtime.calibrated_ranges`) without importing them.
_SUBPACKAGES = ("errors", "ir", "passes", "runtime", "tools")


def __getattr__(name: str) -> Any:
    """Import a public name (or a subpackage) on first use; later lookups find it bound."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


# Names this module uses for its own machinery, left out of `dir(slimgraph)`.
_MACHINERY = frozenset({"Any", "TYPE_CHECKING", "importlib", "_LAZY", "_SUBPACKAGES", "_MACHINERY"})


def __dir__() -> list[str]:
    """The public names, imported or not, and what this module already holds."""
    return sorted((set(globals()) - _MACHINERY) | set(__all__) | set(_SUBPACKAGES))
