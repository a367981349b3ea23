"""Pipelines built from data: named passes, run by onnx_ir's `PassManager`, each verified.

A pipeline is a list of steps; a step is a registered pass name (`"fuse-batchnorm"`), a preset name
that expands to its steps (`"lossless"`), or a dict `{"name": ..., **options}` whose options go to
the pass's keyword-only constructor (the keys `min_cosine` and `max_drop`
are the pipeline's, see below). Recipes
are the same list in a YAML or JSON file, either bare or under a `steps:` (or `passes:`) key next to
`version: 1` (`RECIPE_SCHEMA`, `passes.recipe`). Command names work as step names (`factorize`,
`quantize`, `convert`, `prune`) and options may be spelt as on the command line
(`rank-ratio: 0.5`); an unknown option is named with what the pass takes. `describe_passes()`
lists everything.

The built steps run inside one `onnx_ir.passes.PassManager`, each wrapped in an instrumentation
pass that records its time, node counts before and after, whether it changed the model and which
nodes it skipped. With `verify=True` the model runs on onnxruntime before the first pass and
after every pass that changed it, on the same sample feeds (the user's, or inputs generated to
drive the model: `runtime.feeds.driving_feeds`); each pass's outputs are compared with
the outputs of the model it received; whether a pass is exact comes from its registration
(`passes.registry.PassInfo`); `runtime.verify` compares the outputs:

- an exact pass must keep every output within `rtol * |ref| + atol * max(1, max|ref|)`
  (default rtol 1e-4, atol 1e-5; at least 4 ulps for fp16/bf16 outputs) and integer, bool and
  string outputs equal, sequences element by element (`runtime.exact`), else
  `VerificationError` names it;
- an approximate pass reports fidelity (cosine, SQNR, max abs error) and fails only when a
  `min_cosine` is given and the worst output's cosine falls below it, or when a `max_drop` is
  given (with labelled `data`) and the metric on `data` (top-1 accuracy) has dropped by more
  than that since the pipeline's input model (`runtime.budget`).

onnxruntime (`slimgraph.runtime`) is imported only when a pipeline verifies or judges.

Adding a pass to the registry is one line: `@register_pass("name", exact=...)` on its class (and
its module in `registry.PASS_MODULES`, once per family).

Example:
    >>> result = run_pipeline(model, ["cleanup", "fuse-batchnorm"], verify=True)  # doctest: +SKIP
    >>> for record in result.records:  # doctest: +SKIP
    ...     print(record.describe())
"""

from __future__ import annotations

import difflib
import inspect
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from slimgraph._tables import render_table
from slimgraph.errors import BadOptionError, SlimgraphError, VerificationError, first_line
from slimgraph.ir import copy_model, metadata
from slimgraph.ir.analysis import check_finite_weights
from slimgraph.passes.base import SlimgraphPassResult
from slimgraph.passes.recipe import RECIPE_SCHEMA, RECIPE_VERSION, known_names, load_recipe
from slimgraph.passes.registry import (
    COMMAND_STEPS,
    INTERNAL_OPTIONS,
    OPTION_SYNONYMS,
    PASS_MODULES,
    PASSES,
    PRESETS,
    REQUIRED,
    PassInfo,
    cli_option,
    describe_passes,
    ensure_registered,
    pass_options,
    register_pass,
    register_preset,
)

if TYPE_CHECKING:
    from slimgraph.runtime import Fidelity
    from slimgraph.runtime.budget import Evaluator
    from slimgraph.runtime.metrics import LabelledData
    from slimgraph.runtime.verify import Verifier

__all__ = [
    "PASSES",
    "PASS_MODULES",
    "PRESETS",
    "register_pass",
    "register_preset",
    "COMMAND_STEPS",
    "RECIPE_SCHEMA",
    "RECIPE_VERSION",
    "pass_options",
    "describe_passes",
    "Step",
    "build_pipeline",
    "load_recipe",
    "PassRecord",
    "PipelineResult",
    "run_pipeline",
    "node_count",
]

