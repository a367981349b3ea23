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
    from slimgraph.api.auto import AutoOptions, AutoResult, auto, auto_with_report
    from slimgraph.api.budget import SensitivityTable, check_budget
    from slimgraph.api.factorize import FactorizeOptions, factorize, factorize_with_report
    from slimgraph.api.finetune import (
        FinetuneOptions,
        FinetuneReport,
        finetune,
        finetune_with_report,
    )
    from slimgraph.api.optimize import OptimizeOptions, optimize, optimize_with_report
    from slimgraph.api.prune import PruneOptions, prune, prune_with_report
    from slimgraph.api.quantize import (
        QuantizeOptions,
        QuantizeReport,
        budget_search_of,
        quantize,
        quantize_with_report,
        report_of,
    )
    from slimgraph.api.sensitivity import SensitivityOptions, sensitivity
    from slimgraph.api.sweep import SweepOptions, SweepResult, sweep
    from slimgraph.ir import from_torch, from_torch_causal_lm, load, save
    from slimgraph.passes.lowrank import FactorizeReport
    from slimgraph.passes.pipeline import PipelineResult
    from slimgraph.passes.precision import convert_fp16
    from slimgraph.passes.prune import PruneReport
    from slimgraph.runtime import benchmark, compare, random_feeds
    from slimgraph.runtime.budget import Budget
    from slimgraph.runtime.generate import GenerateResult, generate

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
    "optimize_with_report",
    "OptimizeOptions",
    "PipelineResult",
    "quantize",
    "quantize_with_report",
    "QuantizeOptions",
    "QuantizeReport",
    "report_of",
    "budget_search_of",
    "prune",
    "prune_with_report",
    "PruneOptions",
    "PruneReport",
    "factorize",
    "factorize_with_report",
    "FactorizeOptions",
    "FactorizeReport",
    "convert_fp16",
    "sensitivity",
    "SensitivityOptions",
    "SensitivityTable",
    "check_budget",
    "Budget",
    "finetune",
    "finetune_with_report",
    "FinetuneOptions",
    "FinetuneReport",
    "sweep",
    "SweepOptions",
    "SweepResult",
    "auto",
    "auto_with_report",
    "AutoOptions",
    "AutoResult",
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
    "convert_fp16": "slimgraph.passes.precision",
    "Budget": "slimgraph.runtime.budget",
    "PipelineResult": "slimgraph.passes.pipeline",
    "PruneReport": "slimgraph.passes.prune",
    "FactorizeReport": "slimgraph.passes.lowrank",
    **dict.fromkeys(("optimize", "optimize_with_report", "OptimizeOptions"),
                    "slimgraph.api.optimize"),
    **dict.fromkeys(("quantize", "quantize_with_report", "QuantizeOptions", "QuantizeReport",
                     "report_of", "budget_search_of"), "slimgraph.api.quantize"),
    **dict.fromkeys(("prune", "prune_with_report", "PruneOptions"), "slimgraph.api.prune"),
    **dict.fromkeys(("factorize", "factorize_with_report", "FactorizeOptions"),
                    "slimgraph.api.factorize"),
    **dict.fromkeys(("sensitivity", "SensitivityOptions"), "slimgraph.api.sensitivity"),
    **dict.fromkeys(("check_budget", "SensitivityTable"), "slimgraph.api.budget"),
    **dict.fromkeys(("finetune", "finetune_with_report", "FinetuneOptions", "FinetuneReport"),
                    "slimgraph.api.finetune"),
    **dict.fromkeys(("sweep", "SweepOptions", "SweepResult"), "slimgraph.api.sweep"),
    **dict.fromkeys(("auto", "auto_with_report", "AutoOptions", "AutoResult"),
                    "slimgraph.api.auto"),
}
# Subpackages reachable as attributes (`sg.runtime.calibrated_ranges`) without importing them.
_SUBPACKAGES = ("errors", "ir", "passes", "runtime", "api", "tools")


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
