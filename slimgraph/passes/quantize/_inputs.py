"""What the data-aware weight-only methods know about a MatMul's input: streamed statistics.

GPTQ needs H = X^T X of each MatMul's input X [rows, K]; AWQ needs the mean |x| per input
channel and a sample of rows to score its scales on. The inputs are read on onnxruntime by
exposing them as extra graph outputs (`runtime.calibrate.stream_values`), one calibration batch
at a time; each batch only adds to fixed-size sums and to a reservoir sample of at most
`keep` rows (Vitter's algorithm R, seeded), so memory does not grow with the number of samples.
MatMuls that read the same value (the Q, K, V projections of one block) share one record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BadDataError
from slimgraph.runtime.calibrate import stream_values

__all__ = ["InputStats", "collect_inputs"]


@dataclass
class InputStats:
    """Streamed statistics of one MatMul input X, flattened to rows [rows, K].

    Attributes:
        rows: rows seen.
        gram: sum of x x^T over the rows, float64 [K, K] (None when not asked for).
        abs_sum: sum of |x| per channel, float64 [K].
        sample: up to `keep` rows, float32 [m, K], a uniform sample of all rows.
    """

    rows: int = 0
    gram: np.ndarray | None = None
    abs_sum: np.ndarray | None = None
    sample: np.ndarray | None = None
    _seen: int = field(default=0, repr=False)

    @property
    def mean_abs(self) -> np.ndarray:
        """mean |x| per input channel [K]."""
        assert self.abs_sum is not None
        return self.abs_sum / max(1, self.rows)

    def add(self, x: np.ndarray, *, gram: bool, keep: int, rng: np.random.Generator) -> None:
        """Add one batch of rows [m, K]."""
        x64 = x.astype(np.float64)
        if gram:
            product = x64.T @ x64
            self.gram = product if self.gram is None else self.gram + product
        total = np.abs(x64).sum(axis=0)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.rows += len(x)
        if keep:
            self._reservoir(x.astype(np.float32), keep, rng)

    def _reservoir(self, x: np.ndarray, keep: int, rng: np.random.Generator) -> None:
        if self.sample is None:
            self.sample = np.empty((0, x.shape[1]), np.float32)
        room = keep - len(self.sample)
        if room > 0:
            self.sample = np.concatenate([self.sample, x[:room]])
            self._seen += min(room, len(x))
            x = x[room:]
        if not len(x):
            return
        slots = rng.integers(0, self._seen + 1 + np.arange(len(x)))  # row i replaces slot < keep
        self._seen += len(x)
        chosen = slots < keep
        self.sample[slots[chosen]] = x[chosen]  # later rows win ties, as in the sequential form


def collect_inputs(
    model: ir.Model,
    names: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    gram: bool,
    keep: int,
    seed: int = 0,
    progress: bool | None = None,
    total: int | None = None,
) -> dict[str, InputStats]:
    """Statistics of the values `names` (MatMul inputs [..., K]) over the calibration batches.

    Args:
        model: the model the values belong to (not modified; a copy exposes them).
        names: the values, each flattened to rows over its leading axes.
        batches: checked feed batches (`runtime.calibrate.calibration_batches`).
        gram: accumulate X^T X (GPTQ).
        keep: rows to keep as a sample (AWQ; 0: none).
        seed: the sample's seed.
        progress, total: the progress bar (see `runtime.calibrate.RunOptions`).

    Raises:
        BadDataError: a value with NaN or Inf on the data, or no batches.
    """
    rng = np.random.default_rng(seed)
    stats = {name: InputStats() for name in names}
    for index, values in enumerate(stream_values(
        model, list(names), batches, description="weight-only calibration", progress=progress,
        total=total,
    )):
        for name in names:
            array = np.asarray(values[name])
            rows = array.reshape(-1, array.shape[-1])
            if not np.isfinite(rows).all():
                raise BadDataError(
                    f"calibration batch {index}: value '{name}' holds NaN or Inf"
                )
            stats[name].add(rows, gram=gram, keep=keep, rng=rng)
    if any(record.rows == 0 for record in stats.values()):
        raise BadDataError("calibration data is empty (no rows reached the MatMuls)")
    return stats
