"""The pass registry: step names, the pass classes they run and the traits each declares.

A leaf module: it imports `onnx_ir` and the standard library only (no onnxruntime, no
`slimgraph.runtime`, no pipeline), so a pass module registers itself without pulling in what
verifies it. A pass declares its traits where it registers, and the pipeline reads them from its
`PassInfo`, never from the class:

    @register_pass("fuse-batchnorm", exact=True)
    class FuseBatchNormPass(SlimgraphPass): ...

    register_pass("eliminate-identity", exact=True)(common.IdentityEliminationPass)  # upstream

- `exact`: outputs must not change (verified at fp32 rtol 1e-4 / atol 1e-5 of the output scale);
  False for approximate passes, which report fidelity instead.
- `metadata_only`: the pass only annotates (`metadata_props`, `.meta`); the pipeline does not
  verify or judge it.
- `options`: what a recipe step may set: by default the keyword parameters of the class's
  constructor (following `**kwargs` into base classes); a function (its keyword-only parameters)
  or a dataclass (its fields) where the constructor forwards `**options` to it.

`PASSES` maps names to classes (a mutable mapping over the `PassInfo`s), `PRESETS` names lists of
steps, `COMMAND_STEPS` the command names a recipe or a sweep grid may use as steps and the passes
each runs (the one table of them: the pipeline and the sweep read it). The pass families register
when their module is imported; `ensure_registered()` imports every module of `PASS_MODULES`
(explicitly listed: no import-time discovery).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, TypeVar

import onnx_ir as ir

__all__ = [
    "REQUIRED",
    "PassInfo",
    "PassTable",
    "PASSES",
    "PRESETS",
    "PASS_MODULES",
    "CommandStep",
    "COMMAND_STEPS",
    "INTERNAL_OPTIONS",
    "OPTION_SYNONYMS",
    "register_pass",
    "register_preset",
    "pass_info",
    "pass_options",
    "options_from",
    "cli_option",
    "describe_passes",
    "ensure_registered",
]

_P = TypeVar("_P", bound=type[ir.passes.PassBase])

# The default of an option a step must set (`inspect.Parameter.empty`, as `pass_options` gives).
REQUIRED: Any = inspect.Parameter.empty

# Keywords the pipeline fills in itself (context, verification): not recipe options.
INTERNAL_OPTIONS = (
    "feeds", "dims", "check_names", "calibration", "input_model", "on_epoch", "approximations",
)

# Option spellings of the command line that differ from the pass's keyword.
OPTION_SYNONYMS: Mapping[str, str] = {
    "format": "fmt",
    "exclude_op": "exclude_ops",
    "include_op": "include_ops",
    "prune_output": "prune_outputs",
}


@dataclasses.dataclass(frozen=True)
class CommandStep:
    """What a command name runs when a recipe or a sweep grid uses it as a step.

    Attributes:
        passes: the passes it runs, in order (the pipeline gives each its share of the options).
        summary: how `--list-passes` describes it.
        modes: for a command with `--mode` (quantize): the one pass each mode runs instead.
    """

    passes: tuple[str, ...]
    summary: str
    modes: Mapping[str, str] = dataclasses.field(default_factory=dict)


# Command names accepted as step names, so a recipe reads like the command line
# (`- name: factorize` with `rank-ratio: 0.5`): each runs the passes its command runs.
COMMAND_STEPS: Mapping[str, CommandStep] = {
    "factorize": CommandStep(
        ("lowrank-linear", "tucker-conv"),
        "lowrank-linear (Gemm/MatMul, SVD) then tucker-conv (Conv, Tucker-2)",
    ),
    "quantize": CommandStep(
        ("quantize",),
        "quantize (static: needs --calib / calibration=), quantize-dynamic (mode: dynamic) or "
        "quantize-weight-only (mode: weight-only)",
        modes={
            "static": "quantize",
            "dynamic": "quantize-dynamic",
            "weight-only": "quantize-weight-only",
        },
    ),
    "convert": CommandStep(("fp16",), "fp16 (convert --fp16)"),
    "prune": CommandStep(("prune",), "prune"),
}

# Modules whose passes register themselves with @register_pass, imported on first use of the
# registry. A new family of passes is one line here.
PASS_MODULES: tuple[str, ...] = (
    "slimgraph.passes.cleanup",
    "slimgraph.passes.fuse",
    "slimgraph.passes.transformer",
    "slimgraph.passes.opset",
    "slimgraph.passes.lowrank",
    "slimgraph.passes.prune",
    "slimgraph.passes.precision",
    "slimgraph.passes.quantize.modes",
    "slimgraph.passes.quantize.dynamic",
    "slimgraph.passes.quantize.weight_only",
    "slimgraph.passes.finetune",
)


def options_from(source: Callable[..., Any] | type) -> dict[str, Any]:
    """The options a function or dataclass declares: keyword-only parameters of a function,
    fields of a dataclass; each with its default (`REQUIRED` when it has none)."""
    if dataclasses.is_dataclass(source) and isinstance(source, type):
        options: dict[str, Any] = {}
        for item in dataclasses.fields(source):
            if item.default is not dataclasses.MISSING:
                options[item.name] = item.default
            elif item.default_factory is not dataclasses.MISSING:
                options[item.name] = item.default_factory()
            else:
                options[item.name] = REQUIRED
        return options
    return {
        key: param.default
        for key, param in inspect.signature(source).parameters.items()
        if param.kind == param.KEYWORD_ONLY
    }


def pass_options(
    cls: type[ir.passes.PassBase], forwarded: Callable[..., Any] | type | None = None
) -> dict[str, Any] | None:
    """The keyword options of a pass class and their defaults (`REQUIRED` when required).

    Follows `**options` into the base classes, or into `forwarded` (a function or dataclass the
    constructor hands `**options` to; `options_from`). A registered class answers from its
    `PassInfo`.

    Returns:
        keyword -> default; None when the class takes keywords it does not name (an unnamed
        `**kwargs` all the way down): such a pass's options are not checked.
    """
    if forwarded is None:
        for info in PASSES.infos():
            if info.cls is cls:
                return None if info.options is None else dict(info.options)
        forwarded = cls.__dict__.get("options_from")  # the pre-registry spelling
    options: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        named = {
            k: p.default for k, p in params.items()
            if k != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }  # fmt: skip
        for key, default in named.items():
            options.setdefault(key, default)
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return options
        if forwarded is not None:  # `**options` handed to this function or dataclass
            for key, default in options_from(forwarded).items():
                options.setdefault(key, default)
            return options
        if not named and not options:
            return None
    return options


@dataclasses.dataclass(frozen=True)
class PassInfo:
    """A registered pass: its step name, class and declared traits.

    Attributes:
        name: the step name recipes and `--list-passes` use (`fuse-batchnorm`).
        cls: the pass class (a slimgraph pass or an upstream onnx_ir/onnxscript one).
        exact: outputs must not change (verified); False: approximate (fidelity reported).
        metadata_only: only annotates the model; never verified or judged.
        options: keyword -> default (`REQUIRED` when a step must set it); None when the pass
            takes keywords it does not name (not checked).
    """

    name: str
    cls: type[ir.passes.PassBase]
    exact: bool
    metadata_only: bool = False
    options: Mapping[str, Any] | None = None

    @property
    def kind(self) -> str:
        """"exact" or "approximate"."""
        return "exact" if self.exact else "approximate"

    @property
    def summary(self) -> str:
        """The first sentence of the class docstring, on one line."""
        paragraph = (inspect.getdoc(self.cls) or "").split("\n\n")[0].replace("\n", " ")
        return paragraph.split(". ")[0].rstrip(".") + "."


class PassTable(MutableMapping[str, type[ir.passes.PassBase]]):
    """Step name -> pass class, over the `PassInfo` each registration declared.

    Setting `table[name] = cls` registers `cls` as `register_pass(name)` does (traits from its
    class attributes); `info(name)` gives the declared traits.
    """

    def __init__(self, infos: Iterable[PassInfo] = ()) -> None:
        self._infos: dict[str, PassInfo] = {info.name: info for info in infos}

    def __getitem__(self, name: str) -> type[ir.passes.PassBase]:
        return self._infos[name].cls

    def __setitem__(self, name: str, cls: type[ir.passes.PassBase]) -> None:
        self._infos.pop(name, None)
        self.register(_declared(name, cls, None, None, None))

    def __delitem__(self, name: str) -> None:
        del self._infos[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> PassInfo:
        """The traits `name` was registered with.

        Raises:
            KeyError: no pass of that name.
        """
        return self._infos[name]

    def infos(self) -> list[PassInfo]:
        """Every registration, in registration order."""
        return list(self._infos.values())

    def register(self, info: PassInfo) -> PassInfo:
        """Add `info`; registering the same class under its name again replaces the entry.

        Raises:
            ValueError: the name is registered to another class.
        """
        known = self._infos.get(info.name)
        if known is not None and known.cls is not info.cls:
            raise ValueError(f"pass name '{info.name}' is already registered to {known.cls}")
        self._infos[info.name] = info
        return info


# Name -> pass class. Passes of every family register here with @register_pass("name", ...).
PASSES = PassTable()

# Name -> list of steps (names or option dicts). Presets may name other presets.
PRESETS: dict[str, list[str | dict[str, Any]]] = {}


def _declared(
    name: str,
    cls: type[ir.passes.PassBase],
    exact: bool | None,
    metadata_only: bool | None,
    options: Callable[..., Any] | type | None,
) -> PassInfo:
    """The `PassInfo` of a registration. Traits not given fall back to the class's own
    `exact` attribute (the pre-registry spelling, read once, here); an `exact` given both ways
    must agree."""
    stated = getattr(cls, "exact", None)
    if exact is None:
        if not isinstance(stated, bool):
            raise TypeError(
                f"pass {cls.__name__} must declare exact: register_pass('{name}', exact=...)"
            )
        exact = stated
    elif isinstance(stated, bool) and stated != exact:
        raise TypeError(f"pass {cls.__name__} says exact={stated}, registered with exact={exact}")
    return PassInfo(name, cls, exact, bool(metadata_only), pass_options(cls, options))


def register_pass(
    name: str,
    *,
    exact: bool | None = None,
    metadata_only: bool | None = None,
    options: Callable[..., Any] | type | None = None,
) -> Callable[[_P], _P]:
    """Class decorator: make a pass available to pipelines and recipes under `name`.

    Args:
        name: the step name.
        exact: the pass keeps outputs (verified as exact); False: approximate. None reads the
            class's `exact` attribute (for passes registered the pre-registry way).
        metadata_only: the pass only annotates (`metadata_props`, `.meta`): not verified.
        options: where the constructor's `**options` go (a function or dataclass), so recipes
            are checked against them.

    Returns:
        The decorator; it returns the class unchanged (upstream classes are registered as
        they are).

    Raises:
        ValueError: `name` is registered to another class.
        TypeError: `exact` is neither given nor stated by the class, or they disagree.

    Example:
        >>> @register_pass("my-fusion", exact=True)  # doctest: +SKIP
        ... class MyFusionPass(SlimgraphPass): ...
    """

    def decorate(cls: _P) -> _P:
        PASSES.register(_declared(name, cls, exact, metadata_only, options))
        return cls

    return decorate


def register_preset(name: str, steps: Sequence[str | dict[str, Any]]) -> None:
    """Make a list of steps available as a preset (usable as a step or with `--preset`)."""
    PRESETS[name] = list(steps)


def ensure_registered() -> None:
    """Import every module of `PASS_MODULES`, so every family's passes are registered."""
    for module in PASS_MODULES:
        importlib.import_module(module)


