"""Per-tensor fidelity of a quantized model: SQNR (dB) of every quantized tensor against fp32.

For each quantized activation two figures, both streamed over the calibration data:
- `sqnr_db`: the fp32 model's value against the quantized model's dequantized value (the error
  accumulated up to that point);
- `own_sqnr_db`: the quantized model's float value against its own Q/DQ round trip (the error this
  tensor's quantization adds by itself; rows are sorted by it, worst first).
Weights get the SQNR of their int8 round trip. `--exclude` accepts the node and layer names the
table prints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from slimgraph.passes.quantize.policy import QuantPlan
from slimgraph.passes.quantize.qdq import QDQResult
from slimgraph.runtime.calibrate import stream_values
from slimgraph.runtime.compare import Fidelity, FidelityAccumulator

__all__ = ["TensorError", "QuantReport", "measure"]


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
            f"calibration '{self.method}' on {out.samples} batches",
        ]
        for o in out.outputs:
            top1 = ""
            if o.top1_agreement is not None:
                top1 = f", top-1 agreement {o.top1_agreement:.4f}"
            lines.append(
                f"output {o.name}: cosine {o.cosine:.5f}, SQNR {_db(o.sqnr_db)}{top1}"
            )
        if self.rows:
            lines.append("worst tensors (own SQNR dB / accumulated dB; --exclude takes the node):")
            width = max(len(r.node) for r in self.rows[:top])
            for row in self.rows[:top]:
                layer = f"  [{row.layer}]" if row.layer else ""
                lines.append(
                    f"  {row.node:<{width}}  {row.kind:<10} {_db(row.own_sqnr_db):>8} "
                    f"{_db(row.sqnr_db):>8}  {row.tensor}{layer}"
                )
        return "\n".join(lines)

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


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def measure(
    reference: ir.Model,
    quantized: ir.Model,
    plan: QuantPlan,
    result: QDQResult,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    method: str,
    progress: bool | None = None,
) -> QuantReport:
    """Run the fp32 and the quantized model side by side on `batches` and build the report."""
    activations = [a for a in plan.activations if a.value in result.dequantized]
    outputs = [v.name for v in reference.graph.outputs]
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
            fp = ref[a.value].astype(np.float64)
            own = got[a.value].astype(np.float64)
            dq = got[result.dequantized[a.value]].astype(np.float64)
            signal[a.value] += float(np.sum(fp * fp))
            noise[a.value] += float(np.sum((fp - dq) ** 2))
            own_signal[a.value] += float(np.sum(own * own))
            own_noise[a.value] += float(np.sum((own - dq) ** 2))
    rows = [
        TensorError(
            a.value, "activation", a.node, a.layer, a.op_type,
            _sqnr(signal[a.value], noise[a.value]), _sqnr(own_signal[a.value], own_noise[a.value]),
        )
        for a in activations
    ]
    for w in plan.weights:
        sqnr = result.weight_sqnr_db.get(w.value, math.inf)
        rows.append(TensorError(w.value, "weight", w.node, w.layer, w.op_type, sqnr, sqnr))
    rows.sort(key=lambda r: (r.own_sqnr_db, r.sqnr_db))
    total = sum(1 for _ in reference.graph)
    return QuantReport(tuple(rows), fidelity.result(), method, len(plan.nodes),
                       total - len(plan.nodes))
