"""Attention fusion across the architectures users export: blocks found, fused, exact.

For every model of `tests/models_hf.py` (19 Hugging Face architectures from tiny configs with
seeded random weights, ConvNeXt and ResNet without attention, and torch's own attention
modules), exported by `sg.from_torch` with batch and sequence symbolic: the `transformer`
preset's fuse-attention result (blocks found, blocks fused, the first reason a block was left),
the fused ops written, and whether the fused graph is exact on onnxruntime (rtol 1e-4, atol
1e-5 of the output's scale, graph optimizations off) at two (batch, sequence) sizes other than
the export's (2, 8), with a padded row where the model takes a mask. A table, then the totals.

Run: python benchmarks/attention_zoo.py [--models bert,llama,...]
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from slimgraph._tables import render_table  # noqa: E402
from slimgraph.passes import run_pipeline  # noqa: E402
from slimgraph.runtime import create_session, run  # noqa: E402

SIZES = ((3, 11), (1, 21))
FUSED_OPS = ("MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding")


def _exact(reference, fused, case) -> bool:  # noqa: ANN001
    for batch, seq in SIZES:
        feed = case.feeds(batch, seq, 1)
        want = run(create_session(reference, optimization="disable"), feed)
        got = run(create_session(fused, optimization="disable"), feed)
        for name, expected in want.items():
            scale = max(1.0, float(np.abs(expected).max()))
            if got[name].shape != expected.shape or not np.allclose(
                    got[name], expected, rtol=1e-4, atol=1e-5 * scale):
                return False
    return True


def main() -> int:
    from tests import models_hf

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", default=",".join(models_hf.ALL_MODELS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore")
    rows, blocks, fused_total, exact_total = [], 0, 0, 0
    for name in args.models.split(","):
        start = time.perf_counter()
        case, model = models_hf.exported(name)
        result = run_pipeline(model, ["transformer"])
        record = next(r for r in result.records if r.name == "fuse-attention")
        found = int(record.details.get("blocks", 0))
        fused = int(record.details.get("fused", {}).get("attention", 0))
        exact = _exact(model, result.model, case)
        counts = collections.Counter(n.op_type for n in result.model.graph)
        ops = ", ".join(f"{op} {counts[op]}" for op in FUSED_OPS if counts[op]) or "-"
        summary = str(record.details.get("summary", ""))
        reason = summary.split("; ", 1)[1] if "; " in summary else ""
        rows.append([name, found, fused, "yes" if exact else "NO", ops, reason])
        blocks += found
        fused_total += fused
        exact_total += exact
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(render_table(["architecture", "attention blocks", "fused", "exact", "fused ops",
                        "not fused because"], rows, align="lrrlll"))
    share = fused_total / blocks if blocks else 1.0
    print(f"\n{fused_total} of {blocks} attention blocks fused ({share:.0%}); "
          f"{exact_total} of {len(rows)} fused graphs exact at (batch, sequence) "
          f"{' and '.join(map(str, SIZES))} with padded rows")
    return 0 if share >= 0.95 and exact_total == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
