"""Lowering: an `onnx_ir.Model` becomes a trainable `torch.nn.Module` that runs its graph.

The module walks the graph's nodes in topological order, each through the kernel the op table
(`_ops`) built for it. Float weight initializers are `nn.Parameter`s (which inputs hold weights
and which never train: `slimgraph.ir.layout.SLOTS`); an integer weight read only by
DequantizeLinear is a float parameter holding its dequantized value (fake-quantized in the
forward pass); so is an integer weight read by an integer op (MatMulInteger, ConvInteger,
DynamicQuantizeMatMul, QAttention, ... see `_qweights`), which re-quantizes it; everything else
constant is a buffer. Nodes whose inputs are all constants (shape
arithmetic on weights, Constant nodes) are evaluated once here and kept as buffers, so a forward
pass runs only the nodes that depend on the inputs or the trainable values.

This module imports torch; `slimgraph.runtime.torch_backend` imports it lazily.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

import slimgraph.runtime.torch_backend._ops as _ops
from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir.layout import parameter_slot
from slimgraph.runtime.quant_math import type_grid
from slimgraph.runtime.torch_backend._qweights import WeightSource, weight_source

__all__ = ["LoweredModel", "lower", "WeightInfo", "QWeightInfo"]

logger = logging.getLogger(__name__)

# Ops never evaluated at lowering time even when their inputs are constant.
_NOT_FOLDED = {"Dropout", "RandomNormal", "RandomUniform", "RandomNormalLike",
               "RandomUniformLike", "Multinomial", "BatchNormalization",
               *_ops.SEQUENCE_PRODUCERS}
# Outputs that a kernel returns as float tensors holding integers (fake quantization): cast to
# their ONNX type when they leave the graph.
_INTEGER_OUTPUTS = {("QuantizeLinear", 0), ("DynamicQuantizeLinear", 0),
                    ("DynamicQuantizeLinear", 2), ("MatMulInteger", 0), ("ConvInteger", 0)}


@dataclass(frozen=True)
class WeightInfo:
    """A trainable float initializer: its parameter path and original dtype and shape."""

    initializer: str
    path: str
    dtype: ir.DataType


@dataclass(frozen=True)
class QWeightInfo:
    """An integer weight trained in float and re-quantized (its scale and zero point, else the
    integer `zero_point_default`, along `axis` in blocks of `block`)."""

    initializer: str
    path: str
    dtype: ir.DataType
    scale: str
    zero_point: str | None
    axis: int
    block: int
    zero_point_default: int = 0


@dataclass
class _Step:
    kernel: _ops.Kernel
    inputs: list[str | None]
    outputs: list[str]
    node: str


def _name(value: ir.Value) -> str:
    return value.name or ""


def _domain_name(domain: str) -> str:
    return domain if domain not in ("", "ai.onnx") else "ai.onnx"


def _qoperator_error(node: ir.Node) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"QOperator model ({_domain_name(node.domain)}::{node.op_type} node '{node.name}'): the "
        "torch backend trains the QDQ form; quantize with --format qdq and train that model"
    )


def _unknown_ops_error(nodes: Sequence[ir.Node]) -> UnsupportedModelError:
    named = ", ".join(f"{_domain_name(n.domain)}::{n.op_type} (node '{n.name}')" for n in nodes)
    return UnsupportedModelError(f"the torch backend cannot lower {named}")


def check_lowerable(model: ir.Model) -> None:
    """Raise for a QOperator node or ops the table does not know, before anything runs.

    Raises:
        UnsupportedModelError: naming the first QOperator op and its node, or every op without a
            kernel (domain::type) with the first node of each.
    """
    nodes = list(model.graph)
    for node in nodes:
        if node.op_type in _ops.QOPERATOR_OPS:
            raise _qoperator_error(node)
    unknown: dict[tuple[str, str], ir.Node] = {}
    for node in nodes:
        subgraph = any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                       for a in node.attributes.values())
        if _ops.lookup(node.domain, node.op_type) is None or subgraph:
            unknown.setdefault((_domain_name(node.domain), node.op_type), node)
    if unknown:
        raise _unknown_ops_error(list(unknown.values()))


def _path(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "v"
    if base[0].isdigit():
        base = "v_" + base
    path, i = base, 1
    while path in taken:
        path, i = f"{base}_{i}", i + 1
    taken.add(path)
    return path


def _is_float(dtype: ir.DataType | None) -> bool:
    return dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16)


class LoweredModel(nn.Module):
    """An ONNX graph as a torch module (built by `lower`).

    Attributes:
        input_names: the graph inputs `forward` takes, in order.
        output_names: the graph outputs, then the requested extra outputs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.weights = nn.Module()
        self.constants = nn.Module()
        self._steps: list[_Step] = []
        self._sources: list[tuple[str, str, str]] = []  # (value, "weights"|"constants", path)
        self._where: dict[str, tuple[str, str]] = {}  # value -> (kind, path), as in _sources
        self._float_weights: list[WeightInfo] = []
        self._qweights: list[QWeightInfo] = []
        self._stats: list[WeightInfo] = []  # BatchNormalization running mean/var
        self._scales: list[WeightInfo] = []  # learned activation scales
        self._output_casts: dict[str, torch.dtype] = {}  # QuantizeLinear codes leaving the graph

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(tensors) != len(self.input_names):
            raise BadOptionError(
                f"the model takes {len(self.input_names)} inputs "
                f"({', '.join(self.input_names)}), got {len(tensors)}"
            )
        env: dict[str, Any] = dict(zip(self.input_names, tensors, strict=True))
        for value, kind, path in self._sources:
            env[value] = getattr(self.weights if kind == "weights" else self.constants, path)
        for step in self._steps:
            inputs = [env[name] if name is not None else None for name in step.inputs]
            while inputs and inputs[-1] is None:
                inputs.pop()
            outputs = step.kernel(self, inputs)
            for name, out in zip(step.outputs, outputs, strict=False):
                if name:
                    env[name] = out
        if self._output_casts:
            for name, dtype in self._output_casts.items():
                env[name] = env[name].to(dtype)
        return tuple(env[name] for name in self.output_names)

    def run(self, feeds: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on named feeds (numpy arrays or tensors); outputs by name."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BadOptionError(f"missing model inputs: {', '.join(missing)}")
        tensors = [
            feeds[n] if isinstance(feeds[n], torch.Tensor) else _ops.to_torch(np.asarray(feeds[n]))
            for n in self.input_names
        ]
        return dict(zip(self.output_names, self(*tensors), strict=True))

    def weight_names(self) -> dict[str, str]:
        """Each parameter's module path (as in `named_parameters()`) -> its initializer name."""
        names = {f"weights.{w.path}": w.initializer for w in self._float_weights}
        names.update({f"weights.{w.path}": w.initializer for w in self._qweights})
        names.update({f"weights.{w.path}": w.initializer for w in self._scales})
        return names

    def trained_values(self) -> dict[str, np.ndarray]:
        """Initializer name -> its value now, in the initializer's own dtype (for `write_back`)."""
        values: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for w in self._float_weights + self._scales:
                values[w.initializer] = _numpy(getattr(self.weights, w.path), w.dtype)
            for w in self._stats:
                values[w.initializer] = _numpy(getattr(self.constants, w.path), w.dtype)
            for q in self._qweights:
                values[q.initializer] = self._requantize(q)
        return values

    def value(self, name: str) -> torch.Tensor:
        """The current tensor of a constant or trained value of the graph (an initializer, or
        a node output evaluated at lowering time).

        Raises:
            KeyError: `name` is computed at run time, or not a value of the graph.
        """
        kind, path = self._where[name]
        return getattr(self.weights if kind == "weights" else self.constants, path)

    def node_function(self, node: str) -> Callable[[Mapping[str, torch.Tensor]], list[Any]]:
        """Node `node`'s kernel as a function of the values it reads by name: given tensors
        first, then the graph's constant and trained values (layer-wise reconstruction runs one
        layer on its recorded inputs with a weight of its own).

        Raises:
            KeyError: no node of that name runs at run time (unknown, or evaluated once at
                lowering), or, when called, an input neither given nor constant.
        """
        step = next((s for s in self._steps if s.node == node), None)
        if step is None:
            raise KeyError(node)

        def run(given: Mapping[str, torch.Tensor]) -> list[Any]:
            inputs = [None if name is None else given[name] if name in given
                      else self.value(name) for name in step.inputs]
            while inputs and inputs[-1] is None:
                inputs.pop()
            return list(step.kernel(self, inputs))

        return run

    def _add_source(self, name: str, kind: str, path: str) -> None:
        self._sources.append((name, kind, path))
        self._where[name] = (kind, path)

    def _requantize(self, q: QWeightInfo) -> np.ndarray:
        r = type_grid(q.dtype)
        assert r is not None
        weight = getattr(self.weights, q.path)
        zp = self.value(q.zero_point) if q.zero_point else None
        if zp is None and q.zero_point_default:
            zp = torch.tensor(float(q.zero_point_default))
        ints = _ops.quantize_values(weight, self.value(q.scale), zp, r, q.axis, q.block)
        return ints.to(torch.int64).numpy().astype(q.dtype.numpy())


def _numpy(t: torch.Tensor, dtype: ir.DataType) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype.numpy(), copy=False)


