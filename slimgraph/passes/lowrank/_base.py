"""What both factorization passes share: options, the per-layer report, shapes, new nodes."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from slimgraph.errors import UnsupportedModelError
from slimgraph.ir import analysis, copy_model, display_name, metadata
from slimgraph.passes._kit import (
    Names,
    PrepareWeightsPass,
    PrepareWeightsResult,
    add_initializer,
)
from slimgraph.passes.base import Skipped, SlimgraphPass, SlimgraphPassResult
from slimgraph.passes.lowrank._options import FactorizeOptions
from slimgraph.passes.lowrank._rank import AUTO_MAX_MACS_RATIO, AUTO_MIN_SAVED_MACS, RankPolicy
from slimgraph.runtime import Fidelity, compare, input_specs, iter_feeds

__all__ = [
    "LayerReport",
    "LowRankResult",
    "FactorizationPass",
    "Layer",
    "dims_from_feeds",
    "measure_fidelity",
    "prepare_weights",
]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


@dataclass(frozen=True)
class LayerReport:
    """One factorized layer.

    `shape` is the weight's stored shape; `rank` is `(k,)` for an SVD split and
    `(r_in, r_out)` for Tucker-2. Parameters count the weight and a constant bias. MACs are per
    run at the shapes the model was analysed with (symbolic dimensions from the sample feeds,
    else 1); None when unknown. `weight_error` is ||W - W_k||_F / ||W||_F of the factors as
    stored. `output_sqnr_db` is the SQNR of this layer's output in the factorized model against
    the original (so it includes the error of factorized layers before it); None without feeds.
    `shared_with` names the layer whose factors this one reuses (a tied weight).
    """

    layer: str
    node: str
    op_type: str
    method: Literal["svd", "tucker2", "cp"]
    shape: tuple[int, ...]
    rank: tuple[int, ...]
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    weight_error: float
    output: str = ""
    output_sqnr_db: float | None = None
    shared_with: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "node": self.node,
            "op_type": self.op_type,
            "method": self.method,
            "shape": list(self.shape),
            "rank": list(self.rank),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "weight_error": self.weight_error,
            "output_sqnr_db": self.output_sqnr_db,
            "shared_with": self.shared_with,
        }


@dataclass
class LowRankResult(SlimgraphPassResult):
    """`PassResult` plus the factorized layers and, with feeds, the whole model's fidelity."""

    layers: list[LayerReport] = field(default_factory=list)
    fidelity: Fidelity | None = None


@dataclass
class Layer:
    """A candidate node with what the passes need to know about it."""

    node: ir.Node
    name: str
    twin: ir.Node | None  # the same node in a shape-inferred copy (for MACs), if found
    explicit: bool


def dims_from_feeds(
    model: ir.Model, feeds: Mapping[str, np.ndarray] | None
) -> dict[str, int]:
    """Values of the model's symbolic input dimensions, read from one feed dict."""
    dims: dict[str, int] = {}
    if not feeds:
        return dims
    for spec in input_specs(model):
        array = feeds.get(spec.name)
        if array is None or spec.shape is None or len(spec.shape) != np.ndim(array):
            continue
        for dim, size in zip(spec.shape, np.shape(array), strict=True):
            if isinstance(dim, str):
                dims.setdefault(dim, int(size))
    return dims


def prepare_weights(model: ir.Model, op_types: Sequence[str]) -> int:
    """Fold the constant subgraphs computing the weights and biases of `op_types` nodes into
    initializers, in place, and return how many parameter inputs became constants.

    `PrepareWeightsPass(scope=op_types)`: torch exports transpose Linear weights and compute zero
    Conv biases from `Shape(weight)` at run time; old zoo files build weights with
    ConstantOfShape. Left unfolded, a replaced weight would stay in the file for its Shape alone.
    An IR-3 model (where every initializer must be a graph input, so a weight could be overridden
    at run time) is raised to IR 4 first, which lifts that rule and nothing else.
    """
    if model.ir_version is not None and model.ir_version < 4:
        model.ir_version = 4
    result = PrepareWeightsPass(scope=tuple(op_types))(model)
    assert isinstance(result, PrepareWeightsResult)
    return result.folded