def pass_info(name: str) -> PassInfo:
    """The `PassInfo` registered as `name` (every family registered first).

    Raises:
        KeyError: no pass of that name.
    """
    ensure_registered()
    return PASSES.info(name)


def cli_option(name: str) -> str:
    """An option's command-line spelling (`rank_ratio` -> `rank-ratio`, `fmt` -> `format`)."""
    reverse = {v: k for k, v in OPTION_SYNONYMS.items() if k != "exclude_op"}
    return reverse.get(name, name).replace("_", "-")


def describe_passes() -> str:
    """Every registered pass with its kind and options, the presets and the command steps
    (what `slimgraph optimize --list-passes` prints)."""
    ensure_registered()
    lines = ["passes (recipe step `name: PASS`, options as `key: value`):"]
    for info in sorted(PASSES.infos(), key=lambda item: item.name):
        lines.append(f"  {info.name} ({info.kind}): {info.summary}")
        described = [
            f"{cli_option(key)}={'required' if default is REQUIRED else repr(default)}"
            for key, default in (info.options or {}).items()
            if key not in INTERNAL_OPTIONS  # given by the pipeline, not by a recipe
        ]
        if described:
            lines.append(f"      options: {', '.join(described)}")
    lines.append("presets (a step that expands to its steps):")
    for name, steps in sorted(PRESETS.items()):
        shown = ", ".join(step if isinstance(step, str) else step["name"] for step in steps)
        lines.append(f"  {name}: {shown}")
    lines.append("commands (step names as on the command line, with the command's options):")
    for name, command in COMMAND_STEPS.items():
        lines.append(f"  {name}: {command.summary}")
    return "\n".join(lines)
