"""What the commands share: their common arguments and the run of a command that rewrites a model.

The MODEL/OUT arguments, `--json`, the speed guard's options, and the run of quantize, prune,
factorize and optimize.

`Compression` is that run, in one place: refuse to write over the input, check `--report DIR`,
load MODEL, build the accuracy-budget judge (`budget_args`), then, once the command has made its
model, time it against MODEL as `slimgraph optimize` writes it by default (the speed guard,
`runtime.speed_guard`, with `api._speed.guard_speed`'s baseline; `optimize` against MODEL
itself: a result slower beyond noise is refused, exit 1, unless `--allow-slower`), write OUT
atomically, print the text (or one JSON object with `--json`) and write the report, whose
"before/after" figures (size, parameters, MACs, and the speed check's latency ratios) it
measures itself. A command that fails after
writing OUT (its --data turns out not to fit, say) leaves no OUT behind: the command line runs
every command inside `outputs_removed_on_failure`.

Example:
    >>> def run(args):  # doctest: +SKIP
    ...     job = Compression(args)
    ...     result = compress(job.model, budget=job.budget)
    ...     job.write(result)
    ...     return job.finish({"output": str(job.target)}, f"wrote {job.target}")
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

import slimgraph.ir as sg_ir
from slimgraph._tables import emit, to_json
from slimgraph.api._speed import guard_speed
from slimgraph.errors import OutputPathError
from slimgraph.runtime.budget import Budget
from slimgraph.runtime.feeds import check_batch
from slimgraph.runtime.metrics import Evaluation, LabelledData, load_data
from slimgraph.runtime.speed_guard import SpeedCheck, guard_batches
from slimgraph.tools.budget_args import describe_evaluation, judge_from_args
from slimgraph.tools.report import (
    before_after,
    check_report_dir,
    command_line,
    model_figures,
    write_report,
)

__all__ = [
    "add_model_arguments",
    "add_json_option",
    "add_speed_arguments",
    "print_result",
    "output_paths",
    "Compression",
    "Figures",
]

# `before_after`'s pair: summary figures ("size": "1.2 MB -> 0.3 MB (0.25x)") and the ratio plot.
Figures = tuple[dict[str, str], dict[str, Any]]


def add_model_arguments(
    parser: argparse.ArgumentParser, model_help: str = "the .onnx model", *, output: bool = True
) -> None:
    """Add the positional `MODEL` and (with `output`) the required `-o/--output OUT`."""
    parser.add_argument("model", metavar="MODEL", help=model_help)
    if output:
        parser.add_argument("-o", "--output", required=True, metavar="OUT",
                            help="the output .onnx")  # fmt: skip


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """Add `--json`: print one JSON object instead of the text."""
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_speed_arguments(parser: argparse.ArgumentParser, *, batch: bool = True) -> None:
    """Add the speed guard's options: `--allow-slower`, `--no-speed-check` and (with `batch`;
    a command with a `--batch` of its own passes False and the guard reads that one) `--batch N`.
    """
    group = parser.add_argument_group("speed check (the output timed against MODEL on "
                                      "onnxruntime before it is written)")
    if batch:
        group.add_argument("--batch", type=int, default=None, metavar="N",
                           help="the batch size the speed check times at (default 1 and 64)")
    else:  # the command's own --batch means more: the guard times at it only where it can
        parser.set_defaults(batch_shared=True)
    group.add_argument("--allow-slower", dest="allow_slower", action="store_true",
                       help="write the output even when it runs slower than MODEL beyond noise "
                       "(the figures are printed)")
    group.add_argument("--no-speed-check", dest="speed_check", action="store_false",
                       help="do not time the output against MODEL (a few seconds)")


def print_result(args: argparse.Namespace, data: object, text: str) -> int:
    """Print `data` as one JSON object with `--json`, else `text`; returns the exit code 0."""
    emit(to_json(data) if args.json else text)
    return 0


def _same_file(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def output_paths(
    args: argparse.Namespace, inputs: Iterable[tuple[str | None, str]] = ()
) -> tuple[Path, Path]:
    """`args.model` and `args.output` as paths, never the same file.

    Args:
        args: parsed arguments with `model` and `output`.
        inputs: other (path or None, what) inputs OUT must not overwrite either, e.g.
            `[(args.teacher, "the teacher")]`.

    Raises:
        OutputPathError: OUT is MODEL ("refusing to write over the input model") or one of
            `inputs`.
    """
    source, target = Path(args.model), Path(args.output)
    for path, what in (str(source), "the input model"), *inputs:
        if path and _same_file(target, Path(path)):
            raise OutputPathError(f"{target}: refusing to write over {what}")
    return source, target


# OUT files `Compression.write` wrote in this process, newest last: `outputs_removed_on_failure`
# removes those a failing command wrote.
_WRITTEN: list[Path] = []


@contextlib.contextmanager
def outputs_removed_on_failure() -> Iterator[None]:
    """Run a command; if it raises, remove the OUT files (and their external data) it wrote, so a
    failed command leaves no output behind (docs/contract.md, "Errors")."""
    start = len(_WRITTEN)
    try:
        yield
    except BaseException:
        for path in _WRITTEN[start:]:
            for written in (path, path.with_name(path.name + ".data")):
                written.unlink(missing_ok=True)
        raise
    finally:
        del _WRITTEN[start:]


class Compression:
    """One run of a command that reads MODEL and writes OUT (see the module docstring).

    Args:
        args: parsed arguments: `model`, `output`, `report`, `json` and the budget options
            (`max_drop`, `min_cosine`, `data`, `labels`).
        check: the command's own option checks, run after the output path check and before
            `--report DIR` is checked and the model is loaded.
        data_for_budget: `--data` exists only for the budget (`judge_from_args`).

    Attributes:
        source, target: MODEL and OUT.
        model: MODEL, loaded.
        judge: the budget judge, or None without `--max-drop`/`--min-cosine`.

    Raises:
        OutputPathError: OUT is MODEL.
        BadOptionError: from `check`, `--report DIR`, or the budget options.
        BadInputError: MODEL cannot be loaded; `--data` does not fit it.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        *,
        check: Callable[[], None] | None = None,
        data_for_budget: bool = True,
        optimized_baseline: bool = True,
    ) -> None:
        self.args = args
        # the speed guard judges against MODEL as `optimize` writes it (False: MODEL itself)
        self.optimized_baseline = optimized_baseline
        self.source, self.target = output_paths(args)
        if check is not None:
            check()
        self.report_dir = check_report_dir(args.report)
        self.model: ir.Model = sg_ir.load(self.source)
        self.judge = judge_from_args(args, self.model, data_for_budget=data_for_budget)
        self.result: ir.Model | None = None
        # --data is checked against MODEL now, before the command spends time compressing
        self._data = (None if not getattr(args, "data", None) or self.judge is not None
                      else load_data(args.data, self.model, labels=args.labels))
        self.speed: SpeedCheck | None = None
        self.speed_batch: int | None = getattr(args, "batch", None)
        # a bad --batch fails here, before any work; a command's own --batch (quantize's
        # calibration rows) too: a fixed batch other than it would leave it silently unused
        if getattr(args, "batch_shared", False) and self.speed_batch is not None:
            check_batch(self.model, self.speed_batch, label=str(self.source))
        if getattr(args, "speed_check", False):
            guard_batches(self.model, self.speed_batch)

    @property
    def budget(self) -> Budget | None:
        """The budget a compression searches under, or None."""
        return None if self.judge is None else self.judge.budget

    @property
    def budget_data(self) -> LabelledData | None:
        """The budget's validation data, or None without a budget."""
        return None if self.judge is None else self.judge.data

    def data(self) -> LabelledData | None:
        """`--data` for the model (the budget's, already loaded, when there is one), or None."""
        if not self.args.data:
            return None
        if self.judge is not None:
            return self.judge.data
        return self._data

    def write(self, result: ir.Model) -> None:
        """Time `result` against MODEL in the form `slimgraph optimize` writes it by default
        (`api._speed.guard_speed`; MODEL itself for `optimize`), unless `--no-speed-check`,
        then write it to OUT (atomically).

        Raises:
            VerificationError: `result` is slower than that baseline beyond noise, without
                `--allow-slower`; nothing is written.
        """
        if getattr(self.args, "speed_check", False):
            self.speed = guard_speed(self.model, result, batches=self.speed_batch,
                                     allow_slower=self.args.allow_slower,
                                     optimized_baseline=self.optimized_baseline)
        sg_ir.save(result, self.target)
        _WRITTEN.append(self.target)
        self.result = result

    def finish(
        self,
        data: dict[str, object],
        text: str,
        page: Callable[[Figures], dict[str, object]] | None = None,
    ) -> int:
        """Write `--report DIR` (the page built from the before/after figures), print `text`
        or `data` as JSON; returns the exit code 0. The speed check's figures are added to all
        three (`speed_check` in the JSON, one line of text, a summary figure and a table)."""
        if self.speed is not None:
            data["speed_check"] = self.speed.to_dict()
            text = f"{text}\n{self.speed.line()}"
        if self.report_dir is not None and page is not None:
            after = self.model if self.result is None else self.result
            figures = before_after(model_figures(self.model, self.source),
                                   model_figures(after, self.target))  # fmt: skip
            content = page(figures)
            if self.speed is not None:
                _add_speed(content, self.speed)
            write_report(self.report_dir, content, text=text)
        return print_result(self.args, data, text)

    def budget_lines(self, evaluation: Evaluation | None, search: Any = None) -> list[str]:
        """The lines a command prints when the accuracy budget held: the search's summary (when
        a search ran) and the measured figures; none without a budget or an evaluation."""
        if self.judge is None or evaluation is None:
            return []
        searched = [] if search is None else [search.summary()]
        return searched + [describe_evaluation(evaluation, self.judge)]

    def page(
        self,
        title: str,
        *,
        summary: dict[str, object],
        plots: Sequence[dict[str, object]],
        tables: Sequence[dict[str, object]],
        result: dict[str, object],
    ) -> dict[str, object]:
        """The `--report` dict (tools.report schema): `title` and MODEL's file name as heading,
        the command as typed, and the command's figures, plots, tables and JSON result."""
        return {"title": f"{title} {self.source.name}", "command": command_line(self.args),
                "summary": summary, "plots": list(plots), "tables": list(tables),
                "result": result}


def _add_speed(page: dict[str, Any], speed: SpeedCheck) -> None:
    """The speed check in a `--report` page: a summary figure per batch and the table."""
    summary = page.setdefault("summary", {})
    for b in speed.batches:
        summary[f"latency at batch {b.batch}"] = f"{b.ratio:.2f}x ({b.low:.2f}-{b.high:.2f})"
    page.setdefault("tables", []).append(speed.table())
    page.setdefault("notes", []).append(speed.line())
