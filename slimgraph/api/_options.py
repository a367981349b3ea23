"""How the public verbs take their options: keywords, or `options=` an options object, written once.

Each verb's options are one frozen keyword-only dataclass (`PruneOptions`, `QuantizeOptions`,
...; the compressing verbs' subclass `BudgetOptions` for the accuracy-budget keywords), and the
verb is written against it with `takes_options`: the function users call has the dataclass's
fields as keyword-only parameters (`inspect.signature`, `help()`), plus `options=`, an instance
of the dataclass. Keywords given next to `options=` override its fields, so
`prune(m, options=base, ratio=0.3)` is `base` with another ratio. The implementation receives
one options object.

Example:
    >>> @takes_options(PruneOptions)  # doctest: +SKIP
    ... def prune(model: ModelLike, *, options: PruneOptions) -> ir.Model: ...
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from slimgraph.api._speed import guard_speed
from slimgraph.runtime.budget import Budget, BudgetJudge, DataLike, budget_judge
from slimgraph.runtime.speed_guard import SpeedCheck

if TYPE_CHECKING:
    import onnx_ir as ir

    from slimgraph.runtime.metrics import Metric

__all__ = ["BudgetOptions", "SpeedOptions", "takes_options"]

R = TypeVar("R")
_B = TypeVar("_B", bound="BudgetOptions")

# The parameter every verb takes its options object by.
_OPTIONS = "options"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BudgetOptions:
    """The accuracy-budget keywords of the compressing verbs (`runtime.budget`).

    Attributes:
        data: validation data (an .npz path, stacked arrays with an optional labels key, or
            `LabelledData`).
        budget: a `Budget` (instead of `max_drop`/`min_cosine`).
        max_drop: the largest allowed drop of the metric (top-1 accuracy by default), absolute.
        min_cosine: the smallest allowed mean cosine similarity of the outputs.
        metric: a user `Metric` replacing top-1 accuracy for `max_drop`.
    """

    data: DataLike | None = None
    budget: Budget | None = None
    max_drop: float | None = None
    min_cosine: float | None = None
    metric: Metric | None = None

    def without_budget(self: _B) -> _B:
        """These options with no budget (the search's inner runs, once it chose the layers)."""
        return dataclasses.replace(
            self, **{field.name: None for field in dataclasses.fields(BudgetOptions)}
        )

    def judge(self, reference: ir.Model) -> BudgetJudge | None:
        """The judge these options ask for against `reference`, None without a limit.

        Raises:
            BadOptionError: a limit without data, both `budget` and a limit, or `max_drop` on
                data without labels (`runtime.budget.budget_judge`).
        """
        return budget_judge(
            reference, self.data, budget=self.budget, max_drop=self.max_drop,
            min_cosine=self.min_cosine, metric=self.metric,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpeedOptions:
    """The speed guard's keywords (`runtime.speed_guard`): time the result against the input on
    onnxruntime, in the form `optimize` writes it by default (`api._speed.speed_baseline`), and
    refuse it when it runs slower beyond noise.

    Off by default in Python, on by default on the command line: a verb is also a building block
    (a budget search, a sweep or `slimgraph auto` builds and times many candidates itself, a
    recipe runs several steps), and a library call should neither spend seconds timing nor fail
    on a busy machine unless asked; `slimgraph quantize|prune|factorize|optimize` guard every
    model they write.

    Attributes:
        speed_check: time the result against the input before returning it.
        allow_slower: return a slower result anyway (the report's `speed` says it was slower).
        speed_batches: batch sizes to time at (default 1 and 64; the fixed batch of a model
            that has one).
    """

    speed_check: bool = False
    allow_slower: bool = False
    speed_batches: int | tuple[int, ...] | None = None

    def guard(self, reference: ir.Model, candidate: ir.Model) -> SpeedCheck | None:
        """The speed check these options ask for (None when off, or skipped by
        `SLIMGRAPH_NO_SPEED_CHECK`).

        Raises:
            VerificationError: `candidate` is slower beyond noise and `allow_slower` is False.
        """
        if not self.speed_check:
            return None
        return guard_speed(reference, candidate, batches=self.speed_batches,
                           allow_slower=self.allow_slower)  # fmt: skip


def takes_options(
    options_type: type[Any], *, order: Sequence[str] | None = None
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorate `fn(model, ..., *, options)` into `fn(model, ..., *, <fields>, options=None)`.

    The public signature is `fn`'s own parameters but `options`, then the fields of
    `options_type` as keyword-only parameters (the `BudgetOptions` fields last), then
    `options=None`; `order` lists the keyword-only names (own and fields) in the order the
    signature shows them, when it is not that one. The decorated function receives
    `options=`: the given object with the given keywords replacing its fields, or a new one
    built from the keywords. An `options` object of a base class of `options_type` (a pass's
    options) is taken field by field.

    Args:
        options_type: a keyword-only dataclass.
        order: keyword-only parameter names in signature order (default: as above).

    Raises:
        TypeError (from the decorated function): an unknown keyword, too many positional
            arguments, a missing model, or `options` of another type, worded as Python words it
            (`factorize() got an unexpected keyword argument 'x'`).
    """

    def decorate(fn: Callable[..., R]) -> Callable[..., R]:
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != _OPTIONS]
        fields = _keywords(options_type)
        options_param = inspect.Parameter(
            _OPTIONS, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=f"{options_type.__name__} | None",
        )
        positional = [p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        keywords = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY] + fields
        if order is not None:
            by_name = {p.name: p for p in keywords}
            keywords = [by_name[name] for name in order] + [
                p for p in keywords if p.name not in order
            ]
        signature = inspect.signature(fn).replace(
            parameters=[*positional, *keywords, options_param]
        )
        field_names = {p.name for p in fields}
        required = [p.name for p in positional if p.default is inspect.Parameter.empty]

        @functools.wraps(fn)
        def public(*args: Any, **given: Any) -> R:
            name = fn.__name__
            if len(args) > len(positional):
                count = len(positional)
                raise TypeError(
                    f"{name}() takes {count} positional argument{'s' * (count != 1)} but "
                    f"{len(args)} were given"
                )
            missing = [p for p in required[len(args):] if p not in given]
            if missing:
                raise TypeError(
                    f"{name}() missing {len(missing)} required positional argument"
                    f"{'s' * (len(missing) != 1)}: {', '.join(repr(p) for p in missing)}"
                )
            try:
                bound = signature.bind(*args, **given)
            except TypeError as error:
                raise TypeError(f"{name}() {error}") from None
            arguments = dict(bound.arguments)
            chosen = {k: arguments.pop(k) for k in list(arguments) if k in field_names}
            options = _options(name, options_type, arguments.pop(_OPTIONS, None), chosen)
            return fn(**arguments, options=options)

        public.__signature__ = signature  # type: ignore[attr-defined]
        return public

    return decorate


def _options(function: str, options_type: Any, given: Any, keywords: dict[str, Any]) -> Any:
    """`given` (or a new `options_type`) with `keywords` replacing its fields."""
    if given is None:
        return options_type(**keywords)
    if not isinstance(given, options_type):
        base = type(given)
        if not (dataclasses.is_dataclass(base) and issubclass(options_type, base)):
            raise TypeError(
                f"{function}() options must be a {options_type.__name__}, got {base.__name__}"
            )
        fields = dataclasses.fields(base)
        given = options_type(**{f.name: getattr(given, f.name) for f in fields if f.init})
    return dataclasses.replace(given, **keywords) if keywords else given


def _keywords(options_type: Any) -> list[inspect.Parameter]:
    """Keyword-only parameters for the dataclass fields, the `BudgetOptions` ones last."""
    budget = {field.name for field in dataclasses.fields(BudgetOptions)}
    fields = [f for f in dataclasses.fields(options_type) if f.init]
    is_budget = issubclass(options_type, BudgetOptions)
    ordered = [f for f in fields if not (is_budget and f.name in budget)] + [
        f for f in fields if is_budget and f.name in budget
    ]
    return [
        inspect.Parameter(
            field.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if field.default is dataclasses.MISSING
            else field.default,
            annotation=field.type,
        )
        for field in ordered
    ]
