"""Optional dependencies: the one place that imports them on demand and names their extra.

slimgraph's core needs no torch. `from_torch`, training (finetune, QAT, knowledge distillation)
and zero-shot calibration do, and call `require_torch()` before their first torch import, so a
user without torch gets one clear `MissingExtraError` naming the extra to install instead of a
`ModuleNotFoundError` from deep inside the torch backend.

Example:
    >>> from slimgraph._optional import require_torch
    >>> torch = require_torch()  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from slimgraph.errors import MissingExtraError

__all__ = ["require", "require_torch", "missing_message", "TORCH_MISSING"]



def missing_message(module: str, extra: str) -> str:
    """The one line shown when `module` (from the extra `slimgraph[extra]`) is not installed."""
    return f"{module} is not installed: pip install 'slimgraph[{extra}]'"


TORCH_MISSING = missing_message("torch", "torch")


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, which the extra `slimgraph[extra]` installs.

    Args:
        module: the top-level module name, e.g. "torch".
        extra: the name of the extra in pyproject.toml that brings it.

    Returns:
        The imported module.

    Raises:
        MissingExtraError: `module` is not installed (or was made unimportable):
            "MODULE is not installed: pip install 'slimgraph[EXTRA]'". A module that is
            installed but fails to import for another reason raises its own error unchanged.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise  # installed, but one of its own imports is missing: not ours to rename
        raise MissingExtraError(missing_message(module, extra), extra=extra) from None


def require_torch() -> ModuleType:
    """The `torch` module, or the one error that names the `slimgraph[torch]` extra.

    When torch is not loaded yet, `OMP_WAIT_POLICY` is set to PASSIVE unless the environment
    sets it: waiting OpenMP threads then sleep instead of spinning, which on shared cores is
    the difference between a usable and a 10-20x slower training loop.

    Returns:
        The imported `torch` module.

    Raises:
        MissingExtraError: torch is not installed (message `TORCH_MISSING`; exit code 2 on the
            command line).
    """
    if "torch" not in sys.modules:
        # torch's OpenMP threads spin while they wait by default: on cores other work keeps
        # busy, a fine-tuning epoch of a small CNN took 7.3 s on 2 threads against 0.76 s with
        # passive waiting (0.32 s on 1 thread). Read once, when torch loads; a value the user
        # set stays.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return require("torch", "torch")
