"""Low-rank factorization of a whole model: fold weights, split linears, Tucker-2 convs, report.

`factorize_layers` is what the public `slimgraph.factorize` (`slimgraph.api.factorize`) runs;
`FactorizeReport` what it reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph._tables import format_count, format_db, format_ratio, render_table
from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import analysis, copy_model, metadata
from slimgraph.passes.base import Skipped
from slimgraph.passes.lowrank._base import (
    LayerReport,
    LowRankResult,
    dims_from_feeds,
    measure_fidelity,
    prepare_weights,
)
from slimgraph.passes.lowrank._cp import CPConv
from slimgraph.passes.lowrank._linear import LowRankLinear
from slimgraph.passes.lowrank._options import FactorizeOptions
from slimgraph.passes.lowrank._rank import RankPolicy
from slimgraph.passes.lowrank._select import SUPPORTED_OPS
from slimgraph.passes.lowrank._tucker import TuckerConv
from slimgraph.runtime import Fidelity, iter_feeds
from slimgraph.runtime.metrics import Evaluation

__all__ = ["FactorizeReport", "factorize_layers", "fold_weights"]

# a factorization keeping more of the MACs than this says that low rank gains little here
LITTLE_GAIN = 0.95


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
    budget_search: Any = None  # the `api.budget.BudgetSearch` (layers left whole, why)
    allocation: Any = None  # the `RankAllocation` (ranks per layer), under a MAC target

    def __str__(self) -> str:
        """The per-layer table, totals, fidelity and skip reasons `slimgraph factorize` prints."""
        rows = [
            [r.layer, r.op_type, r.method, "x".join(str(d) for d in r.shape),
             "/".join(str(k) for k in r.rank) + (" *" if r.shared_with else ""),
             f"{_count(r.params_before)} -> {_count(r.params_after)}",
             f"{_count(r.macs_before)} -> {_count(r.macs_after)}", f"{r.weight_error:.4f}",
             format_db(r.output_sqnr_db)]
            for r in self.layers
        ]  # fmt: skip
        lines = []
        if rows:
            lines += [render_table(["layer", "op", "method", "weight", "rank", "params", "MACs",
                                    "W err", "SQNR dB"], rows, align="lllllrrrr"), ""]
        lines.append(
            f"factorized {len(self.layers)} layers, skipped {len(self.skipped)}"
            + (f"; folded {self.folded} computed weights/biases first" if self.folded else "")
        )
        lines.append(f"parameters: {_count(self.params_before)} -> {_count(self.params_after)} "
                     f"({_ratio(self.params_after, self.params_before)})")
        lines.append(f"MACs:       {_count(self.macs_before)} -> {_count(self.macs_after)} "
                     f"({_ratio(self.macs_after, self.macs_before)})")
        if (self.layers and self.macs_before and self.macs_after is not None
                and self.macs_after > LITTLE_GAIN * self.macs_before):
            lines.append(f"note: MACs fall by {1 - self.macs_after / self.macs_before:.1%} only: "
                         "most of them are in layers left whole (skipped, below); low rank "
                         "gains little on this model, channel pruning (prune) may")
        if self.fidelity is not None:
            lines.append(f"outputs:    {self.fidelity.worst()}")
            if self.fidelity.accuracy is not None:
                lines.append(f"accuracy:   {self.fidelity.accuracy}")
        if self.allocation is not None:
            lines.append(self.allocation.summary())
        if any(r.shared_with for r in self.layers):
            lines.append("* reuses the factors of a tied weight")
        reasons: dict[str, int] = {}
        for skipped in self.skipped:
            reasons[skipped.reason] = reasons.get(skipped.reason, 0) + 1
        for reason, count in sorted(reasons.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"skipped {count:>3}: {reason}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"<FactorizeReport: {len(self.layers)} layers factorized, {len(self.skipped)} "
                f"skipped, parameters {_ratio(self.params_after, self.params_before)}>")

    def to_dict(self) -> dict[str, Any]:
        return {
            "evaluation": None if self.evaluation is None else self.evaluation.to_dict(),
            "budget": None if self.budget_search is None else self.budget_search.to_dict(),
            "allocation": None if self.allocation is None else self.allocation.to_dict(),
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


def _count(value: int | None) -> str:
    return "?" if value is None else format_count(value)


def _ratio(after: int | None, before: int | None) -> str:
    return format_ratio(after / before if after is not None and before else None)


def fold_weights(model: ir.Model, op_types: Sequence[str] = SUPPORTED_OPS) -> int:
    """Fold the constant subgraphs that compute weights and biases of `op_types` nodes, in place.

    `prepare_weights` (`PrepareWeightsPass(scope=op_types)`): torch exports transpose Linear
    weights and compute zero Conv biases from the weight's Shape at run time; old zoo files build
    weights with ConstantOfShape. Initializers feeding them that are also listed as graph inputs
    (old exporters) stop being inputs, since a weight that can be overridden at run time cannot be
    factorized; an IR-3 model is raised to IR 4 for that. Returns how many weight and bias inputs
    became constants.
    """
    return prepare_weights(model, op_types)


def prepared(model: ir.Model, options: FactorizeOptions) -> tuple[ir.Model, int]:
    """A copy of `model` as the factorization passes see it: IR version 4 at least, weights
    folded (`options.fold`, `fold_weights`); and how many weights and biases were folded."""
    work = copy_model(model)
    if work.ir_version is not None and work.ir_version < 4:
        # IR 3 requires every initializer to be a graph input, which would make new factors
        # (and folded weights) overridable at run time; IR 4 lifts that rule, nothing else.
        work.ir_version = 4
    folded = fold_weights(work, options.layer_filter().op_types) if options.fold else 0
    return work, folded


def factorize_layers(
    model: ir.Model, options: FactorizeOptions, *,
    approximations: dict[str, np.ndarray] | None = None,
) -> tuple[ir.Model, FactorizeReport]:
    """Low-rank factorization of a copy of `model` as `slimgraph.factorize` describes it (no
    budget): weights folded first (`options.fold`), Gemm/MatMul split by SVD (`LowRankLinear`),
    then Conv by Tucker-2 (`TuckerConv`), and the report.

    `approximations`, when given, is filled with node name -> the weight each factorized layer's
    factors compute (its stored shape and dtype; the chain equals the layer with that weight).

    Raises:
        BadOptionError: a bad rank rule, pattern or op type (see `FactorizeOptions`).
        UnsupportedModelError: a layer named by `include` has a non-constant weight.
        InvalidModelError: a weight holds NaN/Inf.
    """
    options.check_method()
    if options.method == "cp" and options.pointwise_convs:
        raise BadOptionError("--method cp splits KxK convs only: drop --pointwise-convs, or use "
                             "--method tucker to split 1x1 convs by SVD")
    ratios_only = bool(options.layer_ratios) and all(
        getattr(options, name) is None for name in ("rank_ratio", "energy", "error_budget", "rank")
    )
    policy = RankPolicy(rank_ratio=1.0, allow_growth=options.allow_growth) if ratios_only else (
        options.policy())
    layer_filter = options.layer_filter()
    samples = list(iter_feeds(options.feeds)) if options.feeds is not None else None
    work, folded = prepared(model, options)
    analysis.check_finite_weights(work)  # an SVD of NaN fails deep inside LAPACK
    layer_filter.check_names(work.graph)
    params_before = analysis.parameter_count(work)  # after folding: weights are initializers
    reference = work.clone() if samples else None
    dims = dims_from_feeds(work, samples[0] if samples else None)
    macs_before = _total_macs(work, dims)  # the same folded model as params_before
    pass_options: dict[str, Any] = {
        **asdict(policy),  # rank_ratio, energy, error_budget, rank, allow_growth
        **({"rank_ratio": None} if ratios_only else {}),
        "layer_ratios": options.layer_ratios,
        "include": layer_filter.include,
        "exclude": layer_filter.exclude or None,
        "dims": dims,
        "check_names": False,  # checked above, before the first pass renames what it replaces
        "approximations": approximations,
        "fold": False,  # folded above (or not, as asked), once for every pass
    }
    layers: list[LayerReport] = []
    skipped: list[Skipped] = []
    linear_ops = tuple(op for op in layer_filter.op_types if op in ("Gemm", "MatMul"))
    passes: list[LowRankLinear | TuckerConv | CPConv] = []
    if linear_ops:
        passes.append(LowRankLinear(op_types=linear_ops, **pass_options))
    if "Conv" in layer_filter.op_types and options.method == "cp":
        if not any(layer_filter.selects(node) and _spatial_kernel(node) for node in work.graph):
            raise UnsupportedModelError(
                "--method cp splits convolutions with a KxK kernel: the model has none "
                "selected (no Conv whose weight is 4-D with a kernel larger than 1x1)")
        passes.append(CPConv(op_types=("Conv",), **pass_options))
    elif "Conv" in layer_filter.op_types:
        passes.append(TuckerConv(op_types=("Conv",), pointwise=options.pointwise_convs,
                                 output_only=options.method == "svd", **pass_options))
    for factorization in passes:
        result = factorization(work)
        assert isinstance(result, LowRankResult)
        layers += result.layers
        skipped += result.skipped
    fidelity = None
    if reference is not None and samples:
        fidelity, layers = measure_fidelity(reference, work, samples, layers)
    report = FactorizeReport(
        layers=tuple(layers),
        skipped=tuple(skipped),
        folded=folded,
        params_before=params_before,
        params_after=analysis.parameter_count(work),
        macs_before=macs_before,
        macs_after=_total_macs(work, dims),
        fidelity=fidelity,
        options={
            "rank_ratio": options.rank_ratio,
            "energy": options.energy,
            "error_budget": options.error_budget,
            "rank": options.rank,
            "include": list(layer_filter.include or ()),
            "exclude": list(layer_filter.exclude),
            "op_types": list(layer_filter.op_types),
            "pointwise_convs": options.pointwise_convs,
            "method": options.method,
            "layer_ratios": dict(options.layer_ratios) if options.layer_ratios else None,
        },
    )
    work.meta[metadata.FACTORIZE_REPORT] = report
    return work, report


def _spatial_kernel(node: ir.Node) -> bool:
    """A Conv whose weight is a constant (C_out, C_in, Kh, Kw) with Kh x Kw > 1."""
    if node.op_type != "Conv" or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    weight = node.inputs[1]
    shape = weight.shape if weight.const_value is None else weight.const_value.shape
    return shape is not None and len(shape) == 4 and all(
        isinstance(d, int) for d in shape[2:]) and shape[2] * shape[3] > 1  # type: ignore[operator]


def _total_macs(model: ir.Model, dims: Mapping[str, int]) -> int | None:
    try:
        macs = analysis.model_macs(model, dims)
    except Exception:  # MACs are a report figure; never fail the transformation over them
        return None
    return sum(macs.values()) if macs else None

