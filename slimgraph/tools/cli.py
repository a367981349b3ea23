"""The `slimgraph` command line: one subcommand per module in `COMMAND_MODULES`.

Exit codes (docs/contract.md): 0 success; 2 bad usage or bad input (one line on stderr, no
traceback unless `--debug`); 1 verification failure or internal error.

A command module defines `register(subparsers)`, which adds its parser and sets `handler` to a
function taking the parsed arguments and returning an exit code. The global options (`--debug`,
`-v/--verbose`) are accepted before or after the command's name: every command's parser takes
them too (`add_global_options`).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from slimgraph.errors import SlimgraphError
from slimgraph.tools._common import outputs_removed_on_failure

__all__ = ["main", "build_parser", "COMMAND_MODULES"]

# Subcommands, in the order `slimgraph --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "slimgraph.tools.inspect_cmd",
    "slimgraph.tools.diff_cmd",
    "slimgraph.tools.compare_cmd",
    "slimgraph.tools.bench_cmd",
    "slimgraph.tools.generate_cmd",
    "slimgraph.tools.optimize_cmd",
    "slimgraph.tools.quantize_cmd",
    "slimgraph.tools.prune_cmd",
    "slimgraph.tools.demo_cmd",
    "slimgraph.tools.convert_cmd",
    "slimgraph.tools.factorize_cmd",
    "slimgraph.tools.sensitivity_cmd",
    "slimgraph.tools.finetune_cmd",
    "slimgraph.tools.sweep_cmd",
    "slimgraph.tools.auto_cmd",
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not the whole usage block,
    and options are never abbreviated (`--rat 0.5` is not silently `--ratio 0.5`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _unrecognized(parser: argparse.ArgumentParser, command: str, extra: Sequence[str]) -> str:
    """One line naming arguments the command does not take, with the closest option it does."""
    sub = next(
        action.choices[command] for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )  # fmt: skip
    known = [option for action in sub._actions for option in action.option_strings]
    hints = []
    for item in extra:
        if item.startswith("-"):
            close = difflib.get_close_matches(item.split("=")[0], known, n=1, cutoff=0.6)
            if close:
                hints.append(f"{item.split('=')[0]}: did you mean {close[0]}?")
    hint = f" ({'; '.join(hints)})" if hints else ""
    listed = " ".join(extra)
    return f"{sub.prog}: error: unrecognized arguments: {listed}{hint} (see {sub.prog} --help)"


class _UserFormatter(logging.Formatter):
    """Without -v/--debug: a note reads "note: ...", anything else "warning: ...", no logger
    names (those come with -v)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if message.startswith("note:") else f"warning: {message}"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slimgraph")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def add_global_options(parser: argparse.ArgumentParser, *, default: object = False) -> None:
    """`--debug` and `-v/--verbose`. A command's parser gets them with `default=SUPPRESS`, so a
    flag given before the command's name is not reset by the command's own defaults."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log what each step does")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="slimgraph",
        description=(
            "Compress ONNX models (fuse, quantize, prune, factorize), every rewrite verified."
        ),
    )
    parser.add_argument("--version", action="version", version=f"slimgraph {_version()}")
    add_global_options(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    for command in subparsers.choices.values():
        add_global_options(command, default=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        print(_unrecognized(parser, args.command, extra), file=sys.stderr)
        return 2
    args.argv = argv  # the command as typed, for reports
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    handler = logging.StreamHandler()  # notes and warnings for the user; a log with -v/--debug
    handler.setFormatter(_UserFormatter() if level == logging.WARNING
                         else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    try:
        with outputs_removed_on_failure():
            return int(args.handler(args) or 0)
    except SlimgraphError as error:
        if args.debug:
            traceback.print_exc()
        print(f"slimgraph {args.command}: error: {error.cli_message}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"slimgraph {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # an internal error: one line, the traceback only with --debug
        if args.debug:
            traceback.print_exc()
        print(
            f"slimgraph {args.command}: internal error: {type(error).__name__}: {error} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
