"""What the two weight quantizers (dynamic, weight-only) share.

The pass skeleton that plans, materializes and cleans up, the writer base (fresh names, new
constants, tied weights quantized once), the working copy at a supported opset, and the
bias/dtype helpers.

A dynamo export reads a Linear's weight through `Transpose(initializer)` (the exporter's optimizer
is off), so "constant weight" means a value computed from initializers by data-movement nodes
only; the kit's `traced_constant` follows such chains and returns the weight as the consumer
sees it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common

from slimgraph.errors import UnsupportedModelError, first_line
from slimgraph.ir import copy_model, layer_name, metadata
from slimgraph.passes._graph_utils import opset_version as _graph_opset_version
from slimgraph.passes._kit import Names, add_initializer, traced_constant
from slimgraph.passes.base import Skipped, SlimgraphPass, SlimgraphPassResult
from slimgraph.passes.opset import ConvertOpsetPass
from slimgraph.runtime import create_session, run
from slimgraph.runtime.exact import exact_difference
from slimgraph.runtime.feeds import driving_feeds

__all__ = [
    "MS_DOMAIN",
    "QuantizedNode",
    "WeightPlan",
    "WeightQuantizeResult",
    "WeightQuantizePass",
    "WeightWriter",
    "working_copy",
    "bias_add_after",
    "bias_of",
    "content_key",
    "as_tuple",
    "is_float32",
    "opset_version",
    "upgrade_opset",
]

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"

_R = TypeVar("_R")


@dataclass(frozen=True)
class QuantizedNode:
    """One node a weight quantizer quantized: what it became and how its weight is stored."""

    node: str
    op_type: str
    layer: str
    weight: str
    kernel: str
    granularity: str


@dataclass(frozen=True)
class WeightPlan(Generic[_R]):
    """What a weight quantizer will do to a graph: rewrites (frozen records, in the order they
    are applied), nodes left float with the reason, and how many candidate nodes it looked at."""

    rewrites: tuple[_R, ...]
    skipped: tuple[Skipped, ...]
    candidates: int


@dataclass
class WeightQuantizeResult(SlimgraphPassResult):
    """What a weight quantizer quantized (and, in `skipped`, what it left float and why)."""

    quantized: list[QuantizedNode] = field(default_factory=list)


class WeightQuantizePass(SlimgraphPass, Generic[_R]):
    """The skeleton of dynamic and weight-only quantization (approximate): plan (`_plan`, a
    frozen `WeightPlan`), refuse an empty plan (`_nothing`), apply each rewrite through the
    subclass's dispatch table (`_materialize`), then drop the float weights nothing reads."""

    exact = False
    mode = ""  # "dynamic", "weight-only": names the mode in logs

    def _plan(self, graph: ir.Graph) -> WeightPlan[_R]:
        raise NotImplementedError

    def _plan_model(self, model: ir.Model) -> WeightPlan[_R]:
        """The plan for `model` (default: `_plan` of its graph; a method that reads data on
        onnxruntime needs the model)."""
        return self._plan(model.graph)

    def _nothing(self, plan: WeightPlan[_R], reasons: str) -> str:
        """The message of the error for a plan without rewrites (`reasons`: why, or "")."""
        raise NotImplementedError

    def _materialize(self, graph: ir.Graph, plan: WeightPlan[_R]) -> list[QuantizedNode]:
        raise NotImplementedError

    def call(self, model: ir.Model) -> WeightQuantizeResult:
        plan = self._plan_model(model)
        if not plan.rewrites:
            reasons = "; ".join(sorted({entry.reason for entry in plan.skipped}))
            raise UnsupportedModelError(self._nothing(plan, reasons))
        quantized = self._materialize(model.graph, plan)
        for entry in plan.skipped:
            logger.info("%s quantization skipped %s (%s): %s", self.mode, entry.node,
                        entry.op_type, entry.reason)
        onnx_ir.passes.common.RemoveUnusedNodesPass()(model)  # the float weights, Transposes
        if any(node.domain == MS_DOMAIN for node in model.graph):
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return self._result(model, list(plan.skipped), quantized)

    def _result(
        self, model: ir.Model, skipped: list[Skipped], quantized: list[QuantizedNode]
    ) -> WeightQuantizeResult:
        return WeightQuantizeResult(model, modified=True, skipped=skipped, quantized=quantized)


