"""Per-tensor fidelity of a quantized model: SQNR (dB) of every quantized tensor against fp32.

For each quantized activation two figures, both streamed over the calibration data (its first
`REPORT_SAMPLES` rows, fewer for large inputs: at most `REPORT_ELEMENTS` input values but at
least `REPORT_MIN_SAMPLES` rows; the estimates settle long before, and the report runs two models
with every activation exposed, which would otherwise cost several times the calibration itself):
- `sqnr_db`: the fp32 model's value against the quantized model's dequantized value (the error
  accumulated up to that point);
- `own_sqnr_db`: the quantized model's float value against its own Q/DQ round trip (the error this
  tensor's quantization adds by itself; rows are sorted by it, worst first).
Weights get the SQNR of their int8 round trip. `--exclude` accepts the node and layer names the
table prints: each row names the node whose exclusion changes that tensor, the quantized op that
computes it, or, for a tensor that op only reads (a graph input, a float op's output, a Reshape
or Transpose that only moves a value), the first quantized op that consumes it through such
moves (excluding the Reshape would leave the model byte-identical).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from slimgraph.ir import layer_name
from slimgraph.ir.select import exact_pattern
from slimgraph.passes.quantize.policy import DATA_MOVEMENT_OPS, QuantPlan
from slimgraph.passes.quantize.qdq import QDQResult
from slimgraph.runtime.calibrate import stream_values
from slimgraph.runtime.compare import Fidelity, FidelityAccumulator
from slimgraph.runtime.feeds import sample_count
from slimgraph.runtime.quant_math import sqnr_db

__all__ = [
    "TensorError", "QuantReport", "measure", "REPORT_SAMPLES", "REPORT_ELEMENTS",
    "REPORT_MIN_SAMPLES",
]

# Rows of calibration data the report runs on (whole batches: at least this many when there are).
REPORT_SAMPLES = 128
# ... unless the rows are large: at most this many input values (4 images of 3x224x224 ~ 0.6M
# values give activations of millions of values each, plenty for a dB figure), at least
# REPORT_MIN_SAMPLES rows. On a ResNet-18 with 32 calibration images this keeps the report
# to about a third of the quantize wall time (benchmarks/quantize.py).
REPORT_ELEMENTS = 1 << 19
REPORT_MIN_SAMPLES = 4


@dataclass(frozen=True)
class TensorError:
    """How much one quantized tensor differs from fp32."""

    tensor: str
    kind: str  # "activation" or "weight"
    node: str
    layer: str
    op_type: str
    sqnr_db: float
    own_sqnr_db: float
    # What `--exclude` needs to keep this tensor float: usually `node` alone; a tensor that two
    # quantized ops both require (a residual sum read by a Conv) needs both.
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantReport:
    """Per-tensor SQNR (worst first) and the model outputs' fidelity on the calibration data."""

    rows: tuple[TensorError, ...]
    outputs: Fidelity
    method: str
    quantized_nodes: int
    float_nodes: int

    def worst(self, count: int = 5) -> list[TensorError]:
        return list(self.rows[:count])

    def summary(self, top: int = 5) -> str:
        """A few lines for the terminal: outputs' fidelity and the worst tensors."""
        out = self.outputs
        lines = [
            f"quantized {self.quantized_nodes} nodes ({self.float_nodes} left float), "
            f"calibration '{self.method}', errors measured on {out.samples} calibration samples",
            *out.output_lines(),
        ]
        if self.rows:
            lines.append(
                "worst tensors (own SQNR dB / accumulated dB; --exclude takes the nodes listed):"
            )
            width = max(len(" ".join(r.exclude or (r.node,))) for r in self.rows[:top])
            for row in self.rows[:top]:
                layer = f"  [{row.layer}]" if row.layer else ""
                names = " ".join(row.exclude or (row.node,))
                lines.append(
                    f"  {names:<{width}}  {row.kind:<10} {_db(row.own_sqnr_db):>8} "
                    f"{_db(row.sqnr_db):>8}  {row.tensor}{layer}"
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (f"<QuantReport: {self.quantized_nodes} nodes quantized, {self.float_nodes} "
                f"float, {len(self.rows)} tensors, worst cosine {self.outputs.worst_cosine:.6f}>")

    def to_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "quantized_nodes": self.quantized_nodes,
            "float_nodes": self.float_nodes,
            "outputs": self.outputs.to_dict(),
            "tensors": [
                {k: (_json_float(v) if isinstance(v, float) else v) for k, v in asdict(r).items()}
                for r in self.rows
            ],
        }


