"""Attention heads made dead on purpose: a head whose Q/K/V columns (and biases) and
output-projection rows are zero contributes nothing, so removing it must be exact."""

from __future__ import annotations

import onnx_ir as ir

from slimgraph.passes._kit import Names, add_initializer
from slimgraph.passes.prune import prepare_for_pruning
from slimgraph.passes.transformer import head_sites
from slimgraph.passes.transformer._headshapes import out_rows, unit_columns
from slimgraph.passes.transformer._headtypes import Weight

__all__ = ["zero_heads", "assert_half_the_heads_went"]


def assert_half_the_heads_went(result, blocks: int) -> None:  # noqa: ANN001 - PruneHeadsResult
    """`prune_heads(model, 0.5)` changed the model, skipped no block, and every one of the
    `blocks` attention blocks lost half its key/value groups (whole groups under grouped-query
    attention, with the query heads that read them)."""
    assert result.modified and not result.skipped
    assert len(result.blocks) == blocks
    for block in result.blocks:
        assert block.kv_kept == block.kv_heads - block.kv_heads // 2
        assert block.kept * block.kv_heads == block.heads * block.kv_kept  # whole groups


def zero_heads(model: ir.Model, ratio: float = 0.5) -> ir.Model:
    """A prepared copy of `model` (`prepare_for_pruning`) in which the first
    `floor(ratio * units)` pruning units of every attention block (heads, or key/value groups
    with the query heads that read them) have all-zero Q/K/V columns and biases and
    output-projection rows.

    Raises:
        AssertionError: a block head pruning cannot edit (nothing to make dead there).
    """
    prepared = prepare_for_pruning(model)
    names = Names(prepared.graph)
    sites, skipped = head_sites(prepared.graph)
    assert not skipped, skipped

    def zero(weight: Weight, positions: list[int]) -> None:
        array = weight.array().copy()
        index: list[object] = [slice(None)] * array.ndim
        index[weight.axis] = positions
        array[tuple(index)] = 0
        weight.node.replace_input_with(weight.index, add_initializer(
            prepared.graph, names.fresh("zeroed"), array))

    for site in sites:
        units = range(int(site.kv_heads * ratio))
        for unit in units:
            columns = unit_columns(site, unit)
            for role in ("q", "k", "v"):
                for weight in getattr(site, role)[0].weights:
                    zero(weight, columns[role])
        zero(site.out, out_rows(site, [h for u in units
                                       for h in range(u * site.repeat, (u + 1) * site.repeat)]))
    return prepared