def _graph_inputs(graph: ir.Graph) -> list[ir.Value]:
    return [v for v in graph.inputs if v.name not in graph.initializers]


def lower(
    model: ir.Model, *, extra_outputs: Sequence[str] = (), learn_scales: bool = False
) -> LoweredModel:
    """Lower `model` to a trainable torch module that runs its graph.

    Args:
        model: the model (not modified).
        extra_outputs: names of intermediate values to return after the graph outputs.
        learn_scales: make the scales of activation QuantizeLinear nodes parameters (LSQ).

    Returns:
        A `LoweredModel` in eval mode (BatchNormalization uses its running statistics).

    Raises:
        UnsupportedModelError: a QOperator model, or an op the table does not know (naming it and
            its node), or a dtype torch cannot hold; raised before anything runs.
        BadOptionError: an extra output that is not a value of the graph.
    """
    graph = model.graph
    check_lowerable(model)
    values: dict[str, ir.Value] = {}
    for node in graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    for v in graph.inputs:
        values[_name(v)] = v
    for name, v in graph.initializers.items():
        values[name] = v
    unknown = [name for name in extra_outputs if name not in values]
    if unknown:
        raise BadOptionError(f"extra output '{unknown[0]}' is not a value of the graph")

    module = LoweredModel()
    module.input_names = [_name(v) for v in _graph_inputs(graph)]
    module.output_names = [_name(v) for v in graph.outputs] + list(extra_outputs)
    ctx = _ops.LowerContext()
    taken: set[str] = set()
    static: dict[str, torch.Tensor] = {}  # values known at lowering time (buffers)

    # Integer weights that train (float parameters re-quantized by their readers); their scales
    # and zero points stay constant.
    sources: dict[str, WeightSource] = {}
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is not None and not _is_float(tensor.dtype) and type_grid(tensor.dtype):
            found = weight_source(value)
            if found is not None:
                sources[name] = found
    quantization_parameters = {
        v.name for s in sources.values() for v in (s.scale, s.zero_point) if v is not None
    }

    # Initializers: parameters, integer weights, scales, running statistics or buffers.
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is None:
            continue
        dtype = tensor.dtype
        if dtype not in _ops.TORCH_DTYPES:
            raise UnsupportedModelError(
                f"the torch backend cannot hold initializer '{name}' of type {dtype.name}"
            )
        array = tensor.numpy()
        uses = {(u.node.op_type, u.idx, u.node.domain) for u in value.uses()}
        slots = {(op, index) for op, index, _ in uses}
        # `ir.layout.SLOTS`: a learned slot makes even a single value a weight; a frozen one
        # (statistics, scales, bounds, masks) keeps any value a constant
        roles = [slot for op, index, domain in uses
                 if (slot := parameter_slot(op, index, domain)) is not None]
        path = _path(name, taken)
        if name in sources:
            source = sources[name]
            module._qweights.append(_qweight(module, source, name, path, array, dtype))
            module._add_source(name, "weights", path)
            if source.dequantized_by == "DequantizeLinear":
                ctx.weight_values.add(name)
                ctx.weight_values.update(source.rows)  # gathered rows of a quantized table
            else:
                q = module._qweights[-1]
                ctx.quantized_weights[name] = _ops.QuantizedWeight(
                    dtype, q.scale, q.zero_point, q.zero_point_default, q.axis, q.block)
            continue
        if not _is_float(dtype):
            module.constants.register_buffer(path, _ops.to_torch(array))
            module._add_source(name, "constants", path)
            continue
        learned = learn_scales and ("QuantizeLinear", 1) in slots
        frozen = any(slot.frozen for slot in roles) or name in quantization_parameters
        trainable = learned or (
            bool(slots)
            and not frozen
            and (array.size > 1 or any(not slot.frozen for slot in roles))
        )
        if trainable:
            module.weights.register_parameter(path, nn.Parameter(_ops.to_torch(array)))
            module._add_source(name, "weights", path)
            info = WeightInfo(name, path, dtype)
            (module._scales if learned else module._float_weights).append(info)
            if learned:
                ctx.learned_scales.add(name)
            continue
        module.constants.register_buffer(path, _ops.to_torch(array))
        module._add_source(name, "constants", path)
        if slots & {("BatchNormalization", 3), ("BatchNormalization", 4)}:
            module._stats.append(WeightInfo(name, path, dtype))
        else:
            static[name] = getattr(module.constants, path)

    # Nodes: build kernels; evaluate the ones that read only constants now.
    graph_inputs = set(module.input_names)
    trainable_values = {name for name, kind, _ in module._sources if kind == "weights"}
    for node in graph:
        opset = model.opset_imports.get(node.domain or "", model.opset_imports.get("ai.onnx", 1))
        if node.domain not in ("", "ai.onnx"):
            opset = model.opset_imports.get(node.domain, 1)
        builder = _ops.lookup(node.domain, node.op_type)
        assert builder is not None  # checked above
        kernel = builder(node, opset, ctx)
        inputs = [v.name if v is not None else None for v in node.inputs]
        outputs = [_name(v) for v in node.outputs]
        shape_of_weight = node.op_type in ("Shape", "Size") and inputs[0] in trainable_values
        like = node.inputs[1] if node.op_type == "CastLike" else None
        if like is not None and inputs[0] in static and like.dtype in _ops.TORCH_DTYPES:
            # CastLike reads only its second input's dtype, known from the graph
            result = static[inputs[0]].to(_ops.TORCH_DTYPES[like.dtype])
            path = _path(outputs[0], taken)
            module.constants.register_buffer(path, result)
            module._add_source(outputs[0], "constants", path)
            static[outputs[0]] = getattr(module.constants, path)
            continue
        if node.op_type not in _NOT_FOLDED and (
            shape_of_weight
            or all(n is None or n in static for n in inputs) and not graph_inputs & set(inputs)
        ):
            with torch.no_grad():
                args = [
                    (module.value(n) if shape_of_weight else static[n]) if n is not None else None
                    for n in inputs
                ]
                while args and args[-1] is None:
                    args.pop()
                results = kernel(module, args)
            for name, result in zip(outputs, results, strict=False):
                if name and isinstance(result, torch.Tensor):
                    path = _path(name, taken)
                    module.constants.register_buffer(path, result.detach().clone())
                    module._add_source(name, "constants", path)
                    static[name] = getattr(module.constants, path)
            continue
        module._steps.append(_Step(kernel, inputs, outputs, node.name or node.op_type))
        for index, out in enumerate(node.outputs):
            if (node.op_type, index) in _INTEGER_OUTPUTS and out.name in module.output_names:
                module._output_casts[out.name] = _ops.TORCH_DTYPES[_integer_type(node, index)]
    module.eval()
    logger.debug(
        "lowered %d nodes (%d evaluated once), %d parameters",
        len(module._steps), len(list(graph)) - len(module._steps),
        len(list(module.parameters())),
    )
    return module


