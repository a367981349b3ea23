"""`bits="auto"`: each MatMul's form chosen by timing it on this machine at the user's shape.

int4 weights pay where a MatMul is memory-bound and cost where it is compute-bound. onnxruntime
1.32 on a 2-core AVX512-VNNI Xeon ran MatMulNBits (4-bit, accuracy level 4) at 0.72-0.93x of
dynamic int8's time at M = 1 row on 4096-wide layers, but 1.6-2.6x slower at M = 8 and 2.2-4.7x
slower at M = 128: a decode step gains, a prefill or an encoder sentence loses. Which side a
layer falls on depends on its K, N, the rows M it sees and the CPU, so it is measured, not
guessed:

1. The rows each MatMul sees at the user's batch and sequence length: the float model runs once
   on onnxruntime at that shape with every MatMul input exposed (`M` = the product of the
   input's leading dimensions; an LM head that reads only the last position sees `batch`).
2. For each distinct (K, N, M, weight bits), a one-node model in each form: float32 MatMul,
   dynamic int8 (what `mode="dynamic"` writes: DynamicQuantizeLinear + MatMulInteger, fused by
   onnxruntime) and MatMulNBits (what weight-only writes, at the layer's bits: 8 for the head)
   are timed interleaved (`runtime.benchmark`: shuffled rounds, medians), once per shape in
   the run.
3. Each MatMul stays dynamic int8 (the form that is never far from the fastest) unless another
   form is faster beyond noise: its time ratio to int8's has a 90% bootstrap interval wholly
   below 1 (`runtime.bench`); of those, the lowest median wins (ties: the smaller file). On a
   busy machine a shape whose timings are noisy keeps int8 rather than following one lucky
   round (a prefill once chose int4 for 8 MatMuls under load and ran 1.23x of int8). The model
   is then quantized weight-only on the MatMuls that chose MatMulNBits (embedding tables as
   weight-only always does), dynamically on those that chose int8, and the rest stay float32.

The choice is only as good as the timing: the micro-benchmarks run one MatMul, not the model
(a shared DynamicQuantizeLinear, cache effects), so benchmark the whole result too
(`slimgraph bench`). Exactness: approximate (quantization).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, cast

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir.select import exact_pattern
from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes._kit import traced_constant
from slimgraph.passes.quantize.dynamic import quantize_dynamic
from slimgraph.passes.quantize.weight_only import (
    WeightOnlyOptions,
    plan_weight_only,
    quantize_weight_only,
)
from slimgraph.runtime._decoder import decoder_io
from slimgraph.runtime.bench import benchmark
from slimgraph.runtime.calibrate import CalibrationData, stream_values
from slimgraph.runtime.feeds import example_dims, input_specs, random_feeds

__all__ = ["Form", "ShapeTiming", "AutoBitsResult", "layer_rows", "time_forms", "choose_forms",
           "quantize_auto", "ROUNDS"]

logger = logging.getLogger(__name__)

Form = Literal["int4", "int8", "fp32"]
ROUNDS = 15  # interleaved rounds per shape
_PREFERENCE: dict[str, int] = {"int4": 0, "int8": 1, "fp32": 2}  # ties: the smaller file


@dataclass(frozen=True)
class ShapeTiming:
    """Median times (ms) of one MatMul shape in each form and the form chosen.

    `nbits` is the weight-only form's bits (4, or 8 for a head kept at 8 bits); its key in
    `times` is "int4" either way (the weight-only form).
    """

    k: int
    n: int
    m: int
    nbits: int
    times: Mapping[str, float]
    faster: Mapping[str, bool] | None = None  # form -> faster than int8 beyond noise

    @property
    def choice(self) -> Form:
        candidates = list(self.times)
        if self.faster is not None and "int8" in self.times:
            candidates = ["int8", *(f for f in self.times if self.faster.get(f, False))]
        best = min(candidates, key=lambda f: (self.times[f], _PREFERENCE[f]))
        return cast(Form, best)


@dataclass(frozen=True)
class AutoBitsResult:
    """What `choose_forms` decided: a form per MatMul node name, the timings per shape."""

    batch: int
    seq: int
    forms: Mapping[str, Form]
    timings: tuple[ShapeTiming, ...]

    def summary(self) -> str:
        counts = {form: sum(1 for f in self.forms.values() if f == form)
                  for form in ("int4", "int8", "fp32")}
        return (f"bits auto at batch {self.batch}, sequence {self.seq}: "
                f"{counts['int4']} MatMul(s) weight-only int4, {counts['int8']} dynamic int8, "
                f"{counts['fp32']} float32 (timed {len(self.timings)} shape(s) on onnxruntime)")


def _sequence_dims(model: ir.Model, seq: int) -> dict[str, int]:
    """Every symbolic input dimension but the leading one of each input, set to `seq`; for a
    decode step (`runtime._decoder.decoder_io`) only the new tokens' dimension: the past keeps
    the length the export's example gave it and the mask spans past and new (`random_feeds`
    makes them consistent)."""
    decoder = decoder_io(model)
    derived = {decoder.past_dim, decoder.total_dim} if decoder is not None else set()
    dims: dict[str, int] = {}
    for spec in input_specs(model):
        for dim in (spec.shape or ())[1:]:
            if isinstance(dim, str) and dim not in derived:
                dims[dim] = seq
    return dims


def default_seq(model: ir.Model) -> int:
    """The sequence length the export's example had (its largest recorded non-batch size),
    else 1."""
    recorded = example_dims(model)
    dims = _sequence_dims(model, 0)
    sizes = [recorded[name] for name in dims if name in recorded]
    return max(sizes) if sizes else 1


def layer_rows(model: ir.Model, nodes: Sequence[ir.Node], batch: int, seq: int) -> dict[str, int]:
    """The rows M each MatMul of `nodes` multiplies at `batch` x `seq` (by node name)."""
    feeds = random_feeds(model, batch=batch, dims=_sequence_dims(model, seq))
    names = {node.name: node.inputs[0].name for node in nodes
             if node.name and node.inputs[0] is not None and node.inputs[0].name}
    values = next(stream_values(model, list(dict.fromkeys(names.values())), [feeds],
                                description="measuring MatMul rows", progress=False,
                                data="generated inputs"))
    return {node: int(math.prod(np.shape(values[value])[:-1]) or 1)
            for node, value in names.items()}


def _one_matmul(k: int, n: int, m: int) -> ir.Model:
    rng = np.random.default_rng(0)
    weight = ir.Value(name="w", shape=ir.Shape([k, n]), type=ir.TensorType(ir.DataType.FLOAT),
                      const_value=ir.tensor((rng.standard_normal((k, n)) * 0.05).astype(
                          np.float32), name="w"))
    x = ir.Value(name="x", shape=ir.Shape([m, k]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("MatMul", [x, weight], name="matmul")
    node.outputs[0].name = "y"
    node.outputs[0].shape, node.outputs[0].dtype = ir.Shape([m, n]), ir.DataType.FLOAT
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[weight],
                     opset_imports={"": 21}, name="matmul")
    return ir.Model(graph, ir_version=10)


def time_forms(
    k: int, n: int, m: int, *, nbits: int, options: WeightOnlyOptions, rounds: int = ROUNDS,
    threads: int | None = None,
) -> ShapeTiming:
    """Median times of a [m, k] x [k, n] MatMul as float32, dynamic int8 and MatMulNBits."""
    fp32 = _one_matmul(k, n, m)
    forms = {
        "fp32": fp32,
        "int8": quantize_dynamic(fp32, op_types=["MatMul"]),
        "int4": quantize_weight_only(
            fp32, bits=nbits, block_size=options.block_size, symmetric=options.symmetric,
            accuracy_level=options.accuracy_level, head_bits=None),
    }
    feed = {"x": np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)}
    result = benchmark(list(forms.values()), feed, labels=list(forms), rounds=rounds, warmup=2,
                       threads=threads)
    faster = {}
    for comparison in result.comparisons:  # ratio a/b with its 90% bootstrap interval
        if comparison.b == "int8":
            faster[comparison.a] = comparison.high < 1.0
        elif comparison.a == "int8":
            faster[comparison.b] = comparison.low > 1.0
    return ShapeTiming(k, n, m, nbits, {t.label: t.median_ms for t in result.timings}, faster)


def choose_forms(
    model: ir.Model, options: WeightOnlyOptions, *, batch: int = 1, seq: int | None = None,
    rounds: int = ROUNDS, threads: int | None = None,
) -> AutoBitsResult:
    """A form per weight-only candidate MatMul of `model` (a prepared model: weights constant,
    nodes named), timed at `batch` x `seq` (default `default_seq`).

    Raises:
        BadOptionError: batch or seq below 1.
        UnsupportedModelError: no MatMul with a constant weight to choose for.
    """
    if batch < 1 or (seq is not None and seq < 1):
        raise BadOptionError(f"the timed shape needs batch and sequence >= 1 (got {batch}, {seq})")
    seq = seq or default_seq(model)
    plan = plan_weight_only(model.graph, replace(options, embeddings=False))
    rewrites = [r for r in plan.rewrites if r.kind == "matmul"]
    if not rewrites:
        raise UnsupportedModelError(
            "nothing to quantize weight-only: no MatMul with a constant float weight")
    rows = layer_rows(model, [r.node for r in rewrites], batch, seq)
    cache: dict[tuple[int, int, int, int], ShapeTiming] = {}
    forms: dict[str, Form] = {}
    for rewrite in rewrites:
        name = rewrite.node.name or ""
        k, n = rewrite.weight.shape
        key = (k, n, rows.get(name, batch), rewrite.spec.bits)
        if key not in cache:
            cache[key] = time_forms(*key[:3], nbits=key[3], options=options, rounds=rounds,
                                    threads=threads)
            logger.info("bits auto: K=%d N=%d M=%d: %s -> %s", *key[:3], {
                f: round(t, 4) for f, t in cache[key].times.items()}, cache[key].choice)
        forms[name] = cache[key].choice
    return AutoBitsResult(batch, seq, forms, tuple(cache.values()))


def quantize_auto(
    model: ir.Model, options: WeightOnlyOptions, *, batch: int = 1, seq: int | None = None,
    calibration: CalibrationData | None = None, batch_size: int = 32, per_channel: bool = True,
    rounds: int = ROUNDS,
) -> tuple[ir.Model, AutoBitsResult]:
    """`model` (prepared) with each MatMul in the form `choose_forms` timed fastest: weight-only
    (with `options`, its method and calibration), dynamic int8, or float32.

    Returns:
        The quantized model and the choices.
    """
    chosen = choose_forms(model, options, batch=batch, seq=seq, rounds=rounds)
    by_form = {form: [name for name, f in chosen.forms.items() if f == form]
               for form in ("int4", "int8", "fp32")}
    quantized = model
    keep = [exact_pattern(name) for name in by_form["int8"] + by_form["fp32"]]
    if by_form["int4"] or options.embeddings:
        weight_only = replace(options, exclude=(*options.exclude, *keep))
        if not by_form["int4"]:
            weight_only = replace(weight_only, exclude=options.exclude, exclude_ops=(
                *options.exclude_ops, "MatMul"))
        try:
            quantized = quantize_weight_only(
                quantized, calibration=calibration, batch_size=batch_size, **vars(weight_only))
        except UnsupportedModelError:
            if by_form["int4"]:
                raise
    if by_form["int8"]:
        fp32 = [exact_pattern(name) for name in by_form["fp32"]
                if any(n.name == name and is_onnx_op(n, "MatMul") and traced_constant(
                    n.inputs[1]) is not None for n in quantized.graph)]
        quantized = quantize_dynamic(quantized, per_channel=per_channel, exclude=fp32,
                                     op_types=["MatMul"])
    return quantized, chosen