class FactorizationPass(SlimgraphPass):
    """Shared driver: fold the selected layers' weights, select layers, decide each one,
    rewrite, then measure on sample feeds.

    Subclasses implement `factorize_layer`, which returns a `LayerReport` (the node was replaced)
    or a reason string (it was left alone). With `fold` (the default) the weights and biases of
    the op types the pass factorizes are folded to initializers first (`prepare_weights`), as
    `slimgraph.factorize` does, so a pipeline or sweep step gives the same model as the verb.
    A replaced weight that only Shape nodes still read is dropped, its shape written as a
    constant.
    """

    exact: ClassVar[bool] = False
    default_ops: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        *,
        rank_ratio: float | None = None,
        energy: float | None = None,
        error_budget: float | None = None,
        rank: int | Literal["auto"] | None = None,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        op_types: str | Sequence[str] | None = None,
        allow_growth: bool = False,
        feeds: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]] | None = None,
        dims: Mapping[str, int] | None = None,
        check_names: bool = True,
        layer_ratios: Mapping[str, float] | None = None,
        approximations: dict[str, np.ndarray] | None = None,
        fold: bool = True,
    ) -> None:
        super().__init__()
        self.check_names = check_names
        # filled with node name -> the weight its factors compute, when given (`record`)
        self.approximations = approximations
        self.fold = fold
        self.options = FactorizeOptions(
            rank_ratio=rank_ratio, energy=energy, error_budget=error_budget, rank=rank,
            include=include, exclude=exclude, allow_growth=allow_growth,
            op_types=self.default_ops if op_types is None else op_types,
            layer_ratios=layer_ratios,
        )
        self.layer_ratios = dict(layer_ratios or {})
        # with per-layer ratios alone, layers not named keep their weights (no rule for them)
        self.rule = self.options.policy() if not self.layer_ratios or any(
            value is not None for value in (rank_ratio, energy, error_budget, rank)
        ) else None
        self.policy = self.rule or RankPolicy(rank_ratio=1.0, allow_growth=allow_growth)
        self.filter = self.options.layer_filter()
        self.feeds = list(iter_feeds(feeds)) if feeds is not None else None
        self.dims = dict(dims) if dims is not None else None

    def requires(self, model: ir.Model) -> None:
        if self.check_names:
            self.filter.check_names(model.graph)

    def call(self, model: ir.Model) -> LowRankResult:
        folded = prepare_weights(model, self.filter.op_types) if self.fold else 0
        reference = model.clone() if self.feeds else None
        graph = model.graph
        dims = self.dims
        if dims is None:
            dims = dims_from_feeds(model, self.feeds[0] if self.feeds else None)
        layers = self._layers(model, dims)
        # per-call state for the helpers below; cleared on the way out
        self.graph = graph
        self.names = Names(graph)
        # tied weights: (kind, id(weight), ...) -> the first layer's report and factors
        self.cache: dict[tuple[Any, ...], tuple[LayerReport, tuple[ir.Value | None, ...]]] = {}
        try:
            reports, skipped = self._run(graph, layers)
        finally:
            del self.graph, self.names, self.cache
        fidelity = None
        if reference is not None and reports and self.feeds:
            fidelity, reports = measure_fidelity(reference, model, self.feeds, reports)
        return LowRankResult(model, bool(reports) or folded > 0, skipped, reports, fidelity)

    def _run(
        self, graph: ir.Graph, layers: Sequence[Layer]
    ) -> tuple[list[LayerReport], list[Skipped]]:
        reports: list[LayerReport] = []
        skipped: list[Skipped] = []
        replaced_weights: list[ir.Value] = []
        for layer in layers:
            weight = layer.node.inputs[1] if len(layer.node.inputs) > 1 else None
            ratio = self.layer_ratios.get(layer.node.name or "")
            if ratio is not None:
                self.policy = RankPolicy(rank_ratio=ratio, allow_growth=self.options.allow_growth)
            elif self.rule is None:
                skipped.append(Skipped(layer.node.name or layer.name, layer.node.op_type,
                                       "no rank allocated to this layer"))
                continue
            else:
                self.policy = self.rule
            outcome = self.factorize_layer(graph, layer)
            if isinstance(outcome, LayerReport):
                reports.append(outcome)
                if weight is not None:
                    replaced_weights.append(weight)
                logger.info(
                    "%s %s: rank %s, weight error %.4f",
                    outcome.method, outcome.layer, outcome.rank, outcome.weight_error,
                )
            else:
                skipped.append(Skipped(layer.node.name or layer.name, layer.node.op_type, outcome))
                logger.info("skipped %s (%s): %s", layer.name, layer.node.op_type, outcome)
        _drop_unused(graph, replaced_weights)
        return reports, skipped

    def factorize_layer(self, graph: ir.Graph, layer: Layer) -> LayerReport | str:
        raise NotImplementedError

    # -- helpers for subclasses ------------------------------------------------------------

    def _layers(self, model: ir.Model, dims: Mapping[str, int]) -> list[Layer]:
        nodes = list(model.graph)
        chosen = [i for i, node in enumerate(nodes) if self.filter.selects(node)]
        if not chosen:
            return []
        twins: list[ir.Node] | None = None
        try:
            shaped = list(analysis.with_static_shapes(model, dims).graph)
            if len(shaped) == len(nodes):
                twins = shaped
        except Exception as error:  # shapes only feed the MACs estimate
            logger.warning("shape analysis failed (%s); MACs unknown", error)
        return [
            Layer(
                nodes[i],
                display_name(nodes[i]),
                twins[i] if twins is not None else None,
                self.filter.explicit(nodes[i]),
            )
            for i in chosen
        ]

    def constant_weight(self, layer: Layer, value: ir.Value | None, what: str) -> np.ndarray | str:
        """The weight as an array, or why it cannot be factorized (an error if included)."""
        reason = None
        if value is None:
            reason = f"has no {what}"
        elif value.const_value is None:
            reason = f"{what} '{value.name}' is not a constant"
        elif value.is_graph_input():
            reason = f"{what} '{value.name}' is also a graph input (it can change at run time)"
        if reason is not None:
            if layer.explicit:
                raise UnsupportedModelError(
                    f"layer '{layer.name}' ({layer.node.op_type}) was included but its {reason}"
                )
            return reason
        assert value is not None and value.const_value is not None
        if value.const_value.dtype not in _FLOAT_TYPES:
            return f"{what} has data type {value.const_value.dtype.name}, not a float"
        return value.const_value.numpy()

    def gate(
        self,
        params_before: int,
        params_after: int,
        macs_before: int | None,
        macs_after: int | None,
    ) -> str | None:
        """Why a factorization does not pay (None when it does): it must hold fewer parameters
        and, where the MACs are known, cost fewer MACs (unless `allow_growth`); "auto" asks for
        the auto margins besides."""
        if params_after >= params_before and not self.policy.allow_growth:
            return (
                f"factors would hold {params_after} parameters, not fewer than {params_before}"
            )
        if (macs_before is not None and macs_after is not None and macs_after >= macs_before
                and not self.policy.allow_growth):  # a strided conv's first 1x1 runs at input size
            return f"factors would cost {macs_after} MACs, not fewer than {macs_before}"
        if not self.policy.auto:
            return None
        if macs_before is None or macs_after is None:
            macs_before, macs_after = params_before, params_after  # same ratio for SVD splits
            if macs_after > AUTO_MAX_MACS_RATIO * macs_before:
                share = macs_after / macs_before
                return f"auto: parameters fall only to {share:.2f}x (MACs unknown)"
            return None
        if macs_after > AUTO_MAX_MACS_RATIO * macs_before:
            return f"auto: MACs fall only to {macs_after / macs_before:.2f}x, likely not faster"
        if macs_before - macs_after < AUTO_MIN_SAVED_MACS:
            return f"auto: saves only {macs_before - macs_after} MACs, too few to be faster"
        return None

    def record(self, layer: Layer, approximation: np.ndarray, like: np.ndarray) -> None:
        """Keep the weight the factors compute (`like`'s shape and dtype) when asked to: a rank
        allocation measures a layer's factorization as the conv or product with that weight,
        which the chain equals (`passes.lowrank._allocate`)."""
        if self.approximations is not None:
            self.approximations[layer.node.name or layer.name] = np.asarray(
                approximation).reshape(like.shape).astype(like.dtype)

    def initializer(self, base: str, array: np.ndarray) -> ir.Value:
        """A new initializer holding `array`, named from `base` by this call's allocator."""
        return add_initializer(self.graph, base, array, names=self.names)

    @staticmethod
    def layer_report(
        layer: Layer,
        method: Literal["svd", "tucker2", "cp"],
        shape: Sequence[int],
        rank: tuple[int, ...],
        params: tuple[int, int],
        macs: tuple[int | None, int | None],
        weight_error: float,
        shared_with: str | None = None,
    ) -> LayerReport:
        """The `LayerReport` of `layer` replaced by factors: parameters and MACs are
        (before, after)."""
        return LayerReport(
            layer=layer.name,
            node=layer.node.name or "",
            op_type=layer.node.op_type,
            method=method,
            shape=tuple(shape),
            rank=rank,
            params_before=params[0],
            params_after=params[1],
            macs_before=macs[0],
            macs_after=macs[1],
            weight_error=weight_error,
            output=layer.node.outputs[0].name or "",
            shared_with=shared_with,
        )

    def new_node(
        self,
        original: ir.Node,
        suffix: str,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: Mapping[str, Any] | None = None,
    ) -> ir.Node:
        """A node derived from `original`: same layer metadata, a fresh name and output name."""
        base = original.name or original.op_type
        node = ir.node(
            op_type,
            inputs,
            attributes=dict(attributes or {}),
            name=self.names.fresh(f"{base}/{suffix}"),
            metadata_props=dict(original.metadata_props),
        )
        layer = display_name(original)
        if layer and layer != original.name:
            node.metadata_props[metadata.LAYER] = layer
        node.outputs[0].name = self.names.fresh(f"{base}/{suffix}_out")
        return node

    @staticmethod
    def replace(graph: ir.Graph, original: ir.Node, new_nodes: Sequence[ir.Node]) -> None:
        """Put `new_nodes` in place of `original`; the last one's output takes over its output."""
        last = new_nodes[-1].outputs[0]
        old = original.outputs[0]
        ir.convenience.replace_nodes_and_values(
            graph, original, [original], new_nodes, [old], [last]
        )


