"""Head pruning across the architectures users export: blocks, blocks pruned, heads, runs, exact.

For every model with attention of `tests/models_hf.py` (19 Hugging Face architectures from tiny
configs with seeded random weights, GPT-J, and torch's own attention modules), exported by
`sg.from_torch` with batch and sequence symbolic, as exported ("plain") and after the
`transformer` preset ("fused"): `prune(heads=0.5)`'s blocks (found), blocks pruned, query heads
before -> after, whether onnxruntime runs the result with the outputs' shapes unchanged at two
(batch, sequence) sizes other than the export's (2, 8) with a padded row where the model takes a
mask, and whether heads zeroed beforehand (Q/K/V columns and output rows) are removed exactly
(rtol 1e-4, atol 1e-5 of the output's scale, graph optimizations off). A table, then the totals.

Run: python benchmarks/prune_heads_zoo.py [--models bert,llama,...]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import slimgraph as sg  # noqa: E402
from slimgraph._tables import render_table  # noqa: E402
from slimgraph.errors import SlimgraphError  # noqa: E402
from slimgraph.passes import run_pipeline  # noqa: E402
from slimgraph.runtime import create_session, run  # noqa: E402

SIZES = ((3, 11), (1, 21))


def _outputs(model, feed) -> dict:  # noqa: ANN001
    return run(create_session(model, optimization="disable"), feed)


def _runs(reference, pruned, case) -> bool:  # noqa: ANN001
    for batch, seq in SIZES:
        feed = case.feeds(batch, seq, 1)
        want, got = _outputs(reference, feed), _outputs(pruned, feed)
        if any(got[k].shape != v.shape or not np.isfinite(got[k]).all() for k, v in want.items()):
            return False
    return True


def _exact(reference, pruned, case) -> bool:  # noqa: ANN001
    for batch, seq in SIZES:
        feed = case.feeds(batch, seq, 2)
        want, got = _outputs(reference, feed), _outputs(pruned, feed)
        for name, expected in want.items():
            scale = max(1.0, float(np.abs(expected).max()))
            if got[name].shape != expected.shape or not np.allclose(
                    got[name], expected, rtol=1e-4, atol=1e-5 * scale):
                return False
    return True


def _form(case, model) -> list[object]:  # noqa: ANN001
    from tests.kit.heads import zero_heads

    try:
        pruned, report = sg.prune_with_report(model, heads=0.5)
    except SlimgraphError as error:
        return [case.blocks, 0, "-", "NO", "-", str(error)]
    found = len(report.heads) + len(report.heads_skipped)
    done = [b for b in report.heads if b.kept < b.heads]
    heads = f"{sum(b.heads for b in report.heads)} -> {sum(b.kept for b in report.heads)}"
    dead = zero_heads(model)
    exact = _exact(dead, sg.prune(dead, heads=0.5), case)
    reason = report.heads_skipped[0].reason if report.heads_skipped else ""
    return [found, len(done), heads, "yes" if _runs(model, pruned, case) else "NO",
            "yes" if exact else "NO", reason]


def main() -> int:
    from tests import models_hf

    names = [n for n in models_hf.ALL_MODELS if n not in models_hf.NO_ATTENTION]
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", default=",".join(names))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore")
    rows, total, pruned_total, good = [], 0, 0, 0
    for name in args.models.split(","):
        start = time.perf_counter()
        case, model = models_hf.exported(name)
        fused = run_pipeline(model, ["transformer"], verify=False).model
        plain_row, fused_row = _form(case, model), _form(case, fused)
        rows.append([name, *plain_row[:5], *fused_row[:5],
                     "; ".join(r[5] for r in (plain_row, fused_row) if r[5])])
        for row in (plain_row, fused_row):
            total += int(row[0])
            pruned_total += int(row[1])
            good += row[3] == "yes" and row[4] == "yes"
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(render_table(["architecture", "plain blocks", "pruned", "heads", "runs", "exact",
                        "fused blocks", "pruned", "heads", "runs", "exact", "left alone because"],
                       rows, align="lrrlllrrllll"))
    print(f"\n{pruned_total} of {total} attention blocks lost heads (plain and fused); "
          f"{good} of {2 * len(rows)} results run with unchanged output shapes at (batch, "
          f"sequence) {' and '.join(map(str, SIZES))} with padded rows and remove zeroed heads "
          "exactly")
    return 0 if pruned_total == total and good == 2 * len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