logger = logging.getLogger(__name__)


# Step keys the pipeline reads itself; every other key is an option of the pass.
_PIPELINE_KEYS = ("name", "min_cosine", "max_drop")


@dataclass(frozen=True)
class Step:
    """One built pipeline step: a pass instance, its registered name and its options.

    `info` holds the traits the pass was registered with (looked up by `name` when not given).
    """

    name: str
    pass_: ir.passes.PassBase
    options: Mapping[str, Any]
    min_cosine: float | None = None
    max_drop: float | None = None
    info: PassInfo | None = None

    @property
    def traits(self) -> PassInfo:
        """The registration of this step's pass."""
        return self.info if self.info is not None else PASSES.info(self.name)

    @property
    def exact(self) -> bool:
        return self.traits.exact

    @property
    def metadata_only(self) -> bool:
        return self.traits.metadata_only


def _command_steps(
    name: str, options: dict[str, Any], context: Mapping[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """A command name used as a step: the passes it runs, with their share of the options."""
    command = COMMAND_STEPS[name]
    if name == "factorize":
        linear_pass, conv_pass = command.passes
        _check_options(
            "factorize", PASSES.info(linear_pass), options, extra={"pointwise_convs": False}
        )
        linear = {k: v for k, v in options.items() if k != "pointwise_convs"}
        conv = dict(linear)
        if "pointwise_convs" in options:
            conv["pointwise"] = options["pointwise_convs"]
        if not any(k in options for k in ("rank_ratio", "energy", "error_budget", "rank")):
            raise BadOptionError(
                "recipe step 'factorize': give a rank rule: rank-ratio, energy, error-budget or "
                "rank (auto or an integer)"
            )
        return [(linear_pass, linear), (conv_pass, conv)]
    if name == "quantize":
        rest = {k: v for k, v in options.items() if k != "mode"}
        mode = options.get("mode") or "static"  # as the `quantize` pass (and the int8 preset)
        if mode not in command.modes:
            raise BadOptionError(
                f"recipe step 'quantize': mode must be static, dynamic or weight-only, got "
                f"{mode!r}"
            )
        return [(command.modes[mode], rest)]
    if name == "convert":
        rest = {k: v for k, v in options.items() if k != "fp16"}
        if options.get("fp16", True) is not True:
            raise BadOptionError("recipe step 'convert': only fp16 conversion exists (fp16: true)")
        return [(pass_name, rest) for pass_name in command.passes]
    return [(pass_name, options) for pass_name in command.passes]


def _check_options(
    name: str,
    info: PassInfo,
    options: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Unknown or missing options, named in command-line spelling with what the pass takes."""
    if info.options is None:
        return
    accepted = {**info.options, **(extra or {})}
    where = name if name.startswith("'") else f"'{name}'"
    shown = ", ".join(cli_option(k) for k in accepted if k not in INTERNAL_OPTIONS) or (
        "no options"
    )
    for key in options:
        if key not in accepted:
            close = difflib.get_close_matches(key, list(accepted), n=1)
            hint = f" (did you mean '{cli_option(close[0])}'?)" if close else ""
            raise BadOptionError(
                f"recipe step {where}: unknown option '{cli_option(key)}'{hint}; it takes: "
                f"{shown}"
            )
    missing = [
        k for k, default in accepted.items()
        if default is REQUIRED and k not in options
    ]  # fmt: skip
    if missing:
        raise BadOptionError(
            f"recipe step {where}: option '{cli_option(missing[0])}' is required; it takes: "
            f"{shown}"
        )


def build_pipeline(
    steps: Sequence[str | Mapping[str, Any]], *, context: Mapping[str, Any] | None = None
) -> list[Step]:
    """Instantiate the passes of a pipeline described as data.

    Args:
        steps: pass or preset names, or dicts `{"name": ..., **options}`.
        context: run-time values (e.g. `calibration` data) given to every pass whose constructor
            takes a keyword of that name, unless the step sets it itself.

    Raises:
        BadOptionError: an unknown name (the message lists the known ones), a malformed step, or
            options the pass does not take.
    """
    ensure_registered()
    if isinstance(steps, (str, Mapping)) or not isinstance(steps, Sequence):
        raise BadOptionError(f"a pipeline is a list of steps, got {type(steps).__name__}")
    built: list[Step] = []
    for step in steps:
        built.extend(_build_step(step, depth=0, context=context or {}))
    if not built:
        raise BadOptionError("the pipeline has no steps")
    return built


def _build_step(
    step: str | Mapping[str, Any], depth: int, context: Mapping[str, Any]
) -> list[Step]:
    if depth > 8:
        raise BadOptionError("presets nest too deeply (a preset that names itself?)")
    options: dict[str, Any] = {}
    if isinstance(step, str):
        name, min_cosine, max_drop = step, None, None
    elif isinstance(step, Mapping):
        if not isinstance(step.get("name"), str):
            raise BadOptionError(f"pipeline step {dict(step)!r} has no 'name'")
        name = step["name"]
        for key, value in step.items():
            key = str(key).replace("-", "_")
            if key not in _PIPELINE_KEYS:
                options[OPTION_SYNONYMS.get(key, key)] = value
        min_cosine = step.get("min_cosine")
        if min_cosine is not None and not isinstance(min_cosine, (int, float)):
            raise BadOptionError(f"step '{name}': min_cosine must be a number, got {min_cosine!r}")
        max_drop = step.get("max_drop")
        if max_drop is not None and not isinstance(max_drop, (int, float)):
            raise BadOptionError(f"step '{name}': max_drop must be a number, got {max_drop!r}")
    else:
        raise BadOptionError(f"a pipeline step is a name or a dict, got {step!r}")
    if name in PRESETS and name not in PASSES:
        if options:
            raise BadOptionError(f"preset '{name}' takes no options (got {sorted(options)})")
        expanded: list[Step] = []
        for inner in PRESETS[name]:
            expanded.extend(_build_step(inner, depth + 1, context))
        return expanded
    if name in COMMAND_STEPS and (name not in PASSES or name == "quantize"):
        resolved = _command_steps(name, options, context)
    else:
        resolved = [(name, options)]
    built = []
    for pass_name, pass_options_ in resolved:
        label = f"'{name}'" if pass_name == name else f"'{name}' (pass '{pass_name}')"
        built.append(_instantiate(pass_name, pass_options_, context, min_cosine, label, max_drop))
    return built


def _instantiate(
    name: str,
    options: dict[str, Any],
    context: Mapping[str, Any],
    min_cosine: Any,
    label: str | None = None,
    max_drop: Any = None,
) -> Step:
    if name not in PASSES:
        raise BadOptionError(f"unknown pass '{name}' (known {known_names()})")
    info = PASSES.info(name)
    cls = info.cls
    _check_options(label or name, info, options)
    accepted = inspect.signature(cls.__init__).parameters
    given = {k: v for k, v in context.items() if k in accepted and k not in options}
    try:
        instance = cls(**options, **given)
    except TypeError as error:
        raise BadOptionError(f"pass '{name}': bad options {sorted(options)} ({error})") from None
    except SlimgraphError:
        raise
    except ValueError as error:
        raise BadOptionError(f"pass '{name}': {error}") from None
    return Step(name, instance, dict(options), None if min_cosine is None else float(min_cosine),
                None if max_drop is None else float(max_drop), info)


@dataclass(frozen=True)
class PassRecord:
    """What one pass did: timing, node counts, skipped nodes and (when verified) fidelity."""

    name: str
    exact: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    modified: bool
    skipped: int
    fidelity: Fidelity | None = None
    verify_seconds: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)
    metadata_only: bool = False

    def describe(self) -> str:
        """One line for logs and the command line."""
        kind = "exact" if self.exact else "approx"
        line = (
            f"{self.name:<24} {kind:<6} nodes {self.nodes_before:>5} -> {self.nodes_after:<5} "
            f"{self.seconds * 1000:8.1f} ms"
        )
        if not self.modified:
            line += "  (no change)"
        elif self.metadata_only:
            line += "  (metadata only)"
        elif self.fidelity is not None:
            worst = max(self.fidelity.outputs, key=lambda o: o.max_abs_error)
            line += (
                f"  verified: max abs err {worst.max_abs_error:.2e}, "
                f"cosine {self.fidelity.worst_cosine:.6f}"
            )
        if self.skipped:
            line += f"  skipped {self.skipped}"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "exact": self.exact,
            "seconds": self.seconds,
            "verify_seconds": self.verify_seconds,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "modified": self.modified,
            "skipped": self.skipped,
            "fidelity": self.fidelity.to_dict() if self.fidelity is not None else None,
            "details": dict(self.details),
            "metadata_only": self.metadata_only,
        }


@dataclass
class PipelineResult(SlimgraphPassResult):
    """The final model, one record per pass, and the fidelity of the end result to the input:
    the report of `slimgraph.optimize` (`optimize_with_report`).

    Attributes:
        records: what each pass did (`PassRecord`).
        fidelity: the end result's outputs against the input model's (verified runs).
        evaluation: the end result's `metrics.Evaluation` when a budget was checked.
        verified: the passes were verified on onnxruntime.
    """

    records: list[PassRecord] = field(default_factory=list)
    fidelity: Fidelity | None = None
    evaluation: Any = None
    verified: bool = False

    def describe(self, *, not_verified: str = "not verified (verify=False)") -> str:
        """The per-pass table (kind, nodes, time, fidelity), the passes' own notes (blocks
        `fuse-attention` left, and why) and a line for the whole run; `not_verified` is what
        that line says of a run without verification."""
        rows = [[r.name, "exact" if r.exact else "approx", f"{r.nodes_before} -> {r.nodes_after}",
                 f"{(r.seconds + r.verify_seconds) * 1000:.0f} ms", _fidelity_cell(r)]
                for r in self.records]  # fmt: skip
        table = render_table(["pass", "kind", "nodes", "time", "fidelity"], rows, align="llrrl")
        notes = [str(r.details["summary"]) for r in self.records if r.details.get("summary")]
        before = self.records[0].nodes_before if self.records else node_count(self.model)
        summary = f"nodes {before} -> {node_count(self.model)}"
        if self.fidelity is not None:
            worst = max(self.fidelity.outputs, key=lambda o: o.max_abs_error)
            summary += (f"; outputs vs input model: max abs err {worst.max_abs_error:.2e}, "
                        f"cosine {self.fidelity.worst_cosine:.6f}")
        elif not self.verified:
            summary += f"; {not_verified}"
        return "\n".join([table, *notes, summary])

    __str__ = describe

    def __repr__(self) -> str:
        changed = sum(r.modified for r in self.records)
        return (f"<PipelineResult: {len(self.records)} passes, {changed} changed the model, "
                f"{'verified' if self.verified else 'not verified'}>")

    def to_dict(self) -> dict[str, Any]:
        return {
            "modified": self.modified,
            "passes": [record.to_dict() for record in self.records],
            "fidelity": self.fidelity.to_dict() if self.fidelity is not None else None,
            "evaluation": None if self.evaluation is None else self.evaluation.to_dict(),
        }


def node_count(model: ir.Model) -> int:
    """Nodes of the main graph and all subgraphs (functions not included)."""
    return sum(1 for _ in model.graph.all_nodes())


def _fidelity_cell(record: PassRecord) -> str:
    """What the table says of a pass's outputs."""
    if not record.modified:
        return "no change"
    if record.metadata_only:
        return "metadata only"
    if record.fidelity is None:
        return "not verified"
    worst = max(record.fidelity.outputs, key=lambda o: o.max_abs_error)
    return f"max err {worst.max_abs_error:.2e}  cos {record.fidelity.worst_cosine:.6f}"


def run_pipeline(
    model: ir.Model,
    steps: Sequence[str | Mapping[str, Any]] | Sequence[Step],
    *,
    verify: bool = False,
    feeds: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]] | None = None,
    tolerance: tuple[float, float] | None = None,
    min_cosine: float | None = None,
    context: Mapping[str, Any] | None = None,
    data: LabelledData | None = None,
    max_drop: float | None = None,
) -> PipelineResult:
    """Run passes in order on a copy of `model`, instrumented and optionally verified.

    Args:
        model: the input; it is not modified (the pipeline works on a clone).
        steps: names/dicts (see `build_pipeline`) or already built `Step`s.
        verify: run the model on onnxruntime before and after each modifying pass.
        feeds: one feed dict or several (default: inputs generated to drive the model,
            `runtime.feeds.driving_feeds`).
        tolerance: `(rtol, atol)` for exact passes; atol is relative to max(1, max|output|)
            (default `runtime.exact.DEFAULT_RTOL` 1e-4 / `DEFAULT_ATOL` 1e-5; fp16 and bf16
            outputs get at least a few ulps of their type, `runtime.exact.dtype_tolerance`).
        min_cosine: lowest acceptable output cosine for approximate passes (steps may set their
            own `min_cosine`); None only reports fidelity.
        context: run-time values for passes that take them (see `build_pipeline`); the
            pipeline adds `input_model` (this `model`, untouched: finetune's default teacher).
        data: labelled validation data for `max_drop` (global or per step).
        max_drop: largest drop of top-1 accuracy on `data` since the input model (a fraction)
            allowed after any approximate pass (steps may set their own `max_drop`).

    Returns:
        `PipelineResult` with the final model and one `PassRecord` per pass.

    Raises:
        VerificationError: a pass broke its promise; the message names the pass.
        BadOptionError: unknown pass or preset names, bad options.
        InvalidModelError: a weight holds NaN/Inf (`check_finite_weights`).
    """
    built = [s for s in steps if isinstance(s, Step)]
    if len(built) != len(steps):
        if built:
            raise BadOptionError("mix of built steps and step descriptions in one pipeline")
        # Passes taking `input_model` (finetune's default teacher) get the pipeline's input.
        context = {"input_model": model, **(context or {})}
        built = build_pipeline(steps, context=context)  # type: ignore[arg-type]
    check_finite_weights(model)
    current = copy_model(model)
    current.meta.pop(metadata.MATERIALIZED, None)  # counted per run: see `compact-constants`
    verifier, judge = None, None
    judged = max_drop is not None or any(step.max_drop is not None for step in built)
    if verify or judged:
        from slimgraph.runtime import verify as checks  # onnxruntime: only when a model runs

        judge = checks.drop_judge(current, data) if judged else None
        if verify:
            verifier = checks.Verifier(current, checks.feed_list(feeds), tolerance)
    run = _Run(verifier, judge, min_cosine, max_drop, node_count(current))
    if built:
        manager = ir.passes.PassManager([_Instrumented(step, run) for step in built], steps=1)
        try:
            current = manager(current).model
        except ir.passes.PassError:
            if run.failure is None:  # not raised by a step: the manager's own error
                raise
        if run.failure is not None:  # the step's own error, not the manager's wrapping of it
            raise run.failure
    overall = None if verifier is None else verifier.overall()
    any_modified = any(record.modified for record in run.records)
    return PipelineResult(current, any_modified, records=run.records, fidelity=overall,
                          verified=verify)


