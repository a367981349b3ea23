"""What every slimgraph pass shares, on top of `onnx_ir.passes`.

A pass is an `onnx_ir.passes.InPlacePass` or `FunctionalPass` with keyword-only options and no
state that survives between calls. Its traits are declared where it registers
(`passes.registry.register_pass(name, exact=...)`): exact when outputs must not change (tested
at fp32 rtol 1e-4 / atol 1e-5 of the output's scale), approximate when it reports fidelity
instead. A pass that produces data returns a `SlimgraphPassResult` subclass carrying it.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir import io_shapes, restore_dim_names
from slimgraph.passes._graph_utils import output_signature, restore_outputs

__all__ = ["Skipped", "SlimgraphPassResult", "SlimgraphPass", "SlimgraphFunctionalPass"]


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A node a pass left alone, and why (shown in reports and logs)."""

    node: str
    op_type: str
    reason: str


@dataclasses.dataclass
class SlimgraphPassResult(ir.passes.PassResult):
    """`PassResult` plus what the pass skipped; passes with more data subclass it."""

    skipped: list[Skipped] = dataclasses.field(default_factory=list)


class _ErrorsPassThrough:
    """Let slimgraph's own errors from `requires`/`ensures` reach the user unwrapped, and keep
    the graph's outputs: every pass returns a model whose outputs have the names (all of them, in
    order) and types they had before (`restore_outputs`), and whose symbolic dimensions keep their
    names (`restore_dim_names`). The outputs of Scan/Loop/If bodies are kept the same way by
    in-place passes (a body whose two outputs became one value, or an input, gets an Identity
    back: onnxruntime fills only one of two outputs that share a value).

    `onnx_ir` wraps any exception from `requires` in a `PreconditionError`; a user who passed an
    impossible option should see our one-line message (and the CLI its exit code 2), not the wrap.
    """

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> ir.passes.PassResult:
        model = (
            model_or_result.model
            if isinstance(model_or_result, ir.passes.PassResult)
            else model_or_result
        )
        signature = output_signature(model.graph)
        bodies = [(g, output_signature(g)) for g in model.graphs() if g is not model.graph]
        shapes = io_shapes(model)
        try:
            result = super().__call__(model_or_result)  # type: ignore[misc]
        except ir.passes.InvariantError as error:
            if isinstance(error.__cause__, SlimgraphError):
                raise error.__cause__ from None
            raise
        restored = restore_outputs(result.model.graph, signature)
        if result.model is model:  # in place: the same body graphs, still in the model or gone
            for body, outputs in bodies:
                restored = restore_outputs(body, outputs) or restored
        if restored and not result.modified:
            result.modified = True
        restore_dim_names(result.model, shapes)  # `batch` stays `batch`, never `unk__25`
        return result


class SlimgraphPass(_ErrorsPassThrough, ir.passes.InPlacePass):
    """An in-place slimgraph pass. Subclasses implement `call` (traits: `register_pass`)."""


class SlimgraphFunctionalPass(_ErrorsPassThrough, ir.passes.FunctionalPass):
    """A slimgraph pass returning a new model. Subclasses implement `call` (traits:
    `register_pass`)."""
