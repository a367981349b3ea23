"""The ONNX backend test suite as differential data: the figures of
`tests/passes/test_backend_differential.py`, printed.

Cases: every node case the installed onnx package generates (`onnx.backend.test.loader`), and
the simple, pytorch-converted and pytorch-operator folders it ships; valid when onnxruntime runs
them correctly (as the backend runner judges, twice the same). Variants: each case with its
tensor inputs but the first, and with all of them, frozen into weights. Runs, each on a fresh
single-threaded onnxruntime session without graph optimizations:

- `optimize` (lossless) with the verifier off on every case and variant, the written model
  compared with the input model on the case's inputs (exact tolerance of the output's dtype);
- the default call `optimize(model)` on every case (no variants): verified on generated inputs,
  else (counted unverified) with the case's own inputs;
- dynamic int8 (`quantize(mode="dynamic", verify=False)`) on cases and variants with a
  MatMul/Gemm/Gather/LSTM/GRU/RNN: the written model must run ("refused": nothing to quantize).

"cases" counts the models each run tried; "refused" is a one-line bad-input error (NaN weights
in a frozen variant, nothing to quantize).

Run: `PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE python benchmarks/backend_suite.py [--examples]`
"""

from __future__ import annotations

import argparse
import logging
import time

from slimgraph._tables import render_table
from tests.kit.backend import (
    Tally,
    all_cases,
    dynamic_int8,
    optimize_default,
    optimize_verifier_off,
    valid_cases,
    with_frozen,
)

OUTCOMES = ("ok", "refused", "crash", "invalid", "mismatch", "verification")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", action="store_true", help="list the failures' first lines")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    start = time.perf_counter()
    cases = all_cases()
    valid = list(valid_cases(with_frozen(cases)))
    base = [(case, out) for case, out in valid if "_frozen" not in case.name]
    setup = time.perf_counter() - start
    kinds: dict[str, int] = {}
    for case, _ in base:
        kinds[case.kind] = kinds.get(case.kind, 0) + 1
    print(f"{len(cases)} cases generated or shipped, {len(base)} valid "
          f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}), "
          f"{len(valid) - len(base)} valid frozen variants; setup {setup:.0f} s")
    runs: list[tuple[str, int, Tally, float]] = []
    for label, pairs, run in (
        ("optimize, verifier off", valid, optimize_verifier_off),
        ("optimize, default call", base, optimize_default),
        ("dynamic int8", valid, dynamic_int8),
    ):
        began = time.perf_counter()
        tally = run(pairs)
        runs.append((label, sum(tally[o] for o in OUTCOMES), tally, time.perf_counter() - began))
    rows = [
        [label, tried, *(tally[o] for o in OUTCOMES), f"{seconds:.0f}"]
        for label, tried, tally, seconds in runs
    ]
    print(render_table(["run", "cases", *OUTCOMES, "s"], rows, align="lrrrrrrrr"))
    default = runs[1][2]
    print(f"\ndefault call verified {default['verified']} of {len(base)} valid cases "
          f"({default['verified'] / len(base):.1%}); total {time.perf_counter() - start:.0f} s")
    if args.examples:
        for label, _, tally, _ in runs:
            for outcome in ("crash", "invalid", "mismatch", "verification", "unverified"):
                for line in tally.examples.get(outcome, []):
                    print(f"{label} {outcome}: {line}")


if __name__ == "__main__":
    main()
