"""Structured pruning that physically removes channels from the ONNX graph, and magnitude pruning.

Structured (approximate in general, exact for channels whose producing weights are zero):
1. prepare a copy: constants folded (weights built by ConstantOfShape, transposed weights, shape
   constants), initializers dropped from the graph inputs, shapes inferred;
2. trace channel-dependency groups (`slimgraph.ir.channels`);
3. score each group channel (L1/L2 of the producing weights summed over the group, BatchNorm
   |gamma|, or random) and choose what to remove, per group (local) or with one threshold over
   normalized scores (global), keeping a multiple of `round_to` and at least one channel;
4. slice the producers' weights and biases, BatchNorm and per-channel constants, the consumers'
   input channels, Reshape/Split/Slice/Resize constants and conv group counts; in pad mode scatter
   pruned tensors back to full size with zeros (Pad + constant-index Gather) where they meet a
   graph output or a consumer that must keep its channel count (seed 001);
5. re-infer shapes.

Unstructured (`unstructured=True`): zero the smallest-magnitude weights of Conv, ConvTranspose,
Gemm and MatMul (per layer or one global threshold); shapes stay, a sparsity report per layer.

Example:
    >>> pruned = prune(model, ratio=0.5)  # doctest: +SKIP
    >>> pruned, report = prune_with_report(model, ratio=0.5, pad=True)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import ModelLike, as_model, copy_model
from slimgraph.ir import analysis as ir_analysis
from slimgraph.ir.channels import ChannelAnalysis, ChannelGroup, analyze_channels, node_label
from slimgraph.ir.select import check_patterns, matching_pattern, node_names
from slimgraph.passes._graph_utils import opset_version
from slimgraph.passes.base import SlimgraphFunctionalPass, SlimgraphPassResult
from slimgraph.passes.registry import register_pass
from slimgraph.runtime.budget import Budget, DataLike, budget_judge
from slimgraph.runtime.metrics import Evaluation, Metric

__all__ = [
    "CRITERIA",
    "SCOPES",
    "GroupReport",
    "LayerChannels",
    "LayerSparsity",
    "PruneReport",
    "PruneResult",
    "PrunePass",
    "prepare_for_pruning",
    "channel_scores",
    "kept_count",
    "select_channels",
    "remove_channels",
    "prune",
    "prune_with_report",
    "group_key",
    "prunable_units",
]

logger = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "bn", "random")
SCOPES = ("local", "global")
_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
UNSTRUCTURED_NOTE = (
    "note: unstructured pruning only zeroes weights: they are still stored densely, so the file "
    "does not shrink and onnxruntime runs the model no faster (it has no sparse kernels); "
    "structured pruning (without --unstructured) removes channels and does both"
)
_FOLD_LIMIT = 1 << 40  # fold weights of any size (zoo models build theirs with ConstantOfShape)


@dataclasses.dataclass(frozen=True)
class GroupReport:
    """One channel group: its size, what stays, and why it could not shrink (if so)."""

    id: int
    channels: int
    kept: int
    producers: tuple[str, ...]
    reason: str = ""
    padded: int = 0  # edges padded back to full size


@dataclasses.dataclass(frozen=True)
class LayerChannels:
    """Output channels of one producing layer before and after.

    `kept` lists the indices (into the layer's original output channels, ascending) that stay.
    """

    layer: str
    op_type: str
    before: int
    after: int
    kept: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """Unstructured pruning of one weight: elements and zeros after."""

    layer: str
    op_type: str
    elements: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.elements if self.elements else 0.0


@dataclasses.dataclass
class PruneReport:
    """What `prune` did: groups, channels per layer, parameters and MACs before/after."""

    ratio: float
    criterion: str
    scope: str
    pad: bool
    unstructured: bool
    groups: list[GroupReport] = dataclasses.field(default_factory=list)
    layers: list[LayerChannels] = dataclasses.field(default_factory=list)
    sparsity: list[LayerSparsity] = dataclasses.field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    layer_ratios: dict[str, float] = dataclasses.field(default_factory=dict)
    evaluation: Evaluation | None = None  # on the budget's data, when a budget was given
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for row, layer in zip(data["sparsity"], self.sparsity, strict=True):
            row["sparsity"] = layer.sparsity
        data["evaluation"] = None if self.evaluation is None else self.evaluation.to_dict()
        return data


@dataclasses.dataclass
class PruneResult(SlimgraphPassResult):
    """`PassResult` plus the `PruneReport`."""

    report: PruneReport | None = None


# -- preparation ------------------------------------------------------------------------------


def prepare_for_pruning(model: ir.Model) -> ir.Model:
    """A copy of `model` with constants folded and lifted to initializers and shapes inferred.

    Exact: only constant subgraphs are evaluated. Pruning needs weights, Reshape shapes and axes
    as initializers, and static channel counts.
    """
    import onnxscript.optimizer

    prepared = copy_model(model)
    ir_common.RemoveInitializersFromInputsPass()(prepared)
    onnxscript.optimizer.fold_constants(
        prepared,
        input_size_limit=_FOLD_LIMIT,
        output_size_limit=_FOLD_LIMIT,
        should_fold=_fold_constant_of_shape,
    )
    ir_common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(prepared)
    ir_common.RemoveUnusedNodesPass()(prepared)
    ir_common.ShapeInferencePass(strict_mode=False)(prepared)
    return prepared


def _fold_constant_of_shape(node: ir.Node) -> bool | None:
    """onnxscript keeps ConstantOfShape by default; pruning needs those weights as tensors."""
    return True if node.op_type == "ConstantOfShape" and node.domain in ("", "ai.onnx") else None


def _excluded_predicate(graph: ir.Graph, exclude: Sequence[str], exclude_ops: Sequence[str]):
    """A node predicate for the exclusions; every pattern must match some node."""
    nodes = list(graph)
    check_patterns(nodes, exclude)
    present = {node.op_type for node in nodes}
    for op in exclude_ops:
        if op not in present:
            raise BadOptionError(f"--exclude-op {op!r}: the model has no {op} node")

    def excluded(node: ir.Node) -> bool:
        return node.op_type in exclude_ops or any(_matches(node, p) for p in exclude)

    return excluded


def _matches(node: ir.Node, pattern: str) -> bool:
    return matching_pattern(node, (pattern,)) is not None


# -- importance and selection -----------------------------------------------------------------


def channel_scores(
    analysis: ChannelAnalysis,
    groups: Sequence[ChannelGroup],
    criterion: str,
    rng: np.random.Generator,
) -> dict[int, np.ndarray]:
    """Importance of each channel of each group, by group id (higher = keep).

    l1/l2: norm of the producing weights' slices, summed over all producers of the group; bn:
    |gamma| of the group's BatchNormalizations (l1 for groups without one); random: uniform.
    """
    if criterion == "random":
        return {g.id: rng.random(g.size) for g in groups}
    channel_of = {root: (g.id, i) for g in groups for i, root in enumerate(g.roots)}
    scores = {g.id: np.zeros(g.size) for g in groups}
    found: set[int] = set()
    roles = ("bn_scale",) if criterion == "bn" else ("producer",)
    roots_cache: dict[int, list[int]] = {}
    for use in analysis.weight_uses:
        if use.role not in roles:
            continue
        if use.slot not in roots_cache:
            roots_cache[use.slot] = analysis.roots_of(analysis.slots[use.slot]).tolist()
        roots = roots_cache[use.slot]
        if not any(root in channel_of for root in roots):
            continue
        array = use.node.inputs[use.input_index].const_value.numpy()
        rows = np.moveaxis(array, use.axis, 0).reshape(array.shape[use.axis], -1)
        if criterion == "l2":
            norms = np.square(rows, dtype=np.float64).sum(1)
        else:
            norms = np.abs(rows).sum(1, dtype=np.float64)
        for position, root in enumerate(roots):
            if root in channel_of:
                group_id, index = channel_of[root]
                scores[group_id][index] += norms[position]
                found.add(group_id)
    if criterion == "bn":
        missing = [g for g in groups if g.id not in found]
        if missing:
            logger.info("%d groups have no BatchNormalization; scoring them by L1", len(missing))
            scores.update(channel_scores(analysis, missing, "l1", rng))
    if criterion == "l2":
        scores = {k: np.sqrt(v) for k, v in scores.items()}
    return scores


def kept_count(channels: int, ratio: float, round_to: int | None = None) -> int:
    """Channels a group keeps at `ratio`: at least one, a multiple of `round_to` when given.

    floor(channels * (1 - ratio)), as Torch-Pruning counts, so equal ratios give equal widths.
    With `round_to` N the count is rounded to the nearest multiple of N, at least N (or all
    channels when the group has N or fewer).
    """
    return _rounded(max(1, int(channels * (1.0 - ratio) + 1e-9)), channels, round_to)


def _rounded(keep: int, channels: int, round_to: int | None) -> int:
    """`keep` to the nearest multiple of `round_to` (at least one multiple), at most `channels`."""
    if round_to and round_to > 1:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
    return min(channels, keep)


def select_channels(
    analysis: ChannelAnalysis,
    *,
    ratio: float,
    criterion: str = "l1",
    scope: str = "local",
    round_to: int | None = None,
    seed: int = 0,
    ratios: Mapping[int, float] | None = None,
) -> dict[int, np.ndarray]:
    """Channels to remove per prunable group id (indices into `group.roots`).

    `ratios` (group id -> ratio, local scope) overrides `ratio` per group; a ratio of 0 keeps
    every channel of the group.
    """
    rng = np.random.default_rng(seed)
    groups = analysis.prunable_groups
    scores = channel_scores(analysis, groups, criterion, rng)
    if ratios is not None:
        keep = {
            g.id: g.size if ratios.get(g.id, ratio) <= 0
            else kept_count(g.size, ratios.get(g.id, ratio), round_to)
            for g in groups
        }
    elif scope == "local":
        keep = {g.id: kept_count(g.size, ratio, round_to) for g in groups}
    else:
        keep = _global_keep(groups, scores, ratio, round_to)
    removed = {}
    for group in groups:
        order = np.argsort(scores[group.id], kind="stable")
        removed[group.id] = np.sort(order[: group.size - keep[group.id]])
    return removed


def _global_keep(
    groups: list[ChannelGroup], scores: dict[int, np.ndarray], ratio: float, round_to: int | None
) -> dict[int, int]:
    """One threshold over scores normalized by each group's mean."""
    entries = []
    for group in groups:
        mean = float(np.mean(scores[group.id]))
        normalized = scores[group.id] / mean if mean > 0 else np.zeros(group.size)
        entries += [(float(s), group.id) for s in normalized]
    entries.sort()
    keep = {g.id: g.size for g in groups}
    floor = {g.id: min(g.size, round_to or 1) for g in groups}
    target = int(len(entries) * ratio)
    removed = 0
    for _, group_id in entries:
        if removed >= target:
            break
        if keep[group_id] > floor[group_id]:
            keep[group_id] -= 1
            removed += 1
    return {g.id: _rounded(keep[g.id], g.size, round_to) for g in groups}


# -- physical removal -------------------------------------------------------------------------


def remove_channels(
    model: ir.Model, analysis: ChannelAnalysis, removed_roots: set[int]
) -> dict[int, np.ndarray]:
    """Remove the channel components `removed_roots` from `model` (in place; the one analysed).

    Returns the kept positions of every slot that shrank. Shapes are cleared and re-inferred.
    """
    graph = model.graph
    kept: dict[int, np.ndarray] = {}
    for slot in analysis.slots:
        positions = analysis.kept_positions(slot, removed_roots)
        if len(positions) < slot.size:
            kept[slot.id] = positions
    plans: dict[tuple[ir.Node, int], dict[int, np.ndarray]] = {}
    for use in analysis.weight_uses:
        if use.slot in kept:
            plans.setdefault((use.node, use.input_index), {})[use.axis] = kept[use.slot]
    for (node, index), axes in plans.items():
        array = node.inputs[index].const_value.numpy()
        for axis, positions in axes.items():
            array = np.take(array, positions, axis=axis)
        _set_constant(graph, node, index, array)
    for rewrite in analysis.rewrites:
        if rewrite.slot in kept:
            _apply_rewrite(graph, rewrite, analysis, kept)
    if analysis.pad:
        _insert_pads(model, analysis, kept)
    _reinfer_shapes(model)
    return kept


def _set_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give input `index` of `node` the constant `array` (a private copy if the value is shared)."""
    value = node.inputs[index]
    if value.is_initializer() and len(list(value.uses())) == 1 and not value.is_graph_output():
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        return
    node.replace_input_with(index, _initializer(graph, f"{value.name}_pruned", array))
    if value.is_initializer() and not list(value.uses()) and not value.is_graph_output():
        graph.initializers.pop(value.name, None)


def _initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """A new initializer holding `array`, under a name not yet used in `graph`."""
    name = _unique_name(graph, base)
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), const_value=tensor)
    value.type = ir.TensorType(value.const_value.dtype)
    graph.register_initializer(value)
    return value


def _unique_name(graph: ir.Graph, base: str) -> str:
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    taken |= {v.name for v in graph.inputs}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _apply_rewrite(graph, rewrite, analysis: ChannelAnalysis, kept) -> None:
    node = rewrite.node
    count = len(kept[rewrite.slot])
    if rewrite.kind == "conv_group":
        (out_per,) = rewrite.data
        node.attributes["group"] = ir.AttrInt64("group", count // out_per)
    elif rewrite.kind == "reshape":
        (axis,) = rewrite.data
        shape = node.inputs[1].const_value.numpy().copy()
        if shape[axis] != -1:
            shape[axis] = count
        _set_constant(graph, node, 1, shape)
    elif rewrite.kind == "reshape_static":
        axis, skip, *dims = rewrite.data
        shape = np.array([0] * skip + list(dims), dtype=np.int64)
        shape[axis] = count
        node.replace_input_with(1, _initializer(graph, f"{node.name}_shape", shape))
        node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
    elif rewrite.kind == "resize_sizes":
        (axis,) = rewrite.data
        sizes = node.inputs[3].const_value.numpy().copy()
        sizes[axis] = count
        _set_constant(graph, node, 3, sizes)
    elif rewrite.kind == "slice":
        (k,) = rewrite.data
        slot = analysis.slots[rewrite.slot]
        positions = kept[rewrite.slot]
        starts = node.inputs[1].const_value.numpy().copy()
        ends = node.inputs[2].const_value.numpy().copy()
        begin, stop, _ = slice(int(starts[k]), int(ends[k])).indices(slot.size)
        starts[k] = int(np.sum(positions < begin))
        ends[k] = int(np.sum(positions < stop))
        _set_constant(graph, node, 1, starts)
        _set_constant(graph, node, 2, ends)
    elif rewrite.kind == "split":
        _rewrite_split(graph, node, analysis, kept)


def _rewrite_split(graph: ir.Graph, node: ir.Node, analysis: ChannelAnalysis, kept) -> None:
    sizes = []
    for out in node.outputs:
        slot_id = analysis.slot_index_of(out, None)
        if slot_id is None:
            raise UnsupportedModelError(f"Split {node.name}: an output is not traced")
        sizes.append(len(kept.get(slot_id, range(analysis.slots[slot_id].size))))
    opset = graph.opset_imports.get("", 13)
    array = np.array(sizes, dtype=np.int64)
    if opset >= 13:
        if "num_outputs" in node.attributes:
            del node.attributes["num_outputs"]
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            _set_constant(graph, node, 1, array)
        else:
            node.resize_inputs(2)
            node.replace_input_with(1, _initializer(graph, f"{node.name}_split", array))
    else:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)


def _insert_pads(model: ir.Model, analysis: ChannelAnalysis, kept) -> None:
    """Scatter pruned tensors back to full size at padable edges: Pad by one zero, then Gather."""
    graph = model.graph
    opset = opset_version(model, default=13)
    padded: dict[int, ir.Value] = {}
    for block in analysis.blocks:
        if not block.padable or block.slot not in kept:
            continue
        slot = analysis.slots[block.slot]
        if block.slot not in padded:
            padded[block.slot] = _pad_value(graph, slot, kept[block.slot], opset)
        full = padded[block.slot]
        if block.node is None:
            original = slot.value.name
            slot.value.name = _unique_name(graph, f"{original}_pruned")
            full.name = original
            full.type = slot.value.type
            graph.outputs[block.index] = full
        else:
            for index, value in enumerate(block.node.inputs):
                if value is slot.value:
                    block.node.replace_input_with(index, full)


def _pad_value(graph: ir.Graph, slot, positions: np.ndarray, opset: int) -> ir.Value:
    value = slot.value
    rank = len(value.shape)
    pads = [0] * (2 * rank)
    pads[rank + slot.axis] = 1
    name = value.name or "pruned"
    if opset >= 11:
        pads_value = _initializer(graph, f"{name}_pads", np.array(pads, dtype=np.int64))
        pad = ir.Node("", "Pad", [value, pads_value], name=_unique_name(graph, f"{name}_pad"))
    else:
        pad = ir.Node("", "Pad", [value], [ir.AttrInt64s("pads", pads)],
                      name=_unique_name(graph, f"{name}_pad"))  # fmt: skip
    pad.outputs[0].name = _unique_name(graph, f"{name}_padded_zero")
    index = np.full(slot.size, len(positions), dtype=np.int64)
    index[positions] = np.arange(len(positions))
    index_value = _initializer(graph, f"{name}_scatter", index)
    gather = ir.Node(
        "", "Gather", [pad.outputs[0], index_value], [ir.AttrInt64("axis", slot.axis)],
        name=_unique_name(graph, f"{name}_unprune"),
    )  # fmt: skip
    gather.outputs[0].name = _unique_name(graph, f"{name}_full")
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, [pad, gather])
    else:
        graph.insert_before(next(iter(graph)), [pad, gather])
    return gather.outputs[0]


def _reinfer_shapes(model: ir.Model) -> None:
    # onnx_ir's shape inference only writes the shapes it finds: clear the stale ones first.
    for node in model.graph:
        for value in node.outputs:
            value.shape = None
    ir_common.RemoveUnusedNodesPass()(model)
    ir_common.ShapeInferencePass(strict_mode=False)(model)


# -- unstructured -----------------------------------------------------------------------------


def _unstructured(
    model: ir.Model, ratio: float, scope: str, excluded
) -> list[LayerSparsity]:
    graph = model.graph
    weights = []
    for node, found in ir_analysis.node_weights(graph).items():
        if node.op_type in _WEIGHT_OPS and not excluded(node) and found.weight is not None:
            index = list(node.inputs).index(found.weight)
            weights.append((node, index, found.weight.const_value.numpy()))
    if not weights:
        raise UnsupportedModelError(
            "nothing to prune: no Conv, Gemm or MatMul with constant weights"
        )
    threshold = None
    if scope == "global":
        magnitudes = np.concatenate([np.abs(w).ravel() for _, _, w in weights])
        count = int(magnitudes.size * ratio)
        threshold = np.partition(magnitudes, count - 1)[count - 1] if count else -1.0
    report = []
    for node, index, array in weights:
        magnitude = np.abs(array)
        if scope == "global":
            mask = magnitude <= threshold
        else:
            count = int(array.size * ratio)
            mask = np.zeros(array.size, bool)
            mask[np.argsort(magnitude.ravel(), kind="stable")[:count]] = True
            mask = mask.reshape(array.shape)
        pruned = np.where(mask, np.zeros_like(array), array)
        _set_constant(graph, node, index, pruned)
        report.append(
            LayerSparsity(node_label(node), node.op_type, int(array.size), int((pruned == 0).sum()))
        )
    return report


# -- the pass ---------------------------------------------------------------------------------


@register_pass("prune", exact=False)
class PrunePass(SlimgraphFunctionalPass):
    """Structured channel pruning (or unstructured magnitude pruning) on a copy of the model.

    Approximate in general (`exact = False`); exact when the removed channels' producing weights
    are zero. Options as for `prune`.
    """

    exact = False

    def __init__(
        self,
        *,
        ratio: float | None,
        criterion: str = "l1",
        scope: str = "local",
        round_to: int | None = None,
        pad: bool = False,
        exclude: Sequence[str] = (),
        exclude_ops: Sequence[str] = (),
        unstructured: bool = False,
        prune_outputs: Sequence[str] = (),
        seed: int = 0,
        layer_ratios: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.layer_ratios = dict(layer_ratios) if layer_ratios is not None else None
        # without a ratio, groups not named in layer_ratios keep their channels (ratio 0)
        self.ratio: float = 0.0 if ratio is None else ratio
        self.ratio_given = ratio
        self.criterion = criterion
        self.scope = scope
        self.round_to = round_to
        self.pad = pad
        self.exclude = tuple(exclude)
        self.exclude_ops = tuple(exclude_ops)
        self.unstructured = unstructured
        self.prune_outputs = tuple(prune_outputs)
        self.seed = seed

    def requires(self, model: ir.Model) -> None:
        ratio = self.ratio_given
        if self.layer_ratios is not None:
            if self.unstructured or self.scope != "local":
                raise BadOptionError("per-layer ratios apply to structured, local pruning")
            bad = {k: v for k, v in self.layer_ratios.items() if not 0 <= v < 1}
            if bad or not 0 <= (ratio or 0.0) < 1:
                raise BadOptionError(f"per-layer ratios must be in [0, 1), got {bad or ratio}")
        elif isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise BadOptionError(f"ratio must be strictly between 0 and 1, got {ratio!r}")
        if self.criterion not in CRITERIA:
            raise BadOptionError(
                f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}"
            )
        if self.scope not in SCOPES:
            raise BadOptionError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise BadOptionError(f"round_to must be a positive integer, got {self.round_to!r}")

    def call(self, model: ir.Model) -> PruneResult:
        report = PruneReport(self.ratio, self.criterion, self.scope, self.pad, self.unstructured,
                             layer_ratios=dict(self.layer_ratios or {}))
        pruned = prepare_for_pruning(model)
        report.params_before = ir_analysis.parameter_count(pruned)
        report.macs_before = sum(ir_analysis.model_macs(pruned).values())
        excluded = _excluded_predicate(pruned.graph, self.exclude, self.exclude_ops)
        if self.unstructured:
            report.sparsity = _unstructured(pruned, self.ratio, self.scope, excluded)
            report.notes.append(UNSTRUCTURED_NOTE)
        else:
            self._structured(pruned, excluded, report)
        if (pruned.ir_version or 0) < 4:  # IR < 4: every initializer must be a graph input
            ir_common.AddInitializersToInputsPass()(pruned)
        report.params_after = ir_analysis.parameter_count(pruned)
        report.macs_after = sum(ir_analysis.model_macs(pruned).values())
        return PruneResult(pruned, modified=True, report=report)

    def _structured(self, model: ir.Model, excluded, report: PruneReport) -> None:
        analysis = analyze_channels(
            model.graph, excluded=excluded, pad=self.pad, opset=opset_version(model, default=13),
            prunable_outputs=self.prune_outputs,
        )  # fmt: skip
        groups = analysis.prunable_groups
        if not groups:
            reasons = sorted({r for g in analysis.groups for r in g.reasons})
            hint = f" ({'; '.join(reasons[:3])})" if reasons else ""
            raise UnsupportedModelError(f"nothing to prune: no channel group can shrink{hint}")
        removed = select_channels(
            analysis, ratio=self.ratio, criterion=self.criterion, scope=self.scope,
            round_to=self.round_to, seed=self.seed, ratios=self._group_ratios(groups),
        )  # fmt: skip
        removed_roots = {g.roots[i] for g in groups for i in removed[g.id].tolist()}
        if not removed_roots:
            largest = max(g.size for g in groups)
            how = f"--ratio {self.ratio:g}" + (
                f" --round-to {self.round_to}" if self.round_to and self.round_to > 1 else ""
            )
            raise BadOptionError(
                f"{how} removes no channel (the largest prunable group has {largest}); "
                "nothing written: use a larger --ratio or a smaller --round-to"
            )
        before = _producer_channels(analysis)
        kept = remove_channels(model, analysis, removed_roots)
        for group in analysis.groups:
            count = len(removed.get(group.id, ()))
            report.groups.append(
                GroupReport(
                    group.id, group.size, group.size - count,
                    tuple(node_label(n) for n in group.producers),
                    _why_not(group),
                    sum(1 for b in group.pads if b.slot in kept),
                )
            )  # fmt: skip
        logger.info(
            "pruned %d of %d channel groups (%d channels removed)",
            len(groups), len(analysis.groups), len(removed_roots),
        )  # fmt: skip
        for (node, slot_id), size in before.items():
            positions = kept[slot_id].tolist() if slot_id in kept else list(range(size))
            report.layers.append(
                LayerChannels(node_label(node), node.op_type, size, len(positions),
                              tuple(int(p) for p in positions))
            )  # fmt: skip


    def _group_ratios(self, groups: Sequence[ChannelGroup]) -> dict[int, float] | None:
        """`layer_ratios` (by a producer's node or layer name) as group id -> ratio."""
        if self.layer_ratios is None:
            return None
        ratios: dict[int, float] = {}
        named: set[str] = set()
        for group in groups:
            for producer in group.producers:
                for name in node_names(producer):
                    if name in self.layer_ratios:
                        ratios[group.id] = self.layer_ratios[name]
                        named.add(name)
        unknown = sorted(set(self.layer_ratios) - named)
        if unknown:
            raise BadOptionError(
                f"per-layer ratio for {unknown[0]!r}: no prunable channel group has that producer"
            )
        return ratios


def group_key(group: ChannelGroup) -> str:
    """The name a channel group goes by in per-layer ratios and sensitivity tables: its first
    producer's node name (what `--exclude` selects)."""
    return group.producers[0].name or node_label(group.producers[0])


def _why_not(group: ChannelGroup) -> str:
    """Why a group kept all its channels ('' when it was pruned)."""
    if group.prunable:
        return ""
    if group.reasons:
        return "; ".join(group.reasons)
    return "a single channel" if group.size <= 1 else "no prunable producer"


def _producer_channels(analysis: ChannelAnalysis) -> dict[tuple[ir.Node, int], int]:
    found = {}
    for use in analysis.weight_uses:
        if use.role == "producer":
            found[(use.node, use.slot)] = analysis.slots[use.slot].size
    return found


def prunable_units(
    model: ir.Model,
    *,
    pad: bool = False,
    exclude: Sequence[str] = (),
    exclude_ops: Sequence[str] = (),
    **_: object,
) -> list[tuple[str, str, str]]:
    """(node, layer, op type) of the first producer of each prunable channel group: the names
    `layer_ratios` and `--exclude` take, in graph order."""
    prepared = prepare_for_pruning(model)
    excluded = _excluded_predicate(prepared.graph, exclude, exclude_ops)
    analysis = analyze_channels(
        prepared.graph, excluded=excluded, pad=pad, opset=opset_version(prepared, default=13)
    )
    units = []
    for group in analysis.prunable_groups:
        first = group.producers[0]
        units.append((group_key(group), node_label(first), first.op_type))
    return units


def prune_with_report(
    model: ModelLike,
    *,
    ratio: float | None = None,
    criterion: str = "l1",
    scope: str = "local",
    round_to: int | None = None,
    pad: bool = False,
    exclude: Sequence[str] = (),
    exclude_ops: Sequence[str] = (),
    unstructured: bool = False,
    prune_outputs: Sequence[str] = (),
    seed: int = 0,
    layer_ratios: Mapping[str, float] | None = None,
    target_macs: float | None = None,
    data: DataLike | None = None,
    budget: Budget | None = None,
    max_drop: float | None = None,
    min_cosine: float | None = None,
    metric: Metric | None = None,
) -> tuple[ir.Model, PruneReport]:
    """Like `prune`, also returning the `PruneReport`.

    The report lists every channel group (size, kept, why it could not shrink), every producing
    layer's output channels before and after with the kept channel indices
    (`report.layers[i].kept`, indices into the original channels), parameters and MACs before
    and after (both counted on the same input shapes: symbolic dimensions as 1) and notes.

    Args: as for `prune`.

    Returns:
        (pruned model, `PruneReport`).

    Raises: as for `prune`.

    Example:
        >>> pruned, report = prune_with_report(model, ratio=0.5)  # doctest: +SKIP
        >>> report.layers[0].kept  # doctest: +SKIP
        (0, 2, 3, 5)
    """
    model = as_model(model)
    ir_analysis.check_finite_weights(model)
    judge = budget_judge(model, data, budget=budget, max_drop=max_drop, min_cosine=min_cosine,
                         metric=metric)
    if target_macs is not None:
        if ratio is not None or layer_ratios is not None:
            raise BadOptionError("give --target-macs or --ratio, not both")
        if data is None:
            raise BadOptionError("--target-macs needs --data VAL.npz (per-layer sensitivity)")
        from slimgraph.passes.budgeted import allocate_prune_ratios

        layer_ratios = allocate_prune_ratios(
            model, data, target_macs, metric=metric, criterion=criterion, round_to=round_to,
            pad=pad, exclude=exclude, exclude_ops=exclude_ops, seed=seed,
        ).ratios
    if ratio is None and layer_ratios is None:
        raise BadOptionError("give a ratio (--ratio R) or a MAC target (--target-macs R)")
    result = PrunePass(
        ratio=ratio, criterion=criterion, scope=scope, round_to=round_to, pad=pad,
        exclude=exclude, exclude_ops=exclude_ops, unstructured=unstructured,
        prune_outputs=prune_outputs, seed=seed,
        layer_ratios=layer_ratios,
    )(model)  # fmt: skip
    assert isinstance(result, PruneResult) and result.report is not None
    if judge is not None:
        result.report.evaluation = judge.check(result.model, what="the pruned model")
    return result.model, result.report


def prune(
    model: ModelLike,
    *,
    ratio: float | None = None,
    criterion: str = "l1",
    scope: str = "local",
    round_to: int | None = None,
    pad: bool = False,
    exclude: Sequence[str] = (),
    exclude_ops: Sequence[str] = (),
    unstructured: bool = False,
    prune_outputs: Sequence[str] = (),
    seed: int = 0,
    layer_ratios: Mapping[str, float] | None = None,
    target_macs: float | None = None,
    data: DataLike | None = None,
    budget: Budget | None = None,
    max_drop: float | None = None,
    min_cosine: float | None = None,
    metric: Metric | None = None,
) -> ir.Model:
    """Prune a copy of `model` (the input is untouched). Approximate.

    Structured (default): channels that must go together (coupled by residual adds, concats,
    depthwise convs, a flatten into a Gemm) form groups; each group's channels are scored and the
    least important removed physically: the producers' weights and biases, BatchNorm parameters,
    the next layers' input channels and Reshape/Split/Slice constants shrink. The channels of a
    graph output (class logits, embeddings) are never pruned unless named in `prune_outputs`.
    Method: structured pruning as in seed 001; dependency groups after Torch-Pruning (Fang et
    al., 2023), implemented on the ONNX graph. Unstructured: zeroes the smallest weights; the file
    does not shrink and onnxruntime runs it no faster.

    Args:
        model: an `onnx_ir.Model` or the path of an `.onnx` file.
        ratio: fraction of channels (or weights, with `unstructured`) to remove, in (0, 1).
        criterion: "l1" | "l2" (norm of the producing weights summed over the group), "bn"
            (BatchNorm |gamma|), "random" (seeded by `seed`).
        scope: "local" (the same ratio in every group) or "global" (one threshold over scores
            normalized per group).
        round_to: keep a multiple of this many channels per group (at least this many).
        pad: scatter pruned tensors back to full size (zeros at the removed positions) where an
            inner consumer needs the full width (an excluded or unsupported op), so more groups
            can shrink. It never pads a graph output that is not in `prune_outputs`.
        exclude: fnmatch patterns of layer (torch module path) or node names to leave unchanged.
        exclude_ops: op types to leave unchanged.
        unstructured: zero the smallest weights instead of removing channels.
        prune_outputs: names of graph outputs whose channels may be pruned too (shrunk; padded
            back with zeros with `pad`).
        seed: seed of `criterion="random"`.

        layer_ratios: a ratio per channel group, by a producer's node or layer name (groups not
            named keep `ratio`, or all their channels without one); see `prunable_units`.
        target_macs: instead of a ratio, the MACs to reach as a fraction of the model's (0.6:
            0.6x); per-group ratios are allocated from sensitivity on `data`, least loss first
            (`slimgraph.passes.budgeted.allocate_prune_ratios`).
        data: validation data (an .npz path, stacked arrays with optional labels, or
            `LabelledData`) for `target_macs` and the budget.
        budget, max_drop, min_cosine: the accuracy budget (`runtime.budget`): a result that
            misses it raises `VerificationError`.
        metric: a user `Metric` instead of top-1 accuracy.

    Returns:
        The pruned model. `prune_with_report` also returns what was removed.

    Raises:
        BadOptionError: an option is out of range, an `exclude` pattern matches nothing, a
            `prune_outputs` name is not a graph output, or the options remove no channel at all
            (for example `round_to` at least as large as every group), a budget without data.
        UnsupportedModelError: no channel group can shrink (the reasons are named).
        ModelLoadError: `model` is a path that cannot be loaded.
        VerificationError: the pruned model misses the budget (measured figure in the message).

    Example:
        >>> pruned = prune("model.onnx", ratio=0.5, round_to=8)  # doctest: +SKIP
    """
    model = as_model(model)
    return prune_with_report(
        model, ratio=ratio, criterion=criterion, scope=scope, round_to=round_to, pad=pad,
        exclude=exclude, exclude_ops=exclude_ops, unstructured=unstructured,
        prune_outputs=prune_outputs, seed=seed,
        layer_ratios=layer_ratios, target_macs=target_macs, data=data, budget=budget,
        max_drop=max_drop, min_cosine=min_cosine, metric=metric,
    )[0]  # fmt: skip