def _db(value: float) -> str:
    return "inf" if math.isinf(value) and value > 0 else f"{value:.1f}"


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def measure(
    reference: ir.Model,
    quantized: ir.Model,
    plan: QuantPlan,
    result: QDQResult,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    method: str,
    progress: bool | None = None,
    max_samples: int = REPORT_SAMPLES,
    replan: Callable[[Sequence[str]], QuantPlan] | None = None,
) -> QuantReport:
    """Run the fp32 and the quantized model side by side on the first `max_samples` rows of
    `batches` (whole batches) and build the report."""
    batches = _FirstRows(batches, max_samples)
    activations = [a for a in plan.activations if a.value in result.dequantized]
    outputs = [v.name or "" for v in reference.graph.outputs]  # graph outputs are named
    ref_names = outputs + [a.value for a in activations]
    q_names = outputs + [a.value for a in activations]
    q_names += [result.dequantized[a.value] for a in activations]
    signal = dict.fromkeys((a.value for a in activations), 0.0)
    noise = dict.fromkeys(signal, 0.0)
    own_signal = dict.fromkeys(signal, 0.0)
    own_noise = dict.fromkeys(signal, 0.0)
    fidelity = FidelityAccumulator()
    ref_stream = stream_values(reference, ref_names, batches, progress=progress,
                               description="measuring fp32")
    q_stream = stream_values(quantized, q_names, batches, progress=progress,
                             description="measuring int8")
    for ref, got in zip(ref_stream, q_stream, strict=True):
        fidelity.add({k: ref[k] for k in outputs}, {k: got[k] for k in outputs})
        for a in activations:
            fp, own = _flat(ref[a.value]), _flat(got[a.value])
            dq = _flat(got[result.dequantized[a.value]])
            signal[a.value] += _square_sum(fp)
            noise[a.value] += _square_sum(fp - dq)
            own_signal[a.value] += _square_sum(own)
            own_noise[a.value] += _square_sum(own - dq)
    deciders = _deciding_nodes(reference, plan, replan)
    rows = []
    for a in activations:
        exclude, layer, op_type = deciders.get(a.value, ((a.node,), a.layer, a.op_type))
        rows.append(TensorError(
            a.value, "activation", exclude[0], layer, op_type,
            sqnr_db(signal[a.value], noise[a.value]),
            sqnr_db(own_signal[a.value], own_noise[a.value]),
            exclude,
        ))
    for w in plan.weights:
        sqnr = result.weight_sqnr_db.get(w.value, math.inf)
        rows.append(TensorError(w.value, "weight", w.node, w.layer, w.op_type, sqnr, sqnr,
                                (w.node,)))
    rows.sort(key=lambda r: (r.own_sqnr_db, r.sqnr_db))
    total = sum(1 for _ in reference.graph)
    return QuantReport(tuple(rows), fidelity.result(), method, len(plan.nodes),
                       total - len(plan.nodes))


def _deciding_nodes(
    model: ir.Model, plan: QuantPlan, replan: Callable[[Sequence[str]], QuantPlan] | None
) -> dict[str, tuple[tuple[str, ...], str, str]]:
    """Activation -> (nodes to exclude, layer, op type of the first) so that it stays float.

    Candidates are the quantized op that computes the value and the quantized ops that consume
    it (followed through quantized data-movement ops); with `replan` (the policy run again with
    extra exclusions: a graph walk, no calibration) the first single candidate whose exclusion
    leaves the value unquantized is chosen, else all of them together. Without `replan`, the
    computing producer, else the first computing consumer.
    """
    quantized = set(plan.nodes)
    values: dict[str, ir.Value] = {v.name: v for v in model.graph.inputs if v.name}
    nodes = {node.name: node for node in model.graph if node.name}
    for node in model.graph:
        for value in node.outputs:
            if value.name:
                values[value.name] = value

    def computes(node: ir.Node | None) -> bool:
        return node is not None and (node.name or "") in quantized and (
            node.op_type not in DATA_MOVEMENT_OPS
        )

    found: dict[str, tuple[tuple[str, ...], str, str]] = {}
    left: dict[tuple[str, ...], set[str]] = {}  # excluded nodes -> activations still quantized
    for annotation in plan.activations:
        found_value = values.get(annotation.value)
        if found_value is None:
            continue
        candidates: list[ir.Node] = []
        owner = nodes.get(annotation.node)
        if owner is not None and computes(owner):
            candidates.append(owner)
        stack: list[ir.Value] = [found_value]
        seen: set[int] = set()
        while stack:
            current = stack.pop(0)
            if id(current) in seen:
                continue
            seen.add(id(current))
            for user in current.consumers():
                if computes(user) and user not in candidates:
                    candidates.append(user)
                elif (user.name or "") in quantized and user.outputs:
                    stack.append(user.outputs[0])  # a quantized move: follow it
        if not candidates:
            continue
        chosen: list[ir.Node] = candidates[:1]
        if replan is not None:
            trials = [[c] for c in candidates] + ([candidates] if len(candidates) > 1 else [])
            for trial in trials:
                key = tuple(n.name or "" for n in trial)
                if key not in left:  # one walk of the policy per excluded set, shared by rows
                    plan_without = replan([exact_pattern(name) for name in key])
                    left[key] = {a.value for a in plan_without.activations}
                if annotation.value not in left[key]:
                    chosen = trial
                    break
        first = chosen[0]
        found[annotation.value] = (
            tuple(n.name or "" for n in chosen), layer_name(first), first.op_type
        )
    return found


def _flat(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32).ravel()


def _square_sum(values: np.ndarray) -> float:
    """Sum of squares by BLAS (blocked float32 accumulation: relative error ~1e-6 on the millions
    of values of an activation, far below what a dB figure shows; 4x faster than float64). Values
    beyond 1.8e19 (a -3.4e38 attention mask, say) overflow float32 squares: float64 then."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = float(np.dot(values, values))
    if not math.isfinite(total):
        wide = values.astype(np.float64)
        total = float(np.dot(wide, wide))
    return total


class _FirstRows:
    """The first batches of `batches` holding at least `rows` rows (fewer for large rows, see
    `REPORT_ELEMENTS`); iterable again."""

    def __init__(self, batches: Iterable[Mapping[str, np.ndarray]], rows: int) -> None:
        self.batches, self.rows = batches, rows

    def __iter__(self) -> Iterator[Mapping[str, np.ndarray]]:
        seen, limit = 0, None
        for batch in self.batches:
            count = max(1, sample_count(batch))
            if limit is None:
                per_row = sum(int(np.asarray(a).size) for a in batch.values()) // count
                limit = min(self.rows, max(REPORT_MIN_SAMPLES, REPORT_ELEMENTS // max(1, per_row)))
            if limit < self.rows and seen + count > limit and seen < limit:
                yield {name: array[: limit - seen] for name, array in batch.items()}
                return
            yield batch
            seen += count
            if seen >= limit:
                return
