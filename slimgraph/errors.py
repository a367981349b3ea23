"""The exception hierarchy: every error slimgraph raises on purpose is a `SlimgraphError`.

The command line maps the two branches to exit codes (docs/contract.md, "Command line"):
`BadInputError` (the user's model, data or options are wrong) exits 2 with its one-line message;
everything else (`VerificationError`, an unexpected failure) exits 1.

A message that names an option is worded for where it is read: `str(error)` in Python terms
(`data=`), `error.cli_message` in command-line terms (`--data VAL.npz`), which the command line
prints. `SlimgraphError.worded` builds both from one template:

    >>> error = BadOptionError.worded("a budget needs {data}", data=("data=", "--data VAL.npz"))
    >>> str(error), error.cli_message
    ('a budget needs data=', 'a budget needs --data VAL.npz')
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Self

__all__ = [
    "Term",
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
    "first_line",
    "message_line",
]


# An option as a message names it: (Python wording, command-line wording), e.g.
# ("max_drop=0.01", "--max-drop 0.01").
Term = tuple[str, str]


class SlimgraphError(Exception):
    """Base class of all errors raised on purpose by slimgraph.

    Args:
        message: the message in Python terms (what `str(error)` gives).
        cli: the same message in command-line terms, when it names options; None: `message`
            reads the same on both sides.
    """

    exit_code = 1

    def __init__(self, message: str = "", *args: object, cli: str | None = None) -> None:
        super().__init__(message, *args)
        self._cli = cli

    @property
    def cli_message(self) -> str:
        """The message as the command line prints it (option names as flags)."""
        return self._cli if self._cli is not None else str(self)

    @classmethod
    def worded(cls, template: str, **terms: str | Term) -> Self:
        """The error with `template` filled twice: a `Term` pair gives its first wording to
        `str(error)` and its second to `cli_message`; a plain string fills both.

        Example:
            >>> BadOptionError.worded("{opt} needs labels", opt=("max_drop=", "--max-drop"))
            BadOptionError('max_drop= needs labels')
        """
        return cls(_fill(template, terms, 0), cli=_fill(template, terms, 1))


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


def _fill(template: str, terms: Mapping[str, str | Term], side: int) -> str:
    return template.format(**{k: v if isinstance(v, str) else v[side] for k, v in terms.items()})


class VerificationError(SlimgraphError):
    """A rewrite changed the model's outputs beyond what it promised."""


# Terminal colour codes (torch.export's banners are coloured) and onnxruntime's message prefix.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ORT_PREFIX = "[ONNXRuntimeError] : "


def first_line(error: BaseException, *, named: bool = False) -> str:
    """The first line of an error's message, as one clean line for a message of ours.

    Terminal colour codes and onnxruntime's `[ONNXRuntimeError] : ` prefix are removed, runs of
    white space become one space, and blank lines are passed over. A blank message gives the
    exception's class name.

    Args:
        error: the exception (a library's: onnx, onnxruntime, torch.export, yaml, ...).
        named: prefix the class name (`ValueError: bad shape`), for causes whose type says
            something.

    Example:
        >>> first_line(ValueError("bad shape\\nTraceback ..."), named=True)
        'ValueError: bad shape'
    """
    text = message_line(str(error))
    name = type(error).__name__
    if not text:
        return name
    return f"{name}: {text}" if named else text


def message_line(text: str) -> str:
    """The first non-blank line of `text`, cleaned as `first_line` cleans it ('' for none)."""
    for line in _ANSI.sub("", text).replace(_ORT_PREFIX, "").splitlines():
        if cleaned := " ".join(line.split()):
            return cleaned
    return ""
