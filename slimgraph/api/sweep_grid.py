"""Sweep grids: the steps a `slimgraph sweep` grid names and the candidates it expands to.

A grid (YAML or JSON mapping, or a dict) names pipeline steps in the order they run and the
values to try for each; the candidates are the cartesian product (see `slimgraph.api.sweep`).
Step names are the pipeline's registered passes and presets plus the command names `prune`,
`quantize`, `factorize` and `finetune` (`_COMMANDS`: how a grid writes them; the passes a command
runs are the registry's `COMMAND_STEPS`).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from slimgraph.errors import BadOptionError, SlimgraphError
from slimgraph.passes.pipeline import PASSES, PRESETS, build_pipeline
from slimgraph.passes.quantize.weight_only import DATA_METHODS, WeightOnlyQuantizePass
from slimgraph.passes.recipe import read_document
from slimgraph.passes.registry import COMMAND_STEPS

__all__ = ["Candidate", "load_grid", "parse_grid", "grid_files"]

_SKIP = ("none", "skip")


def _is_skip(value: Any) -> bool:
    """`none`/`skip`/null/false: the step does not run in this candidate."""
    return value is None or value is False or (isinstance(value, str) and value.lower() in _SKIP)


@dataclass(frozen=True)
class _Command:
    """A command name usable as a grid step: its main option (what a plain value sets) and when
    it skips the step. It runs the passes `COMMAND_STEPS` gives it, else the pass of its name."""

    main: str
    skip: Callable[[Mapping[str, Any]], bool] = lambda options: False
    # values of the main option that choose the command's mode (`COMMAND_STEPS[...].modes`)
    modes: Mapping[str, str] = field(default_factory=dict)
    # options naming files: made absolute here, so workers started elsewhere find them
    paths: tuple[str, ...] = ()

    def passes(self, step: str, mode: str | None = None) -> tuple[str, ...]:
        """The passes grid step `step` runs (in `mode`, for a command with modes)."""
        command = COMMAND_STEPS.get(step)
        if command is None:
            return (step,)
        return (command.modes[self.modes[mode]],) if mode is not None else command.passes


# `quantize`'s modes as a grid writes them: `int8` (the default) is static, `int4` weight-only.
_QUANTIZE_MODES = {"int8": "static", "static": "static", "dynamic": "dynamic",
                   "weight-only": "weight-only", "int4": "weight-only"}

_COMMANDS: dict[str, _Command] = {
    "prune": _Command("ratio", skip=lambda options: options.get("ratio") == 0),
    "factorize": _Command("rank_ratio"),
    "quantize": _Command("mode", modes=_QUANTIZE_MODES),
    # the `finetune` pass (registered by slimgraph.passes.finetune where it is installed)
    "finetune": _Command("epochs", skip=lambda options: options.get("epochs") == 0,
                         paths=("data", "val", "teacher")),
}


@dataclass(frozen=True)
class Candidate:
    """One combination of the grid: its settings and the pipeline steps that build it.

    Attributes:
        index: position in the grid's cartesian product (0-based).
        name: the settings as text, e.g. "prune.ratio=0.3 quantize=int8" ("input model" when
            every step is skipped).
        settings: grid step -> the value chosen (None when skipped), JSON-safe.
        steps: pipeline steps (`{"name": pass, **options}`), in the grid's order.
    """

    index: int
    name: str
    settings: dict[str, Any]
    steps: tuple[dict[str, Any], ...]


# -- the grid -------------------------------------------------------------------------------------


def load_grid(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a grid file (YAML or JSON): a mapping of step name to values.

    Raises:
        BadOptionError: missing or unreadable file, not YAML/JSON, or not a mapping.
    """
    file = Path(path)
    data = read_document(file, "grid")
    if not isinstance(data, Mapping) or not data:
        raise BadOptionError(
            f"grid {file}: expected a mapping of steps to values, e.g. "
            "'prune: {ratio: [0.3, 0.5]}' and 'quantize: [none, int8]'"
        )
    return dict(data)


def _known_steps() -> str:
    build_pipeline(["cleanup"])  # registers every pass family
    names = sorted({*PASSES, *PRESETS, *_COMMANDS})
    return ", ".join(names)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _step_values(step: str, spec: Any) -> list[dict[str, Any] | None]:
    """The option dicts to try for one grid step (None: the step is skipped)."""
    command = _COMMANDS.get(step)
    values: list[Any]
    if isinstance(spec, Mapping):
        keys = list(spec)
        for key in keys:
            if not isinstance(key, str):
                raise BadOptionError(f"step '{step}': option names must be text, got {key!r}")
        combos = itertools.product(*(_as_list(spec[key]) for key in keys))
        values = [dict(zip(keys, combo, strict=True)) for combo in combos]
    else:
        values = _as_list(spec)
    if not values:
        raise BadOptionError(f"step '{step}': no values to try")
    out: list[dict[str, Any] | None] = []
    for value in values:
        if _is_skip(value):
            out.append(None)
        elif value is True or value == step:
            out.append({})
        elif isinstance(value, Mapping):
            out.append(dict(value))
        elif command is not None and isinstance(value, (str, int, float)):
            out.append({command.main: value})
        else:
            raise BadOptionError(
                f"step '{step}': bad value {value!r} (use none, true, a mapping of options"
                + (f", or a value of its '{command.main}'" if command else "") + ")"
            )
    return out


