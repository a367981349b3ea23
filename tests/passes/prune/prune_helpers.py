"""Pruning-specific helper: zero chosen channels exactly (outputs and checks: `tests.kit`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.passes.prune import kept_count, prepare_for_pruning
from slimgraph.passes.prune.channels import ChannelAnalysis, analyze_channels

__all__ = ["zero_channels"]

# Roles whose entries must be zero for a channel to be exactly zero everywhere in its group:
# producing weights and biases, BatchNorm gamma and beta, per-channel constants added.
_ZEROED_ROLES = ("producer", "bias", "bn_scale")


def _must_zero(use) -> bool:
    if use.role in _ZEROED_ROLES:
        return True
    if use.role != "param":
        return False
    if use.node.op_type == "BatchNormalization":
        return use.input_index == 2  # beta; mean and variance do not matter once gamma is 0
    return use.node.op_type in ("Add", "Sub")


def zero_channels(
    model: ir.Model, ratio: float, *, pad: bool, seed: int = 0, prune_outputs: Sequence[str] = ()
) -> tuple[ir.Model, ChannelAnalysis, int]:
    """A prepared copy of `model` where, in every prunable group, as many random channels as
    `ratio` removes (local scope) produce exact zeros. Returns (model, analysis, zeroed count).
    `prune_outputs` names graph outputs whose channels may be pruned (as `prune` takes them).
    """
    prepared = prepare_for_pruning(model)
    analysis = analyze_channels(prepared.graph, pad=pad, prunable_outputs=prune_outputs)
    rng = np.random.default_rng(seed)
    roots: set[int] = set()
    for group in analysis.prunable_groups:
        count = group.size - kept_count(group.size, ratio)
        chosen = rng.choice(group.size, count, replace=False)
        roots |= {group.roots[i] for i in chosen.tolist()}
    # by constant: a weight several nodes share is zeroed once and stays shared
    arrays: dict[int, tuple[ir.Value, list[tuple[ir.Node, int]], np.ndarray]] = {}
    for use in analysis.weight_uses:
        if not _must_zero(use):
            continue
        slot = analysis.slots[use.slot]
        positions = [p for p, r in enumerate(analysis.roots_of(slot).tolist()) if r in roots]
        if not positions:
            continue
        value = use.node.inputs[use.input_index]
        entry = arrays.setdefault(id(value), (value, [], value.const_value.numpy().copy()))
        if (use.node, use.input_index) not in entry[1]:
            entry[1].append((use.node, use.input_index))
        array = entry[2]
        index = [slice(None)] * array.ndim
        index[use.axis] = positions
        array[tuple(index)] = 0
    for value, readers, array in arrays.values():
        fresh = ir.Value(
            name=f"{value.name}_zeroed",
            shape=ir.Shape(array.shape),
            type=value.type,
            const_value=ir.tensor(array, name=f"{value.name}_zeroed"),
        )
        prepared.graph.register_initializer(fresh)
        for node, index in readers:
            node.replace_input_with(index, fresh)
    return prepared, analysis, len(roots)
