"""Ranks per layer from measured sensitivity: a MAC target or an accuracy budget met with the
least loss.

Each candidate layer is factorized alone at each rank ratio of a grid and measured (a loss from
the caller: 1 - output cosine, plus the accuracy drop with labels); then a greedy allocation on
those curves: starting from every layer whole, each step moves the one layer whose next cheaper
rank costs the least loss per MAC saved (any cheaper rank of the grid, not only the next one, so
a layer's curve is taken by its lower convex hull). The steps form a path from the whole model
to every layer at the grid's smallest ratio; a MAC target stops on the path where the counted
MACs reach it, an accuracy budget takes the furthest step that holds (bisection over the path).
Losses of different layers are added, the usual first-order proxy (as for pruning's MAC target,
`slimgraph.api.prune.allocate_prune_ratios`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.passes.lowrank._factorize import FactorizeReport, factorize_layers, prepared
from slimgraph.passes.lowrank._options import FactorizeOptions

__all__ = ["RANK_GRID", "RankAllocation", "allocate_ranks", "allocated", "rank_curves"]

logger = logging.getLogger(__name__)

# Rank ratios each layer is measured at, least compressed first (rank_ratio as the method reads
# it: of min(n, m) for SVD, of each channel mode for Tucker-2, of the cost-equal rank for CP).
RANK_GRID = (0.75, 0.5, 0.375, 0.25, 0.125, 0.0625)

Loss = Callable[[ir.Model], float]


@dataclass
class RankAllocation:
    """Per-layer rank ratios chosen from measured curves.

    Attributes:
        ratios: node name -> rank ratio (layers not named stay whole).
        macs_ratio: MACs after / before of the model those ratios give.
        target: the MAC target, when one was given.
        loss: (node, ratio) -> the loss with only that layer factorized at that ratio.
        saved: (node, ratio) -> the MACs that saves.
        path: the greedy path, each step's ratios (the last is the chosen one under a target).
    """

    ratios: dict[str, float]
    macs_ratio: float | None
    target: float | None
    loss: dict[tuple[str, float], float] = field(default_factory=dict)
    saved: dict[tuple[str, float], int] = field(default_factory=dict)
    path: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the terminal."""
        nodes = {node for node, _ in self.loss}
        goal = ("the accuracy budget" if self.target is None
                else f"the MAC target {self.target:g}x")
        return (f"ranks per layer: {len(self.ratios)} of the {len(nodes)} layers that can be "
                f"factorized are, for {goal}, from {len(self.loss)} measurements (one layer at "
                "a time)")

    def to_dict(self) -> dict[str, object]:
        return {
            "ratios": self.ratios, "macs_ratio": self.macs_ratio, "target": self.target,
            "curves": [{"node": n, "ratio": r, "loss": v, "macs_saved": self.saved.get((n, r))}
                       for (n, r), v in self.loss.items()],
        }