def _integer_type(node: ir.Node, index: int) -> ir.DataType:
    """The ONNX type of integer output `index` of `node` (QuantizeLinear: its zero point's)."""
    if node.op_type == "QuantizeLinear":
        return _ops.q_dtype(node)
    if node.op_type == "DynamicQuantizeLinear":
        return ir.DataType.UINT8
    return ir.DataType.INT32


def _qweight(
    module: LoweredModel, source: WeightSource, name: str, path: str, array: np.ndarray,
    dtype: ir.DataType,
) -> QWeightInfo:
    """Register integer weight `name` as a float parameter holding its dequantized value."""
    assert source.scale.const_value is not None  # weight_source checked it
    scale = _ops.to_torch(source.scale.const_value.numpy())
    zp_value = source.zero_point
    zp = None
    if zp_value is not None and zp_value.const_value is not None:
        zp = _ops.to_torch(zp_value.const_value.numpy())
    elif source.zero_point_default:
        zp = torch.tensor(float(source.zero_point_default))
    weight = _ops.dequantize_values(_ops.to_torch(array), scale, zp, source.axis, source.block)
    module.weights.register_parameter(path, nn.Parameter(weight))
    return QWeightInfo(
        name, path, dtype, _name(source.scale), _name(zp_value) if zp_value is not None else None,
        source.axis, source.block, source.zero_point_default,
    )