def _pipeline_steps(step: str, options: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Pipeline steps for one grid step's chosen options ([] when skipped)."""
    if options is None:
        return []
    command = _COMMANDS.get(step)
    if command is None:
        if step in PRESETS and step not in PASSES:
            if options:
                raise BadOptionError(f"step '{step}' is a preset and takes no options")
            return [{"name": step}]
        return [{"name": step, **options}]
    options = dict(options)
    if command.skip(options):
        return []
    for key in command.paths:
        value = options.get(key)
        if isinstance(value, str) and value != "input":
            options[key] = str(Path(value).resolve())
    mode = None
    if command.modes:
        mode = str(options.pop(command.main, "int8"))
        if _is_skip(mode):
            return []
        if mode not in command.modes:
            raise BadOptionError(
                f"step '{step}': unknown {command.main} '{mode}' "
                f"(known: none, {', '.join(command.modes)})"
            )
    return [{"name": name, **options} for name in command.passes(step, mode)]


def _varying(values: Sequence[Mapping[str, Any] | None]) -> set[str]:
    """Option names whose value differs between a step's values (the ones a name must show)."""
    given = [v for v in values if v is not None]
    keys = {key for v in given for key in v}
    return {key for key in keys
            if len({json.dumps(v.get(key, "<unset>"), default=str) for v in given}) > 1}


def _show(value: Any) -> str:
    return Path(value).name if isinstance(value, str) and os.sep in value else str(value)


def _setting_text(
    step: str, options: Mapping[str, Any] | None, shown: set[str] | None = None
) -> str:
    """`prune=0.3`, `finetune.epochs=3`, `quantize=int8`; only the options in `shown` (the ones
    that vary in the grid; all when None)."""
    if options is None:
        return f"{step}=none"
    keys = [key for key in options if shown is None or key in shown]
    command = _COMMANDS.get(step)
    if not keys:
        return step
    if command is not None and keys == [command.main]:
        return f"{step}={_show(options[command.main])}"
    return " ".join(f"{step}.{key}={_show(options[key])}" for key in keys)


def parse_grid(
    grid: Mapping[str, Any], *, calibration: bool = False, model: ir.Model | None = None
) -> list[Candidate]:
    """Expand a grid into candidates (cartesian product, steps in the grid's order) and check
    every candidate's steps against the pipeline registry and the passes' options.

    Args:
        grid: step name -> values (see the module docstring).
        calibration: whether calibration data will be given (static int8 needs it).
        model: when given, each pass's option checks (`requires`) run against it too.

    Raises:
        BadOptionError: an unknown step (the message lists the known ones), a bad value, options
            a pass does not take, or a step that needs calibration data without it.
    """
    known = None
    per_step: list[list[tuple[str, dict[str, Any] | None]]] = []
    for step, spec in grid.items():
        if not isinstance(step, str):
            raise BadOptionError(f"grid step names must be text, got {step!r}")
        if step not in _COMMANDS:
            known = known or _known_steps()
            if step not in PASSES and step not in PRESETS:
                raise BadOptionError(f"unknown step '{step}' (known: {known})")
        per_step.append([(step, options) for options in _step_values(step, spec)])
    shown = []
    for values in per_step:  # the options that vary, and a command's main option always
        keys = _varying([options for _, options in values])
        command = _COMMANDS.get(values[0][0])
        shown.append(keys | ({command.main} if command else set()))
    candidates = []
    for index, combo in enumerate(itertools.product(*per_step)):
        steps = [s for step, options in combo for s in _pipeline_steps(step, options)]
        settings = {step: options for step, options in combo}
        name = " ".join(_setting_text(step, options, keys) for (step, options), keys
                        in zip(combo, shown, strict=True) if options is not None) or "input model"
        if steps:
            full = " ".join(_setting_text(step, options) for step, options in combo
                            if options is not None)
            _check_steps(steps, full, calibration, model)
        candidates.append(Candidate(index, name, _json_safe(settings), tuple(steps)))
    return candidates


def _needs_calibration(pass_: Any) -> bool:
    """A pass taking calibration data that it was not given and needs: static int8, and
    weight-only quantization with a data-aware method (GPTQ, AWQ); round-to-nearest and HQQ
    need none (a grid's `quantize: [int4]` once asked for --calib)."""
    if getattr(pass_, "calibration", "unused") is not None:
        return False
    if isinstance(pass_, WeightOnlyQuantizePass):
        return pass_.options.method in DATA_METHODS
    return True


def _check_steps(
    steps: list[dict[str, Any]], name: str, calibration: bool, model: ir.Model | None
) -> None:
    try:
        built = build_pipeline(steps, context={"calibration": {}} if calibration else None)
    except BadOptionError as error:
        raise BadOptionError(f"candidate '{name}': {error}") from None
    for step in built:
        if not calibration and _needs_calibration(step.pass_):
            raise BadOptionError(
                f"candidate '{name}': step '{step.name}' needs calibration data (--calib)"
            )
        if model is not None and step.name != "quantize":
            try:
                step.pass_.requires(model)
            except BadOptionError as error:
                raise BadOptionError(f"candidate '{name}': step '{step.name}': {error}") from None
            except SlimgraphError:
                pass  # about the model, not the options: the build reports it per candidate


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def grid_files(grid: Mapping[str, Any]) -> list[str]:
    """The data files a grid's steps read themselves (a `finetune` step's `data` and `val`), as
    written in the grid: the sweep checks each once before any job runs."""
    found: list[str] = []
    for step, spec in grid.items():
        command = _COMMANDS.get(step) if isinstance(step, str) else None
        if command is None or not isinstance(spec, Mapping):
            continue
        for key in command.paths:
            if key == "teacher":
                continue
            for value in _as_list(spec.get(key)):
                if isinstance(value, str) and value not in found:
                    found.append(value)
    return found
