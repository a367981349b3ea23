"""Which channels go: importance scores, kept counts, local or global selection, exclusions."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BadOptionError
from slimgraph.ir import display_name
from slimgraph.ir.select import check_exclusions, matching_pattern, node_names
from slimgraph.passes.prune.channels import ChannelAnalysis, ChannelGroup, Role

__all__ = [
    "channel_scores",
    "kept_count",
    "select_channels",
    "group_key",
    "group_ratios",
    "excluded_predicate",
]

logger = logging.getLogger(__name__)


def excluded_predicate(
    graph: ir.Graph, exclude: Sequence[str], exclude_ops: Sequence[str]
) -> Callable[[ir.Node], bool]:
    """A node predicate for the exclusions (fnmatch patterns of node or layer names, op types).

    Raises:
        BadOptionError: a pattern matches no node, or no node has an excluded op type.
    """
    check_exclusions(graph, exclude, exclude_ops)
    patterns = tuple(exclude)

    def excluded(node: ir.Node) -> bool:
        return node.op_type in exclude_ops or any(
            matching_pattern(node, (pattern,)) is not None for pattern in patterns
        )

    return excluded


def channel_scores(
    analysis: ChannelAnalysis,
    groups: Sequence[ChannelGroup],
    criterion: str,
    rng: np.random.Generator,
) -> dict[int, np.ndarray]:
    """Importance of each channel of each group, by group id (higher = keep).

    l1/l2: norm of the producing weights' slices, summed over all producers of the group; bn:
    |gamma| of the group's BatchNormalizations (l1 for groups without one); random: uniform.
    Scores are float64 arrays of shape (group size,).
    """
    if criterion == "random":
        return {g.id: rng.random(g.size) for g in groups}
    channel_of = {root: (g.id, i) for g in groups for i, root in enumerate(g.roots)}
    scores = {g.id: np.zeros(g.size) for g in groups}
    found: set[int] = set()
    roles = (Role.BN_SCALE,) if criterion == "bn" else (Role.PRODUCER,)
    roots_cache: dict[int, list[int]] = {}
    for use in analysis.weight_uses:
        if use.role not in roles:
            continue
        if use.slot not in roots_cache:
            roots_cache[use.slot] = analysis.roots_of(analysis.slots[use.slot]).tolist()
        roots = roots_cache[use.slot]
        if not any(root in channel_of for root in roots):
            continue
        array = use.array()
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
    """Channels to remove per prunable group id (indices into `group.roots`, ascending int64).

    `ratios` (group id -> ratio, local scope) overrides `ratio` per group; a ratio of 0 keeps
    every channel of the group.
    """
    rng = np.random.default_rng(seed)
    groups = analysis.prunable_groups
    scores = channel_scores(analysis, groups, criterion, rng)
    units = {g.id: _rounding_units(g, round_to) for g in groups}
    if ratios is not None:
        keep = {
            g.id: g.size if ratios.get(g.id, ratio) <= 0
            else kept_count(g.size, ratios.get(g.id, ratio), units[g.id])
            for g in groups
        }
    elif scope == "local":
        keep = {g.id: kept_count(g.size, ratio, units[g.id]) for g in groups}
    else:
        keep = _global_keep(groups, scores, ratio, units)
    removed = {}
    for group in groups:
        order = np.argsort(scores[group.id], kind="stable")
        removed[group.id] = np.sort(order[: group.size - keep[group.id]])
    return removed


def _rounding_units(group: ChannelGroup, round_to: int | None) -> int | None:
    """`round_to` channels in the group's own units: a group whose entries stand for several
    channels each (the conv groups of a grouped convolution: AlexNet's 384 channels in 2 entries
    of 192) rounds to round_to / channels-per-entry entries, or not at all when one entry is
    already a multiple of round_to."""
    if not round_to or round_to <= 1:
        return round_to
    width = 0
    for node in group.producers:
        weight = node.inputs[1] if node.op_type == "Conv" and len(node.inputs) > 1 else None
        if weight is not None and weight.shape is not None and len(weight.shape) > 0 and \
                isinstance(weight.shape[0], int):
            width = int(weight.shape[0])
            break
    per_entry = width // group.size if width and width % group.size == 0 else 1
    if per_entry <= 1:
        return round_to
    if per_entry % round_to == 0:
        return None
    return max(1, round_to // per_entry)


def _global_keep(
    groups: list[ChannelGroup], scores: dict[int, np.ndarray], ratio: float,
    units: Mapping[int, int | None],
) -> dict[int, int]:
    """One threshold over scores normalized by each group's mean; counts rounded in each
    group's own units (`_rounding_units`)."""
    entries = []
    for group in groups:
        mean = float(np.mean(scores[group.id]))
        normalized = scores[group.id] / mean if mean > 0 else np.zeros(group.size)
        entries += [(float(s), group.id) for s in normalized]
    entries.sort()
    keep = {g.id: g.size for g in groups}
    floor = {g.id: min(g.size, units[g.id] or 1) for g in groups}
    target = int(len(entries) * ratio)
    removed = 0
    for _, group_id in entries:
        if removed >= target:
            break
        if keep[group_id] > floor[group_id]:
            keep[group_id] -= 1
            removed += 1
    return {g.id: _rounded(keep[g.id], g.size, units[g.id]) for g in groups}


def group_key(group: ChannelGroup) -> str:
    """The name a channel group goes by in per-layer ratios and sensitivity tables: its first
    producer's node name (what `--exclude` selects)."""
    return group.producers[0].name or display_name(group.producers[0])


def group_ratios(
    groups: Sequence[ChannelGroup], layer_ratios: Mapping[str, float] | None
) -> dict[int, float] | None:
    """`layer_ratios` (by a producer's node or layer name) as group id -> ratio.

    Raises:
        BadOptionError: a name is no producer of a prunable group.
    """
    if layer_ratios is None:
        return None
    ratios: dict[int, float] = {}
    named: set[str] = set()
    for group in groups:
        for producer in group.producers:
            for name in node_names(producer):
                if name in layer_ratios:
                    ratios[group.id] = layer_ratios[name]
                    named.add(name)
    unknown = sorted(set(layer_ratios) - named)
    if unknown:
        raise BadOptionError(
            f"per-layer ratio for {unknown[0]!r}: no prunable channel group has that producer"
        )
    return ratios