class _Run:
    """What the steps of one `run_pipeline` share: the verifier, the judge of `max_drop`, the
    pipeline-wide limits, the records so far, and the error that stopped the run."""

    def __init__(
        self,
        verifier: Verifier | None,
        judge: Evaluator | None,
        min_cosine: float | None,
        max_drop: float | None,
        nodes: int,
    ) -> None:
        self.verifier = verifier
        self.judge = judge
        self.min_cosine = min_cosine
        self.max_drop = max_drop
        self.nodes = nodes  # node count of the current model
        self.records: list[PassRecord] = []
        self.failure: Exception | None = None

    def step(self, step: Step, model: ir.Model) -> ir.passes.PassResult:
        """Run one step's pass on `model`, then verify, judge and record it."""
        before = self.nodes
        start = time.perf_counter()
        try:
            result = step.pass_(model)
        except SlimgraphError:
            raise
        except Exception as error:  # a bug in a pass: say which one, keep the cause for --debug
            raise ir.passes.PassError(
                f"pass '{step.name}' failed: {first_line(error, named=True)}"
            ) from error
        seconds = time.perf_counter() - start
        if result.model is not model:  # a new model: keep knowing the source files
            for key, value in model.meta.items():
                result.model.meta.setdefault(key, value)
        current = result.model
        skipped = list(result.skipped) if isinstance(result, SlimgraphPassResult) else []
        for item in skipped:
            logger.info("%s skipped %s (%s): %s", step.name, item.node, item.op_type, item.reason)
        fidelity = None
        verify_seconds = 0.0
        checked = result.modified and not step.metadata_only
        if self.verifier is not None and checked:
            start = time.perf_counter()
            cosine = step.min_cosine if step.min_cosine is not None else self.min_cosine
            cosine = None if step.exact else cosine
            fidelity = self.verifier.check(current, step.name, step.exact, cosine)
            verify_seconds = time.perf_counter() - start
        details = _details(result)
        limit = step.max_drop if step.max_drop is not None else self.max_drop
        judge = self.judge
        if judge is not None and checked and not step.exact:
            evaluation = judge.evaluate(current)
            details.update(accuracy=evaluation.metric, drop=evaluation.drop)
            if limit is not None and (evaluation.drop or 0.0) > limit:
                raise VerificationError(
                    f"pass '{step.name}' dropped {evaluation.metric_name} on {judge.data.source} "
                    f"to {evaluation.metric:.4f} from the input model's "
                    f"{evaluation.reference_metric:.4f} (drop {evaluation.drop:.4f} > max_drop "
                    f"{limit:g})"
                )
        self.nodes = node_count(current)
        record = PassRecord(
            name=step.name,
            exact=step.exact,
            seconds=seconds,
            nodes_before=before,
            nodes_after=self.nodes,
            modified=bool(result.modified),
            skipped=len(skipped),
            fidelity=fidelity,
            verify_seconds=verify_seconds,
            details=details,
            metadata_only=step.metadata_only,
        )
        logger.info("%s", record.describe())
        self.records.append(record)
        return result


class _Instrumented(ir.passes.PassBase):
    """A pipeline step as a pass of the `PassManager`: its pass, instrumented by `_Run.step`.

    In place exactly when the step's pass is. An error it raises is kept in `run.failure`, so
    `run_pipeline` raises it as it was, not wrapped in the manager's `PassError`s.
    """

    def __init__(self, step: Step, run: _Run) -> None:
        self.step = step
        self.run = run

    @property
    def in_place(self) -> bool:
        return self.step.pass_.in_place

    @property
    def changes_input(self) -> bool:
        return self.step.pass_.changes_input

    def __str__(self) -> str:
        return self.step.name

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            return self.run.step(self.step, model)
        except Exception as error:
            self.run.failure = error
            raise


def _details(result: ir.passes.PassResult) -> dict[str, Any]:
    """Extra scalar fields of a pass's result dataclass (counts per rewrite, ...), for reports."""
    details: dict[str, Any] = {}
    for key, value in vars(result).items():
        if key in ("model", "modified", "skipped"):
            continue
        if isinstance(value, (int, float, str, bool)):
            details[key] = value
        elif isinstance(value, Mapping) and all(
            isinstance(v, (int, float, str, bool)) for v in value.values()
        ):
            details[key] = dict(value)
    return details
