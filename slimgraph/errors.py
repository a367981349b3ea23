"""The exception hierarchy: every error slimgraph raises on purpose is a `SlimgraphError`.

The command line maps the two branches to exit codes (DESIGN.md section 7): `BadInputError`
(the user's model, data or options are wrong) exits 2 with its one-line message; everything else
(`VerificationError`, an unexpected failure) exits 1.
"""

from __future__ import annotations

__all__ = [
    "SlimgraphError",
    "BadInputError",
    "ModelLoadError",
    "UnsafeModelError",
    "InvalidModelError",
    "BadDataError",
    "BadOptionError",
    "UnsupportedModelError",
    "OutputPathError",
    "MissingExtraError",
    "VerificationError",
]


class SlimgraphError(Exception):
    """Base class of all errors raised on purpose by slimgraph."""

    exit_code = 1


class BadInputError(SlimgraphError):
    """The user's model, data or options are wrong: exit code 2, one clear line."""

    exit_code = 2


class ModelLoadError(BadInputError):
    """A model file cannot be read: missing, empty, truncated, or not an ONNX protobuf."""


class UnsafeModelError(ModelLoadError):
    """A model file points outside its folder or at data that does not match (external data)."""


class InvalidModelError(ModelLoadError):
    """A model parses but its graph is not valid: cycles, dangling inputs, duplicate names,
    opsets."""


class BadDataError(BadInputError):
    """Sample, calibration or evaluation data does not fit the model, or holds NaN/Inf."""


class BadOptionError(BadInputError):
    """An option is impossible (ratio outside its range, unknown layer name, ...)."""


class UnsupportedModelError(BadInputError):
    """The model is valid but the requested transformation cannot apply to it."""


class OutputPathError(BadInputError):
    """The output path cannot be written (it is the input model, or its folder is missing)."""


class MissingExtraError(BadInputError):
    """An optional dependency is not installed: the message names the extra that brings it.

    The core (load, optimize, quantize, prune, factorize, inspect) needs no extra; `from_torch`,
    training and zero-shot calibration need `slimgraph[torch]` (see `slimgraph._optional`).

    Attributes:
        extra: the extra to install, e.g. "torch".
    """

    def __init__(self, message: str, *, extra: str) -> None:
        super().__init__(message)
        self.extra = extra


class VerificationError(SlimgraphError):
    """A rewrite changed the model's outputs beyond what it promised."""