def rank_curves(
    model: ir.Model, options: FactorizeOptions, loss: Loss, grid: Sequence[float] = RANK_GRID,
    *, progress: bool | None = None,
) -> tuple[list[str], dict[tuple[str, float], float], dict[tuple[str, float], int], int]:
    """Each layer factorized alone at each ratio of `grid`: (nodes, loss, MACs saved, total MACs).

    The layers are those the options' method factorizes at the grid's smallest ratio. One
    factorization per ratio, every layer at once, gives each layer's factors and MACs; a layer
    factorized alone is then measured as the model with that layer's weight replaced by the
    weight its factors compute (the chain equals the layer with that weight, up to float
    rounding), on one working copy. `progress`: a bar on stderr (None: when it is a terminal).

    Raises:
        UnsupportedModelError: no layer gets smaller, or the MACs are unknown.
    """
    base = dataclasses.replace(options, rank_ratio=None, energy=None, error_budget=None,
                               rank=None, layer_ratios=None, feeds=None)
    smallest = min(grid)
    runs: dict[float, tuple[FactorizeReport, dict[str, np.ndarray]]] = {}
    approximations: dict[str, np.ndarray] = {}
    _, report = factorize_layers(model, dataclasses.replace(base, rank_ratio=smallest),
                                 approximations=approximations)
    runs[smallest] = report, approximations
    nodes = [layer.node for layer in report.layers if not layer.shared_with]
    if not nodes:
        raise UnsupportedModelError("nothing to factorize: no layer gets smaller at any rank")
    if report.macs_before is None or any(
            layer.macs_before is None or layer.macs_after is None for layer in report.layers):
        raise UnsupportedModelError("ranks per layer need the MACs: the model's shapes are "
                                    "unknown (give sample feeds with symbolic dimensions)")
    probe = _Probe(prepared(model, base)[0], nodes)
    losses: dict[tuple[str, float], float] = {}
    saved: dict[tuple[str, float], int] = {}
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=len(grid) * len(nodes), desc="rank curves", unit="layer", file=sys.stderr,
              disable=not show, leave=False) as bar:
        for ratio in grid:
            if ratio not in runs:
                approximations = {}
                _, found = factorize_layers(model, dataclasses.replace(base, rank_ratio=ratio),
                                            approximations=approximations)
                runs[ratio] = found, approximations
            found, approximations = runs.pop(ratio)  # one ratio's weights in memory at a time
            layers = {layer.node: layer for layer in found.layers if not layer.shared_with}
            for node in nodes:
                layer = layers.get(node)
                if layer is not None and layer.macs_before is not None and (
                        layer.macs_after is not None):  # else not smaller at this ratio
                    saved[node, ratio] = layer.macs_before - layer.macs_after
                    losses[node, ratio] = loss(probe.with_weight(node, approximations[node]))
                    probe.restore(node)
                    logger.info("rank curve %s at %g: loss %.5f, %d MACs saved", node, ratio,
                                losses[node, ratio], saved[node, ratio])
                bar.update()
    return nodes, losses, saved, report.macs_before


class _Probe:
    """The folded model in which each measured layer reads a weight of its own (a tied weight
    gets a copy per layer), so that one layer's weight can be swapped and put back."""

    def __init__(self, model: ir.Model, nodes: Sequence[str]) -> None:
        self.model = model
        by_name = {node.name: node for node in model.graph}
        self.weights: dict[str, ir.Value] = {}
        self.original: dict[str, ir.TensorProtocol] = {}
        for name in nodes:
            node = by_name[name]
            value = node.inputs[1]
            assert value is not None and value.const_value is not None  # it was factorized
            if len(value.uses()) > 1 or value.is_graph_output():
                own = ir.Value(name=f"{value.name}.{name}", shape=value.shape, type=value.type,
                               const_value=value.const_value)
                model.graph.register_initializer(own)
                node.replace_input_with(1, own)
                value = own
            self.weights[name] = value
            self.original[name] = value.const_value  # type: ignore[assignment]

    def with_weight(self, node: str, weight: np.ndarray) -> ir.Model:
        """The model with `node`'s weight replaced (until `restore`)."""
        value = self.weights[node]
        value.const_value = ir.tensor(weight, name=value.name)
        return self.model

    def restore(self, node: str) -> None:
        self.weights[node].const_value = self.original[node]


def _greedy_path(
    nodes: Sequence[str], loss: dict[tuple[str, float], float],
    saved: dict[tuple[str, float], int], grid: Sequence[float],
) -> list[tuple[dict[str, float], int]]:
    """The greedy steps: (ratios, predicted MACs saved), from one layer factorized to all at
    their cheapest measured rank."""
    levels = {node: -1 for node in nodes}  # index into grid; -1: whole

    def at(node: str, level: int) -> tuple[float, int] | None:
        if level < 0:
            return 0.0, 0
        key = (node, grid[level])
        return (loss[key], saved[key]) if key in loss else None

    path: list[tuple[dict[str, float], int]] = []
    while True:
        best: tuple[float, str, int] | None = None
        for node, level in levels.items():
            current = at(node, level)
            assert current is not None
            for nxt in range(level + 1, len(grid)):
                option = at(node, nxt)
                if option is None or option[1] <= current[1]:
                    continue
                cost = max(option[0] - current[0], 0.0) / (option[1] - current[1])
                if best is None or cost < best[0]:
                    best = (cost, node, nxt)
        if best is None:
            return path
        levels[best[1]] = best[2]
        ratios = {n: grid[lv] for n, lv in levels.items() if lv >= 0}
        total = 0
        for node, level in levels.items():
            point = at(node, level)
            assert point is not None
            total += point[1]
        path.append((ratios, total))


