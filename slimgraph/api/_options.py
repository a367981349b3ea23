"""Options dataclasses for the public pass functions: the keywords are written once.

A family's public functions (`factorize`, `factorize_with_report`, ...) take the same keyword
options. Each family declares them once, as a frozen keyword-only dataclass (subclassing
`BudgetOptions` for the accuracy-budget keywords every compressing function takes), and its
public functions are written against that dataclass with `takes_options`: the function users
call keeps its keyword signature (`inspect.signature`, `help()`, the type checker), builds the
options object, and hands it to the implementation.

Importing this module imports no onnxruntime (the budget machinery is imported when used).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

if TYPE_CHECKING:
    import onnx_ir as ir

    from slimgraph.ir import ModelLike
    from slimgraph.runtime.budget import Budget, BudgetJudge, DataLike
    from slimgraph.runtime.metrics import Metric

__all__ = ["BudgetOptions", "takes_options"]

P = ParamSpec("P")
O = TypeVar("O")  # noqa: E741 - the options type
R = TypeVar("R")
_B = TypeVar("_B", bound="BudgetOptions")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BudgetOptions:
    """The accuracy-budget keywords of the compressing functions (`runtime.budget`).

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
        from slimgraph.runtime.budget import budget_judge

        return budget_judge(
            reference, self.data, budget=self.budget, max_drop=self.max_drop,
            min_cosine=self.min_cosine, metric=self.metric,
        )


def takes_options(
    options_type: Callable[P, O],
) -> Callable[[Callable[[ModelLike, O], R]], Callable[Concatenate[ModelLike, P], R]]:
    """Decorate `fn(model, options)` into `fn(model, **keywords)` with `options_type`'s keywords.

    The result's signature (`inspect.signature`) is `(model, *, <fields of options_type>)` with
    the fields declared by `options_type` itself first, then those of its bases (so the
    `BudgetOptions` keywords come last), and its return annotation is `fn`'s.

    Args:
        options_type: a keyword-only dataclass.

    Raises:
        TypeError (from the decorated function): an unknown keyword or a positional option,
            worded as Python words it (`factorize() got an unexpected keyword argument 'x'`).
    """

    def decorate(fn: Callable[[ModelLike, O], R]) -> Callable[Concatenate[ModelLike, P], R]:
        fn_signature = inspect.signature(fn)
        model = next(iter(fn_signature.parameters.values()))
        signature = fn_signature.replace(parameters=[model, *_keywords(options_type)])

        @functools.wraps(fn)
        def public(*args: Any, **keywords: Any) -> R:
            if len(args) > 1:
                raise TypeError(
                    f"{fn.__name__}() takes 1 positional argument but {len(args)} were given"
                )
            if not args and model.name not in keywords:
                raise TypeError(
                    f"{fn.__name__}() missing 1 required positional argument: '{model.name}'"
                )
            try:
                bound = signature.bind(*args, **keywords)
            except TypeError as error:
                raise TypeError(f"{fn.__name__}() {error}") from None
            options = {k: v for k, v in bound.arguments.items() if k != model.name}
            make = cast(Callable[..., O], options_type)  # the bound keywords, checked above
            return fn(bound.arguments[model.name], make(**options))

        public.__signature__ = signature  # type: ignore[attr-defined]
        return public

    return decorate


def _keywords(options_type: Any) -> list[inspect.Parameter]:
    """Keyword-only parameters for the dataclass fields, own fields before inherited ones."""
    inherited = {
        field.name for base in options_type.__mro__[1:] if dataclasses.is_dataclass(base)
        for field in dataclasses.fields(base)
    }
    fields = [f for f in dataclasses.fields(options_type) if f.init]
    ordered = [f for f in fields if f.name not in inherited] + [
        f for f in fields if f.name in inherited
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