class WeightWriter:
    """Base of the materializers: fresh names, new constants, the layer tag of new nodes, and a
    cache so that tied weights (equal `content_key`) are quantized and stored once."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.names = Names(graph)
        self.cache: dict[tuple[object, ...], tuple[ir.Value | None, ...]] = {}

    def _name(self, base: str) -> str:
        return self.names.fresh(base)

    def _initializer(self, base: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
        return add_initializer(self.graph, base, array, names=self.names)

    @staticmethod
    def _props(node: ir.Node) -> dict[str, str] | None:
        """The metadata of a node that replaces `node`: its torch layer."""
        return {metadata.LAYER: layer_name(node)} if layer_name(node) else None


def working_copy(
    model: ir.Model, minimum: int, target: int, check: Callable[[], None] | None = None
) -> ir.Model:
    """The copy a weight quantizer rewrites: `model` upgraded to opset `target` (checked, see
    `upgrade_opset`) when its opset is below `minimum`, else a plain copy. `check` (the
    options' own check) runs first, so a bad option never costs an upgrade."""
    if check is not None:
        check()
    if opset_version(model) < minimum:
        return upgrade_opset(model, target)
    return copy_model(model)


def bias_add_after(node: ir.Node, columns: int) -> ir.Node | None:
    """The Add right after `node` that adds a constant [N] bias (fused into the int8 kernel)."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    bias = traced_constant(other)
    if bias is None or bias.dtype != np.float32 or bias.shape != (columns,):
        return None
    if add.outputs[0].shape is not None and out.shape is not None:
        if add.outputs[0].shape != out.shape:  # the bias must not broadcast the result up
            return None
    return add


def bias_of(add: ir.Node, node: ir.Node) -> np.ndarray:
    """The constant bias operand of a bias Add found by `bias_add_after`."""
    other = add.inputs[0] if add.inputs[1] is node.outputs[0] else add.inputs[1]
    array = traced_constant(other)
    assert array is not None
    return array


def as_tuple(value: str | Sequence[str]) -> tuple[str, ...]:
    """One pattern or op type given as a string, or several, as a tuple."""
    return (value,) if isinstance(value, str) else tuple(value)


def content_key(kind: str, array: np.ndarray) -> tuple[str, tuple[int, ...], str, bytes]:
    """A key equal for equal weights: tied weights (the same values reached through different
    nodes, e.g. two Transposes of one initializer) are quantized once and stored once."""
    data = np.ascontiguousarray(array)
    return kind, data.shape, str(data.dtype), hashlib.sha256(data.tobytes()).digest()


def is_float32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def opset_version(model: ir.Model) -> int:
    """The model's default-domain ONNX opset (0 when it imports none)."""
    return _graph_opset_version(model, default=0)


def upgrade_opset(model: ir.Model, version: int) -> ir.Model:
    """A copy of `model` converted to ONNX opset `version` (`ConvertOpsetPass`).

    The converted model must pass `onnx.checker` and produce the same outputs on onnxruntime
    (`runtime.exact`) as the original on inputs generated to drive it
    (`runtime.feeds.driving_feeds`); otherwise `UnsupportedModelError`.
    """
    try:
        upgraded = ConvertOpsetPass(opset=version)(model).model
        onnx.checker.check_model(ir.to_proto(upgraded))
    except Exception as error:  # the converter raises bare RuntimeErrors; name the cause once
        raise UnsupportedModelError(
            f"cannot upgrade the model from opset {opset_version(model)} to {version}: "
            f"{first_line(error)}"
        ) from error
    feeds, before = driving_feeds(model)
    try:
        after = run(create_session(upgraded, optimization="disable"), feeds)
    except Exception as error:  # the converter wrote a model onnxruntime refuses
        raise UnsupportedModelError(
            f"cannot upgrade the model from opset {opset_version(model)} to {version}: "
            f"onnxruntime cannot run the upgraded model ({first_line(error)})"
        ) from error
    for name, expected in before.items():
        if name not in after or exact_difference(expected, after[name]) is not None:
            raise UnsupportedModelError(
                f"upgrading the model to opset {version} changed output '{name}'"
            )
    return upgraded
