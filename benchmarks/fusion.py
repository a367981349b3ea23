"""Does `--preset lossless` make models faster on onnxruntime? Nodes before/after and latency ratio.

For each model of the ONNX zoo set shipped in the onnx package (+ a torch ResNet-18-style export),
runs `slimgraph.passes.lossless` (verified) and times the model before and after side by side
(`slimgraph.runtime.benchmark`: interleaved shuffled rounds, medians), once with onnxruntime's own
graph optimizations off ("disable") and once fully on ("all").

Baseline: the zoo files build their weights with ConstantOfShape at run time; timing that would
flatter us, so "before" is the input with only those weights materialized as initializers (the
`constant-of-shape` + `initializer-inputs` passes), i.e. the same weights, the original graph.
The torch model is exported with `slimgraph.from_torch` (dynamo, exporter optimizer off).

Verdict: PASS when after/before <= 1 + NOISE_MARGIN (3%) for every model and level: our output
must never be slower. Each benchmark also times a second copy of "before" (A/A) to show the noise
floor of the run; a ratio above the margin is measured twice more and the median of three counts.

Usage:
    python benchmarks/fusion.py [--rounds 20] [--models resnet50 densenet121 ...] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx_ir as ir  # noqa: E402

import slimgraph as sg  # noqa: E402
from slimgraph._tables import render_table  # noqa: E402
from slimgraph.passes import lossless, run_pipeline  # noqa: E402
from slimgraph.passes.pipeline import node_count  # noqa: E402
from slimgraph.runtime import benchmark, random_feeds  # noqa: E402

NOISE_MARGIN = 0.03


def zoo_models() -> dict[str, Path]:
    import onnx

    folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    return {p.stem.removeprefix("light_"): p for p in sorted(folder.glob("*.onnx"))}


def torch_resnet() -> ir.Model:
    import torch

    from tests.models import _randomize_batchnorm, resnet18_style

    torch.manual_seed(0)
    module = _randomize_batchnorm(resnet18_style()).eval()
    return sg.from_torch(module, (torch.randn(1, 3, 64, 64),))


def measure(
    baseline: ir.Model, optimized: ir.Model, feeds: dict, level: str, args: argparse.Namespace
) -> tuple[float, float]:
    """(after/before, before-copy/before) latency ratios from one interleaved benchmark."""
    timing = benchmark(
        [baseline, baseline, optimized],
        feeds,
        labels=["before", "before (A/A)", "after"],
        rounds=args.rounds,
        warmup=2,
        threads=args.threads,
        optimization=level,  # type: ignore[arg-type]
    )
    return timing.timings[2].ratio, timing.timings[1].ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--models", nargs="*", help="subset of model names")
    args = parser.parse_args()

    sources: dict[str, Path | None] = {**zoo_models(), "torch_resnet18_style": None}
    names = args.models or list(sources)
    rows = []
    verdict = True
    for name in names:
        start = time.perf_counter()
        original = torch_resnet() if sources[name] is None else sg.load(sources[name])
        baseline = run_pipeline(original, ["initializer-inputs", "constant-of-shape"]).model
        result = lossless(baseline, verify=True)
        optimized = result.model
        seconds = time.perf_counter() - start
        feeds = random_feeds(baseline, seed=0)
        cells = []
        ok = True
        for level in ("disable", "all"):
            runs = [measure(baseline, optimized, feeds, level, args)]
            if runs[0][0] > 1 + NOISE_MARGIN:  # confirm before calling it slower
                runs += [measure(baseline, optimized, feeds, level, args) for _ in range(2)]
            after = statistics.median(r[0] for r in runs)
            control = statistics.median(r[1] for r in runs)
            level_ok = after <= 1 + NOISE_MARGIN
            ok = ok and level_ok
            mark = f" ({len(runs)}x)" if len(runs) > 1 else ""
            cells += [f"{after:.3f}{mark}", f"{control:.3f}"]
        verdict = verdict and ok
        rows.append(
            [
                name,
                node_count(original),
                node_count(baseline),
                node_count(optimized),
                *cells,
                f"{seconds:.1f} s",
                "ok" if ok else "SLOWER",
            ]
        )
        print(f"  done {name}", file=sys.stderr, flush=True)
    headers = [
        "model",
        "nodes file",
        "nodes before",
        "nodes after",
        "after/before ORT off",
        "A/A",
        "after/before ORT all",
        "A/A",
        "optimize",
        "",
    ]
    print(render_table(headers, rows, align="lrrrrrrrrl"))
    print(
        f"\nlatency: median of {args.rounds} interleaved rounds, ratio of medians to 'before' "
        f"(lower is faster), {args.threads} intra-op thread(s); A/A = a second copy of 'before' "
        "timed in the same rounds (the noise floor); a ratio above the margin is measured twice "
        "more and the median of the three is shown, marked (3x); 'optimize' = lossless with "
        "verification, wall time."
    )
    print(
        f"never slower (after/before <= {1 + NOISE_MARGIN:.2f} for every model and level, "
        f"{NOISE_MARGIN:.0%} noise margin): {'PASS' if verdict else 'FAIL'}"
    )
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
