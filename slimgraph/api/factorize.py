"""`slimgraph.factorize`: low-rank factorization of a copy of a model, under a budget if asked.

The transformation is `factorize_layers` (`slimgraph.passes.lowrank`: weights folded, Gemm/MatMul
split by SVD, Conv by Tucker-2 or CP). Here: the options (`FactorizeOptions`: the rank rule and the
layers, plus a MAC target and the accuracy budget); ranks per layer (`allocate_ranks`) for a MAC
target or a budget without a rule; with a rule, when its result misses the budget, the k most
sensitive layers keep their full rank (`FactorizeUnits`, searched by `api.budget.search_units`);
the report records which and why. With `data`, the result's fidelity (and both models' accuracy
when the data has labels) is measured on all of it, as `quantize --data` measures it
(`runtime.compare`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx_ir as ir

from slimgraph.api._options import BudgetOptions, takes_options
from slimgraph.api.budget import BudgetSearch, Unit, search_units
from slimgraph.api.prune import _loss as allocation_loss
from slimgraph.errors import BadOptionError, UnsupportedModelError, VerificationError
from slimgraph.ir import ModelLike, as_model, metadata
from slimgraph.ir.select import exact_pattern
from slimgraph.passes.lowrank import FactorizeOptions as RuleOptions
from slimgraph.passes.lowrank import FactorizeReport, factorize_layers
from slimgraph.passes.lowrank._allocate import RANK_GRID, allocate_ranks, allocated
from slimgraph.runtime.budget import BudgetJudge, Evaluator, as_data
from slimgraph.runtime.compare import compare

__all__ = ["FactorizeOptions", "FactorizeUnits", "factorize", "factorize_with_report"]

# The options that choose the rank; one of them, or "auto" with one.
_RULES = ("rank_ratio", "energy", "rank", "error_budget")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FactorizeOptions(RuleOptions, BudgetOptions):
    """The keywords of `factorize` and `factorize_with_report`: what to split and how
    (`slimgraph.passes.lowrank.FactorizeOptions`), a MAC target and the accuracy budget
    (`BudgetOptions`), each described on `factorize`.

    Example:
        >>> FactorizeOptions(rank_ratio=0.5, min_cosine=0.99).rule()["rank_ratio"]
        0.5
    """

    target_macs: float | None = None


@takes_options(FactorizeOptions)
def factorize_with_report(
    model: ModelLike, *, options: FactorizeOptions
) -> tuple[ir.Model, FactorizeReport]:
    """`factorize`, returning the new model and its `FactorizeReport`.

    Args: as for `factorize`.

    Returns:
        (factorized model, `FactorizeReport` with per-layer ranks, parameters and MACs).

    Raises: as for `factorize`.
    """
    return _factorize(as_model(model), options)


@takes_options(FactorizeOptions)
def factorize(model: ModelLike, *, options: FactorizeOptions) -> ir.Model:
    """Low-rank factorization of a model's Gemm/MatMul (SVD) and Conv (Tucker-2 or CP) layers.

    Returns a new model; `model` is not changed. The `FactorizeReport` (per-layer ranks,
    parameters, MACs, weight errors and, with `feeds`, output SQNR and model fidelity) is in the
    result's `.meta["slimgraph.factorize_report"]` (`slimgraph.ir.metadata.FACTORIZE_REPORT`);
    `factorize_with_report` returns it directly. Approximate: outputs change. Takes its options
    as keywords or as `options=` a `FactorizeOptions`; keywords given with `options=` replace
    its fields.

    Weights computed by constant subgraphs (torch exports transpose Linear weights; old zoo files
    build weights with ConstantOfShape) are folded to initializers first (`fold=False` leaves
    them, and such layers are skipped as non-constant). IR version 3 models come out as IR 4,
    which lets initializers stay out of the graph inputs.

    Args:
        model: an `onnx_ir.Model` or the path of an `.onnx` file.
        rank_ratio: keep round(ratio * min(n, m)) singular values (Tucker: of C_in and C_out).
        energy: keep the fewest singular values holding this share of the squared sum.
        rank: a fixed rank, or "auto": ranks rounded to multiples of 16 (fast kernels), and
            only layers whose estimated MACs fall to 0.8x or less are factorized (alone: the
            largest such rank; with another rule: that rule's rank, rounded).
        error_budget: per layer, the largest relative Frobenius error of the weight.
        include, exclude: fnmatch patterns on layer names (torch module paths) or node names;
            each must match some node.
        op_types: which of Gemm, MatMul, Conv to factorize.
        feeds: sample inputs (a feed dict or an iterable of them) to measure each layer's
            output SQNR (and the model's fidelity when no `data` is given).
        pointwise_convs: also split 1x1 convs by SVD (skipped by default).
        allow_growth: factorize even where the factors are larger than the weight.
        fold: fold constant weight subgraphs first.
        method: how KxK convs are split: "tucker" (Tucker-2, the default), "cp" (1x1 -> Kx1
            depthwise -> 1xK depthwise -> 1x1, a CP decomposition by ALS; Lebedev et al. 2015;
            `rank_ratio` is then of the rank whose chain costs as much as the conv) or "svd"
            (KxK to k channels, then 1x1). Gemm/MatMul are split by SVD under each.
        layer_ratios: a rank ratio per node name, replacing the rule for those layers (others
            stay whole when no rule is given).
        target_macs: instead of a rank rule, the MACs to reach as a fraction of the model's
            (0.5: 0.5x), with `data`: each layer is measured alone at `RANK_GRID` ratios and
            ranks go where they cost the least loss per MAC saved (`passes.lowrank.
            allocate_ranks`); `report.allocation` has the ratios and measurements. A budget
            (`max_drop`/`min_cosine`) without a rank rule allocates the same way, taking the
            most MACs saved that hold it.
        data: validation data (an .npz path, stacked arrays with an optional labels key, or
            `LabelledData`): the report's `fidelity` is measured on all of it (with labels, its
            `accuracy` too: both models' top-1), and the budget and `target_macs` use it.
        budget, max_drop, min_cosine: an accuracy budget (`runtime.budget`): with a rank rule,
            when the rule's result misses it, the most sensitive layers are left whole until it
            holds
            (`FactorizeUnits`, `api.budget.search_units`); the report records which and why.
        metric: a user `Metric` replacing top-1 accuracy for `max_drop`.
        options: a `FactorizeOptions` instead of (or under) the keywords.

    Raises:
        BadOptionError: a ratio or energy outside (0, 1], several rank rules, a pattern that
            matches no node, an unknown op type or method, a budget or `target_macs` without
            data, `target_macs` with a rank rule or outside (0, 1), `energy`/`error_budget`
            with method "cp".
        VerificationError: no choice of layers meets the budget (measured figure in the
            message).
        UnsupportedModelError: a layer named by `include` has a non-constant weight; method
            "cp" on a model without KxK convs; a `target_macs` out of reach.
        ModelLoadError: `model` is a path that cannot be loaded.
        TypeError: an unknown keyword, or `options` that is not a `FactorizeOptions`.

    Example:
        >>> import slimgraph as sg
        >>> small = sg.factorize(model, rank_ratio=0.5, include=["*fc*"])  # doctest: +SKIP
    """
    return _factorize(as_model(model), options)[0]


def _factorize(model: ir.Model, options: FactorizeOptions) -> tuple[ir.Model, FactorizeReport]:
    factorized, report = _factorize_layers(model, options)
    if options.data is None or not report.layers:
        return factorized, report
    # the fidelity on the whole validation data, both models' accuracy with labels: what
    # `quantize --data` reports, by the same comparison
    fidelity = compare(model, factorized, as_data(options.data, model))
    report = dataclasses.replace(report, fidelity=fidelity)
    factorized.meta[metadata.FACTORIZE_REPORT] = report
    return factorized, report


def _factorize_layers(
    model: ir.Model, options: FactorizeOptions
) -> tuple[ir.Model, FactorizeReport]:
    options.check_method()
    judge = options.judge(model)
    has_rule = any(getattr(options, key) is not None for key in _RULES) or bool(
        options.layer_ratios)
    if options.target_macs is not None:
        if has_rule:
            raise BadOptionError.worded(
                "give {macs} or a rank rule ({rule}), not both: the target chooses the ranks",
                macs=("target_macs=", "--target-macs"),
                rule=("rank_ratio=, energy=, rank=, error_budget=",
                      "--rank-ratio, --energy, --rank, --error-budget"))
        if options.data is None:
            raise BadOptionError.worded("{macs} needs {data} (per-layer sensitivity)",
                                        macs=("target_macs=", "--target-macs"),
                                        data=("data=", "--data VAL.npz"))
        return _factorize_allocated(model, options, judge)
    if judge is None:
        return factorize_layers(model, options)
    if not has_rule:
        return _factorize_allocated(model, options, judge)
    return _factorize_within_budget(model, options, judge)


def _factorize_allocated(
    model: ir.Model, options: FactorizeOptions, judge: BudgetJudge | None
) -> tuple[ir.Model, FactorizeReport]:
    """Ranks per layer from measured curves (`allocate_ranks`): the least loss at the MAC target,
    or, under a budget alone, the most MACs saved that hold it; the budget checked at the end."""
    if judge is not None:
        scorer: Evaluator = judge
    else:
        assert options.data is not None  # checked by the caller
        scorer = Evaluator(model, as_data(options.data, model), metric=options.metric)
    rule = RuleOptions(**{**options.rule(), "feeds": None})

    def accept(candidate: ir.Model) -> bool:
        assert judge is not None
        return judge.holds(judge.evaluate(candidate))

    allocation = allocate_ranks(
        model, rule, lambda candidate: allocation_loss(scorer, scorer(candidate)),
        target_macs=options.target_macs, accept=None if options.target_macs else accept,
    )
    if not allocation.ratios:
        assert judge is not None
        raise VerificationError.worded(
            "no rank allocation meets the accuracy budget on {source}: even one layer "
            "factorized at rank ratio {ratio} misses {budget}; nothing written",
            source=judge.data.source, ratio=f"{max(RANK_GRID):g}",
            budget=judge.budget.describe())  # the largest ratio: the least loss measured
    factorized, found = factorize_layers(
        model, dataclasses.replace(allocated(options, allocation.ratios), feeds=options.feeds))
    evaluation = None
    if judge is not None:
        evaluation = judge.check(factorized, what="the factorized model")
    found = dataclasses.replace(found, evaluation=evaluation, allocation=allocation)
    factorized.meta[metadata.FACTORIZE_REPORT] = found
    return factorized, found


def _factorize_within_budget(
    model: ir.Model, options: FactorizeOptions, judge: BudgetJudge
) -> tuple[ir.Model, FactorizeReport]:
    """The rule's factorization with the most sensitive layers left whole until the budget
    holds; the report records which and why."""
    units = FactorizeUnits(model, RuleOptions(**options.rule()))  # no feeds: no fidelity runs
    search = BudgetSearch("low-rank factorization", judge.budget.describe())
    whole = search_units(units, judge, search)
    factorized, found = factorize_layers(
        model, dataclasses.replace(options, exclude=_excluded(options, whole) or None)
    )
    search.evaluation = judge.check(factorized, what="the factorized model")
    found = dataclasses.replace(found, evaluation=search.evaluation, budget_search=search)
    factorized.meta[metadata.FACTORIZE_REPORT] = found
    return factorized, found


def _excluded(options: RuleOptions, nodes: Sequence[str]) -> list[str]:
    """The rule's `exclude` patterns and the exact names of `nodes`."""
    exclude = options.exclude
    return [*([exclude] if isinstance(exclude, str) else exclude or ()),
            *map(exact_pattern, nodes)]


class FactorizeUnits:
    """Low-rank factorization of any subset of the layers the rank rule would split: the `Units`
    of the budget search and of sensitivity.

    Args:
        model: the model (not modified).
        options: the rank rule and layers (rank_ratio 0.25 when no rule is given).

    Raises:
        UnsupportedModelError: no layer gets smaller at this rank.
    """

    method = "factorize"

    def __init__(self, model: ir.Model, options: RuleOptions) -> None:
        if not any(getattr(options, key) is not None for key in _RULES):
            options = dataclasses.replace(options, rank_ratio=0.25)
        self.model, self.options = model, options
        _, report = factorize_layers(model, options)
        self._units = [Unit(layer.node, layer.layer, layer.op_type) for layer in report.layers]
        if not self._units:
            raise UnsupportedModelError("nothing to factorize: no layer gets smaller at this rank")
        self.setting = ", ".join(f"{key} {getattr(options, key)}" for key in _RULES
                                 if getattr(options, key) is not None)

    def units(self) -> list[Unit]:
        return list(self._units)

    def build(self, skip: Sequence[str] = ()) -> ir.Model:
        """The model factorized by the rule except the nodes in `skip` (left whole)."""
        if len(skip) >= len(self._units):
            return self.model
        options = dataclasses.replace(self.options, exclude=_excluded(self.options, skip))
        return factorize_layers(self.model, options)[0]

    def only(self, unit: Unit) -> tuple[ir.Model, int | None]:
        options = dataclasses.replace(self.options, include=[exact_pattern(unit.node)])
        model, report = factorize_layers(self.model, options)
        before, after = report.macs_before, report.macs_after
        return model, None if before is None or after is None else before - after
