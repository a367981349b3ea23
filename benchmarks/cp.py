"""CP decomposition of convolutions and ranks per layer, measured (issue 28, parts 1 and 2).

On the bundled digits CNN (slimgraph/data/digits_cnn.onnx; 6 convs 3x3 at 8x8 and 4x4, then a
Gemm), with the bundled splits (calib: 450 rows for the rank curves, train: 1347 rows for
`finetune`, test: 450 held-out rows for every figure printed):

1. exactness: `factorize --method cp` at the rank that reconstructs each kernel (`--rank` above
   it, `allow_growth`): largest relative output difference on onnxruntime (target rtol 1e-4);
2. ranks per layer against a uniform rank ratio at the same MACs: `--target-macs 0.5 --data`
   (convs only), then the uniform `--rank-ratio` with the most MACs not above the allocation's
   (bisection); output cosine and top-1 before fine-tuning, for `--method cp` and `tucker`;
3. `finetune` with its defaults on the allocated CP and Tucker models: top-1 on the test split
   against the unfactorized model (target: within 1 point);
4. latency at batch 256, side by side (`slimgraph.runtime.benchmark`, interleaved shuffled rounds,
   medians, 90% bootstrap interval), the original first (target: CP at most 0.7x).

`--wide` adds a latency-only check on a wider CNN with random weights (3x32x32 input, 3x3 convs of
64 and 128 channels at 32x32 and 16x16, batch 8): the same `--target-macs 0.5` allocation by
output cosine on random inputs.

Measured (2026-12, a 2-core machine shared with 4 other jobs, load 17-30: ratios only):
    1. exact rank: 4.33e-07 of the output scale (PASS)
    2. cp: 0.463x MACs, cosine 0.9946, top-1 99.56% vs uniform 0.440x, cosine 0.3459 (PASS);
       tucker: 0.456x, cosine 0.9625 vs uniform 0.447x, cosine 0.5037 (PASS)
    3. after `finetune` (defaults): cp 99.78%, tucker 99.56%, original 99.56% (PASS)
    4. batch 256: cp 0.25x (90% interval 0.20-0.31), tucker 0.30x (PASS)
    --wide: cp 0.413x MACs, cosine 0.9748, 0.38x latency; tucker 0.409x, 0.9678, 0.45x
    time of the `--target-macs 0.5` allocation, against the code before the rank curves took one
    factorization per ratio and a swapped weight (both in one run, load 5-9 on 2 cores): digits
    cp 32 s -> 18 s, tucker 12 s -> 5 s; wide cp 116 s -> 80 s (CP's ALS is most of it: 36 and
    18 decompositions), tucker 18 s -> 8 s; the same ratios and cosines

Usage:
    python benchmarks/cp.py [--rounds 20] [--threads 2] [--epochs N] [--wide | --only-wide]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402

import slimgraph as sg  # noqa: E402
from slimgraph.runtime import benchmark, compare  # noqa: E402
from slimgraph.runtime.budget import Evaluator, as_data  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "slimgraph" / "data"


def _uniform_at(model: ir.Model, method: str, macs: int) -> tuple[float, ir.Model, float]:
    """The uniform rank ratio with the most MACs not above `macs` (bisection)."""
    lo, hi = 0.01, 1.0
    for _ in range(14):
        mid = (lo + hi) / 2
        _, report = sg.factorize_with_report(model, method=method, op_types=["Conv"],
                                             rank_ratio=mid)
        if report.macs_after is not None and report.macs_after <= macs:
            lo = mid
        else:
            hi = mid
    small, report = sg.factorize_with_report(model, method=method, op_types=["Conv"],
                                             rank_ratio=lo)
    return lo, small, report.macs_after / report.macs_before


def digits(args: argparse.Namespace) -> None:
    model = ir.load(DATA / "digits_cnn.onnx")
    test = as_data(DATA / "digits_test.npz", model)
    scorer = Evaluator(model, test)
    base = scorer.reference.metric
    print(f"digits CNN: top-1 on the test split {base:.4f} ({test.samples} rows)")

    exact = sg.factorize(model, method="cp", op_types=["Conv"], rank=1_000_000,
                         allow_growth=True)
    x = {"image": test.feeds["image"][:256]}
    fidelity = compare(model, exact, x)
    worst = max(o.max_abs_error / max(o.reference_max_abs, 1e-12)
                for o in fidelity.outputs)
    print("1. CP at the exact rank: largest output difference relative to the output scale "
          f"{worst:.2e} ({'PASS' if worst <= 1e-4 else 'FAIL'}, rtol 1e-4); cosine "
          f"{fidelity.worst_cosine:.7f}")

    allocated: dict[str, ir.Model] = {}
    for method in ("cp", "tucker"):
        start = time.perf_counter()
        small, report = sg.factorize_with_report(model, method=method, op_types=["Conv"],
                                                 target_macs=0.5,
                                                 data=DATA / "digits_calib.npz")
        seconds = time.perf_counter() - start
        macs = report.macs_after / report.macs_before
        ratio, uniform, uniform_macs = _uniform_at(model, method, report.macs_after)
        mine, flat = scorer(small), scorer(uniform)
        verdict = "PASS" if mine.cosine > flat.cosine else "FAIL"
        print(f"2. --method {method} --target-macs 0.5: ranks {report.allocation.ratios} -> "
              f"{macs:.3f}x MACs, cosine {mine.cosine:.4f}, top-1 {mine.metric:.4f} "
              f"({seconds:.0f} s); uniform --rank-ratio {ratio:.3f} -> {uniform_macs:.3f}x MACs, "
              f"cosine {flat.cosine:.4f}, top-1 {flat.metric:.4f}: {verdict}")
        allocated[method] = small

    tuned: dict[str, ir.Model] = {}
    for method, small in allocated.items():
        start = time.perf_counter()
        options = {} if args.epochs is None else {"epochs": args.epochs}
        trained = sg.finetune(small, DATA / "digits_train.npz", progress=False, **options)
        accuracy = scorer(trained).metric
        verdict = "PASS" if accuracy >= base - 0.01 else "FAIL"
        print(f"3. {method} 0.5x + finetune (defaults): top-1 {accuracy:.4f} vs {base:.4f} "
              f"({100 * (accuracy - base):+.2f} points, {time.perf_counter() - start:.0f} s): "
              f"{verdict}")
        tuned[method] = trained

    batch = {"image": test.feeds["image"][:256]}
    result = benchmark([model, tuned["cp"], tuned["tucker"]], batch,
                       labels=["original", "cp 0.5x", "tucker 0.5x"], rounds=args.rounds,
                       threads=args.threads)
    print(f"4. latency, batch 256, {args.threads} thread(s), {args.rounds} rounds:")
    print(result)
    cp_ratio = result.timings[1].ratio
    print(f"   CP {cp_ratio:.3f}x of the original: {'PASS' if cp_ratio <= 0.7 else 'FAIL'} "
          "(target <= 0.7x)")


def wide(args: argparse.Namespace) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, 10),
    ).eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = sg.from_torch(net, (x,))
    name = model.graph.inputs[0].name
    rows = np.random.default_rng(1).standard_normal((32, 3, 32, 32)).astype(np.float32)
    models = [model]
    for method in ("cp", "tucker"):
        start = time.perf_counter()
        small, report = sg.factorize_with_report(model, method=method, op_types=["Conv"],
                                                 target_macs=0.5, data={name: rows})
        cosine = compare(model, small, {name: x.numpy()}).worst_cosine
        print(f"wide CNN --method {method} --target-macs 0.5: ranks "
              f"{[layer.rank for layer in report.layers]}, "
              f"{report.macs_after / report.macs_before:.3f}x MACs, cosine {cosine:.4f} "
              f"({time.perf_counter() - start:.0f} s)")
        models.append(small)
    result = benchmark(models, {name: x.numpy()}, labels=["original", "cp 0.5x", "tucker 0.5x"],
                       rounds=args.rounds, threads=args.threads)
    print(f"wide CNN latency (3x32x32, convs 64-128 channels, random weights), batch 8, "
          f"{args.threads} thread(s), {args.rounds} rounds:")
    print(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None,
                        help="finetune epochs (default: its own)")
    parser.add_argument("--wide", action="store_true", help="also the wider CNN (latency only)")
    parser.add_argument("--only-wide", action="store_true", help="only the wider CNN")
    args = parser.parse_args()
    if not args.only_wide:
        digits(args)
    if args.wide or args.only_wide:
        wide(args)


if __name__ == "__main__":
    main()