def allocate_ranks(
    model: ir.Model,
    options: FactorizeOptions,
    loss: Loss,
    *,
    target_macs: float | None = None,
    accept: Callable[[ir.Model], bool] | None = None,
    grid: Sequence[float] | None = None,
    progress: bool | None = None,
) -> RankAllocation:
    """Per-layer rank ratios for `options.method`: the least measured loss at `target_macs`
    (MACs after / before), or the most MACs saved that `accept` (an accuracy budget) takes.

    Args:
        model: the model (not modified).
        options: what to factorize and how (its rank rule is replaced by the allocation).
        loss: the loss of a candidate model (lower is better).
        target_macs: the MAC ratio to reach, in (0, 1).
        accept: whether a candidate meets the budget (without `target_macs`).
        grid: the rank ratios each layer is measured at (default `RANK_GRID`).
        progress: a progress bar on stderr while the curves are measured (None: when stderr is
            a terminal).

    Raises:
        BadOptionError: a target outside (0, 1), or neither a target nor `accept`.
        UnsupportedModelError: nothing to factorize, or the target is out of reach even with
            every layer at the grid's smallest ratio (measured figure in the message).
        VerificationError: (from `accept`'s caller) nothing on the path meets the budget.
    """
    if target_macs is not None and not 0 < target_macs < 1:
        raise BadOptionError.worded("{macs} is a fraction of the model's MACs in (0, 1), got "
                                    "{value}", macs=("target_macs", "--target-macs"),
                                    value=f"{target_macs:g}")
    if target_macs is None and accept is None:
        raise BadOptionError("ranks per layer need a MAC target or an accuracy budget")
    grid = sorted(RANK_GRID if grid is None else grid, reverse=True)
    nodes, losses, saved, total = rank_curves(model, options, loss, grid, progress=progress)
    path = _greedy_path(nodes, losses, saved, grid)
    allocation = RankAllocation({}, None, target_macs, losses, saved, [p for p, _ in path])
    if target_macs is not None:
        for ratios, predicted in path:
            if predicted < (1 - target_macs) * total:
                continue
            report = _build(model, options, ratios)[1]
            counted = _macs_ratio(report)
            if counted is not None and counted <= target_macs:
                allocation.ratios, allocation.macs_ratio = ratios, counted
                logger.info("allocated rank ratios %s: %.3fx MACs", ratios, counted)
                return allocation
        last = _macs_ratio(_build(model, options, path[-1][0])[1]) if path else 1.0
        raise UnsupportedModelError(
            f"--target-macs {target_macs:g} is out of reach: every layer at rank ratio "
            f"{grid[-1]:g} leaves {last:.3f}x of the MACs"
        )
    assert accept is not None
    lo, hi, best = 0, len(path) - 1, -1
    while lo <= hi:  # the furthest step that holds (the loss grows along the path)
        mid = (lo + hi) // 2
        if accept(_build(model, options, path[mid][0])[0]):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if best >= 0:
        allocation.ratios = path[best][0]
        allocation.macs_ratio = _macs_ratio(_build(model, options, allocation.ratios)[1])
    return allocation


def _build(
    model: ir.Model, options: FactorizeOptions, ratios: dict[str, float]
) -> tuple[ir.Model, FactorizeReport]:
    return factorize_layers(model, allocated(options, ratios))


def allocated(options: FactorizeOptions, ratios: dict[str, float]) -> FactorizeOptions:
    """`options` with the rank rule replaced by per-layer `ratios` (no fidelity runs)."""
    return dataclasses.replace(options, rank_ratio=None, energy=None, error_budget=None,
                               rank=None, layer_ratios=dict(ratios), feeds=None)


def _macs_ratio(report: FactorizeReport) -> float | None:
    if report.macs_before is None or report.macs_after is None or not report.macs_before:
        return None
    return report.macs_after / report.macs_before
