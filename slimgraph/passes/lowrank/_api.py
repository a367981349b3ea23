"""`factorize`: the public low-rank entry point (fold weights, split linears, Tucker-2 convs)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer

from slimgraph.ir import ModelLike, analysis, as_model, copy_model, metadata
from slimgraph.passes.base import Skipped
from slimgraph.passes.lowrank._base import LayerReport, dims_from_feeds, measure_fidelity
from slimgraph.passes.lowrank._linear import LowRankLinear
from slimgraph.passes.lowrank._rank import RankPolicy
from slimgraph.passes.lowrank._select import SUPPORTED_OPS, LayerFilter
from slimgraph.passes.lowrank._tucker import TuckerConv
from slimgraph.runtime import Fidelity, iter_feeds
from slimgraph.runtime.budget import Budget, DataLike, budget_judge
from slimgraph.runtime.metrics import Evaluation, Metric

__all__ = ["FactorizeReport", "factorize", "factorize_with_report", "fold_weights"]

# Ops whose results are not fixed by their inputs' values.
_NEVER_FOLD = frozenset({"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike"})

Feeds = Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class FactorizeReport:
    """What `factorize` did: per-layer reports, skipped layers, totals and fidelity.

    `folded` counts weights and biases computed by constant subgraphs (a Transpose of an
    initializer in torch exports, ConstantOfShape in old zoo files) and were folded to
    initializers first. Parameters are all initializer elements of the model; MACs are those of
    Conv/Gemm/MatMul nodes at the analysed shapes (None when shapes are unknown).
    """

    layers: tuple[LayerReport, ...]
    skipped: tuple[Skipped, ...]
    folded: int
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    fidelity: Fidelity | None = None
    options: dict[str, Any] = field(default_factory=dict)
    evaluation: Evaluation | None = None  # on the budget's data, when a budget was given
    budget_search: Any = None  # the `passes.budgeted.BudgetSearch` (layers left whole, why)

    def to_dict(self) -> dict[str, Any]:
        return {
            "evaluation": None if self.evaluation is None else self.evaluation.to_dict(),
            "budget": None if self.budget_search is None else self.budget_search.to_dict(),
            "options": self.options,
            "layers": [layer.to_dict() for layer in self.layers],
            "skipped": [
                {"node": s.node, "op_type": s.op_type, "reason": s.reason} for s in self.skipped
            ],
            "factorized": len(self.layers),
            "skipped_count": len(self.skipped),
            "folded_weights": self.folded,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "fidelity": None if self.fidelity is None else self.fidelity.to_dict(),
        }


def fold_weights(model: ir.Model, op_types: Sequence[str] = SUPPORTED_OPS) -> int:
    """Fold the constant subgraphs that compute weights and biases of `op_types` nodes, in place.

    Uses onnxscript's constant folder, with no size limit and ConstantOfShape included, folding
    only the nodes upstream of those inputs (its exact op-level simplifications, Identity or
    shape arithmetic, may still apply elsewhere). torch exports
    transpose Linear weights and compute zero Conv biases from the weight's Shape at run time;
    old zoo files build weights with ConstantOfShape. Initializers feeding them that are also
    listed as graph inputs (old exporters) stop being inputs, since a weight that can be
    overridden at run time cannot be factorized. Returns how many weight and bias inputs became
    constants.
    """
    graph = model.graph
    candidates = [
        node for node in graph if node.op_type in op_types and node.domain in ("", "ai.onnx")
    ]
    waiting = [
        (node, index)
        for node in candidates
        for index, value in enumerate(node.inputs[1:3], start=1)
        if value is not None and value.const_value is None
    ]
    # nodes computed from initializers alone (graph inputs that are initializers count too)
    static: set[int] = set()
    for node in graph:
        if node.op_type in _NEVER_FOLD or any(
            attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for attr in node.attributes.values()
        ):
            continue
        # CastLike reads only the type of its second input (torch exports use it on zero biases)
        inputs = node.inputs[:1] if node.op_type == "CastLike" else node.inputs
        if all(
            value is None
            or value.const_value is not None
            or (value.producer() is not None and id(value.producer()) in static)
            for value in inputs
        ):
            static.add(id(node))
    # The cone is kept by output names: onnxscript replaces some nodes while folding (CastLike
    # becomes a new Cast) and the replacements keep their outputs' names.
    cone: set[str] = set()
    cone_inputs: set[int] = set()
    stack = [node.inputs[index] for node, index in waiting]
    while stack:
        value = stack.pop()
        source = value.producer() if value is not None else None
        if source is None:
            if value is not None:
                cone_inputs.add(id(value))
            continue
        if value.name in cone or id(source) not in static:
            continue
        cone.update(output.name for output in source.outputs if output.name)
        stack.extend(source.inputs)
    if not cone:
        return 0
    for value in list(graph.inputs):
        if id(value) in cone_inputs and value.is_initializer():
            graph.inputs.remove(value)
    onnxscript.optimizer.fold_constants(
        model,
        input_size_limit=2**62,
        output_size_limit=2**62,
        should_fold=lambda node: any(output.name in cone for output in node.outputs),
    )
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return sum(
        1
        for node, index in waiting
        if node.graph is graph and node.inputs[index].const_value is not None
    )


def factorize_with_report(
    model: ModelLike,
    *,
    rank_ratio: float | None = None,
    energy: float | None = None,
    rank: int | Literal["auto"] | None = None,
    error_budget: float | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    op_types: str | Sequence[str] = SUPPORTED_OPS,
    feeds: Feeds | None = None,
    pointwise_convs: bool = False,
    allow_growth: bool = False,
    fold: bool = True,
    data: DataLike | None = None,
    budget: Budget | None = None,
    max_drop: float | None = None,
    min_cosine: float | None = None,
    metric: Metric | None = None,
) -> tuple[ir.Model, FactorizeReport]:
    """`factorize`, returning the new model and its `FactorizeReport`.

    Args: as for `factorize`.

    Returns:
        (factorized model, `FactorizeReport` with per-layer ranks, parameters and MACs).

    Raises: as for `factorize`.
    """
    model = as_model(model)
    judge = budget_judge(model, data, budget=budget, max_drop=max_drop, min_cosine=min_cosine,
                         metric=metric)
    if judge is not None:
        from slimgraph.ir.select import exact_pattern
        from slimgraph.passes.budgeted import factorize_with_budget

        rule = dict(rank_ratio=rank_ratio, energy=energy, rank=rank, error_budget=error_budget,
                    include=include, exclude=exclude, op_types=op_types,
                    pointwise_convs=pointwise_convs, allow_growth=allow_growth, fold=fold)
        whole, search = factorize_with_budget(model, judge, **rule)
        excluded = [*([exclude] if isinstance(exclude, str) else exclude or ()),
                    *map(exact_pattern, whole)]
        factorized, found = factorize_with_report(
            model, **{**rule, "exclude": excluded or None}, feeds=feeds,  # type: ignore[arg-type]
        )
        search.evaluation = judge.check(factorized, what="the factorized model")
        found = replace(found, evaluation=search.evaluation, budget_search=search)
        factorized.meta[metadata.FACTORIZE_REPORT] = found
        return factorized, found
    policy = RankPolicy(rank_ratio, energy, error_budget, rank, allow_growth)
    layer_filter = LayerFilter.create(include, exclude, op_types)
    samples = list(iter_feeds(feeds)) if feeds is not None else None
    work = copy_model(model)
    if work.ir_version is not None and work.ir_version < 4:
        # IR 3 requires every initializer to be a graph input, which would make new factors
        # (and folded weights) overridable at run time; IR 4 lifts that rule, nothing else.
        work.ir_version = 4
    folded = fold_weights(work, layer_filter.op_types) if fold else 0
    analysis.check_finite_weights(work)  # an SVD of NaN fails deep inside LAPACK
    layer_filter.check_names(work.graph)
    params_before = analysis.parameter_count(work)  # after folding: weights are initializers
    reference = work.clone() if samples else None
    dims = dims_from_feeds(work, samples[0] if samples else None)
    macs_before = _total_macs(work, dims)  # the same folded model as params_before
    options: dict[str, Any] = dict(
        rank_ratio=policy.rank_ratio,
        energy=policy.energy,
        error_budget=policy.error_budget,
        rank=policy.rank,
        allow_growth=allow_growth,
        include=layer_filter.include,
        exclude=layer_filter.exclude or None,
        dims=dims,
        check_names=False,  # checked above, before the first pass renames what it replaces
    )
    layers: list[LayerReport] = []
    skipped: list[Skipped] = []
    linear_ops = tuple(op for op in layer_filter.op_types if op in ("Gemm", "MatMul"))
    if linear_ops:
        result = LowRankLinear(op_types=linear_ops, **options)(work)
        layers += result.layers
        skipped += result.skipped
    if "Conv" in layer_filter.op_types:
        result = TuckerConv(op_types=("Conv",), pointwise=pointwise_convs, **options)(work)
        layers += result.layers
        skipped += result.skipped
    fidelity = None
    if reference is not None and samples:
        fidelity, layers = measure_fidelity(reference, work, samples, layers)
    macs_after = _total_macs(work, dims)
    report = FactorizeReport(
        layers=tuple(layers),
        skipped=tuple(skipped),
        folded=folded,
        params_before=params_before,
        params_after=analysis.parameter_count(work),
        macs_before=macs_before,
        macs_after=macs_after,
        fidelity=fidelity,
        options={
            "rank_ratio": rank_ratio,
            "energy": energy,
            "error_budget": error_budget,
            "rank": rank,
            "include": list(layer_filter.include or ()),
            "exclude": list(layer_filter.exclude),
            "op_types": list(layer_filter.op_types),
            "pointwise_convs": pointwise_convs,
        },
    )
    work.meta[metadata.FACTORIZE_REPORT] = report
    return work, report


def factorize(
    model: ModelLike,
    *,
    rank_ratio: float | None = None,
    energy: float | None = None,
    rank: int | Literal["auto"] | None = None,
    error_budget: float | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    op_types: str | Sequence[str] = SUPPORTED_OPS,
    feeds: Feeds | None = None,
    pointwise_convs: bool = False,
    allow_growth: bool = False,
    fold: bool = True,
    data: DataLike | None = None,
    budget: Budget | None = None,
    max_drop: float | None = None,
    min_cosine: float | None = None,
    metric: Metric | None = None,
) -> ir.Model:
    """Low-rank factorization of a model's Gemm/MatMul (SVD) and Conv (Tucker-2) layers.

    Returns a new model; `model` is not changed. The `FactorizeReport` (per-layer ranks,
    parameters, MACs, weight errors and, with `feeds`, output SQNR and model fidelity) is in the
    result's `.meta["slimgraph.factorize_report"]` (`slimgraph.ir.metadata.FACTORIZE_REPORT`);
    `factorize_with_report` returns it directly. Approximate: outputs change.

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
        feeds: sample inputs (a feed dict or an iterable of them) to measure fidelity.
        pointwise_convs: also split 1x1 convs by SVD (skipped by default).
        allow_growth: factorize even where the factors are larger than the weight.
        fold: fold constant weight subgraphs first.
        data: validation data for the budget (an .npz path, stacked arrays with an optional
            labels key, or `LabelledData`).
        budget, max_drop, min_cosine: an accuracy budget (`runtime.budget`): when the rule's
            result misses it, the most sensitive layers are left whole until it holds
            (`passes.budgeted.factorize_with_budget`); the report records which and why.
        metric: a user `Metric` replacing top-1 accuracy for `max_drop`.

    Raises:
        BadOptionError: a ratio or energy outside (0, 1], several rank rules, a pattern that
            matches no node, an unknown op type, a budget without data.
        VerificationError: no choice of layers meets the budget (measured figure in the
            message).
        UnsupportedModelError: a layer named by `include` has a non-constant weight.
        ModelLoadError: `model` is a path that cannot be loaded.

    Example:
        >>> import slimgraph as sg
        >>> small = sg.factorize(model, rank_ratio=0.5, include=["*fc*"])  # doctest: +SKIP
    """
    model = as_model(model)
    result, _ = factorize_with_report(
        model,
        rank_ratio=rank_ratio,
        energy=energy,
        rank=rank,
        error_budget=error_budget,
        include=include,
        exclude=exclude,
        op_types=op_types,
        feeds=feeds,
        pointwise_convs=pointwise_convs,
        allow_growth=allow_growth,
        fold=fold,
        data=data,
        budget=budget,
        max_drop=max_drop,
        min_cosine=min_cosine,
        metric=metric,
    )
    return result


def _total_macs(model: ir.Model, dims: Mapping[str, int]) -> int | None:
    try:
        macs = analysis.model_macs(model, dims)
    except Exception:  # MACs are a report figure; never fail the transformation over them
        return None
    return sum(macs.values()) if macs else None