def _drop_unused(graph: ir.Graph, weights: Iterable[ir.Value]) -> None:
    """Remove replaced weight initializers nothing reads any more; Shape nodes that still read
    one (a computed zero bias, when weights were not folded) read its shape as a constant."""
    names = Names(graph)
    for value in weights:
        name = value.name
        if (
            name is None
            or name not in graph.initializers
            or graph.initializers[name] is not value
            or value.is_graph_output()
            or value.is_graph_input()
        ):
            continue
        readers = {user for user, _ in value.uses()}
        if readers and all(_plain_shape(user) and not user.outputs[0].is_graph_output()
                           for user in readers):
            assert value.const_value is not None
            for user in readers:
                _fold_shape(graph, user, tuple(value.const_value.shape.numpy()), names)
        if not value.uses():
            del graph.initializers[name]


def _plain_shape(node: ir.Node) -> bool:
    return node.op_type == "Shape" and node.domain in ("", "ai.onnx")


def _fold_shape(graph: ir.Graph, node: ir.Node, dims: tuple[int, ...], names: Names) -> None:
    """Replace a Shape node of a constant by an int64 initializer of its (start:end) slice."""
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", len(dims))
    constant = add_initializer(
        graph, f"{node.outputs[0].name or 'shape'}_folded",
        np.asarray(dims[start:end], dtype=np.int64), names=names,
    )
    ir.convenience.replace_all_uses_with(node.outputs[0], constant)
    graph.remove(node, safe=True)


def _with_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of `model` that also outputs the named intermediate values."""
    copy = copy_model(model)
    values = {
        value.name: value for node in copy.graph for value in node.outputs if value.name
    }
    present = {value.name for value in copy.graph.outputs}
    for name in names:
        if name in values and name not in present:
            copy.graph.outputs.append(values[name])
            present.add(name)
    return copy


def measure_fidelity(
    reference: ir.Model,
    candidate: ir.Model,
    feeds: Sequence[Mapping[str, np.ndarray]],
    layers: Sequence[LayerReport],
) -> tuple[Fidelity, list[LayerReport]]:
    """Whole-model fidelity of `candidate`, and each layer's output SQNR, on onnxruntime."""
    names = [layer.output for layer in layers if layer.output]
    fidelity = compare(_with_outputs(reference, names), _with_outputs(candidate, names), feeds)
    by_name = {output.name: output for output in fidelity.outputs}
    model_outputs = tuple(
        by_name[value.name] for value in reference.graph.outputs if value.name in by_name
    )
    measured = [
        replace(layer, output_sqnr_db=by_name[layer.output].sqnr_db)
        if layer.output in by_name
        else layer
        for layer in layers
    ]
    return replace(fidelity, outputs=model_outputs), measured
