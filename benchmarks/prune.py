"""Structured pruning side by side with Torch-Pruning: parameters, MACs, latency ratios.

For a ResNet-18-style CNN (tests/models.resnet18_style, 1000 classes) and a MobileNetV2-style CNN
(tests/models.MobileNetV2Tiny(width=1.0)), at channel ratios 0.3 and 0.5:
- ours: `sg.prune(model, ratio=r)` (L1 of the producing weights, local scope) on the ONNX export;
- Torch-Pruning (`pip install torch-pruning`): `MetaPruner` with `GroupMagnitudeImportance(p=1)`
  (L1), the same ratio, the classifier ignored (our graph outputs are never shrunk either), applied
  to the same torch model, then exported the same way.

Baseline: `slimgraph.from_torch` (dynamo export, exporter optimizer off, dynamic batch) with the
constants folded (`prepare_for_pruning`, exact), so the three models differ only by the pruning.
Latency: `slimgraph.runtime.benchmark` (all models of one architecture and batch in one run,
interleaved shuffled rounds, medians), onnxruntime optimization level "all", as a ratio to the
unpruned model at batch 1 and 8. Input 3x224x224. Weights are random (seeded, BatchNorm statistics
randomized): the channels each tool removes differ, so only cost is compared, not accuracy.

Verdict per model and ratio: PASS when our MACs and both latency ratios are within 10% of
Torch-Pruning's or better.

With --round-to N our models pruned with `round_to=N` are timed in the same run (extra rows).
With --int8 the two 0.5-pruned models are also quantized by `sg.quantize` (static QDQ, uint8
activations, per-channel int8 weights, min-max on 16 random samples) and timed in the same run.

Usage:
    python benchmarks/prune.py [--rounds 20] [--size 224] [--threads N] [--models NAME ...]
        [--round-to N] [--int8]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402
import torch  # noqa: E402

import slimgraph as sg  # noqa: E402
from slimgraph._tables import format_count, render_table  # noqa: E402
from slimgraph.ir import analysis  # noqa: E402
from slimgraph.passes.prune import prepare_for_pruning  # noqa: E402
from slimgraph.runtime import benchmark  # noqa: E402
from tests import models as test_models  # noqa: E402

RATIOS = (0.3, 0.5)
BATCHES = (1, 8)
MARGIN = 0.10


def architectures() -> dict[str, tuple[torch.nn.Module, str]]:
    """name -> (eval torch model, attribute name of its classifier)."""
    torch.manual_seed(0)
    resnet = test_models._randomize_batchnorm(test_models.resnet18_style()).eval()
    torch.manual_seed(0)
    mobilenet = test_models._randomize_batchnorm(test_models.MobileNetV2Tiny(width=1.0)).eval()
    return {"resnet18-style": (resnet, "fc"), "mobilenetv2-style": (mobilenet, "classifier")}


def export(net: torch.nn.Module, size: int) -> ir.Model:
    batch = torch.export.Dim("batch")
    example = (torch.randn(2, 3, size, size),)
    return prepare_for_pruning(sg.from_torch(net, example, {"x": {0: batch}}))


def prune_with_torch_pruning(
    net: torch.nn.Module, head: str, ratio: float, size: int
) -> torch.nn.Module:
    import torch_pruning as tp

    pruned = copy.deepcopy(net)
    pruner = tp.pruner.MetaPruner(
        pruned,
        torch.randn(1, 3, size, size),
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=[getattr(pruned, head)],
    )
    pruner.step()
    return pruned.eval()


def macs(model: ir.Model) -> int:
    return sum(analysis.model_macs(model, {"batch": 1}).values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=None, help="architectures to run")
    parser.add_argument("--round-to", dest="round_to", type=int, default=None,
                        help="also time ours with this round_to (kept channels multiple of N)")
    parser.add_argument("--int8", action="store_true",
                        help="add both 0.5-pruned models after sg.quantize (static, 16 samples)")
    args = parser.parse_args()
    import torch_pruning as tp_package

    print(f"torch {torch.__version__}, torch-pruning {tp_package.__version__}, input "
          f"3x{args.size}x{args.size}, onnxruntime 'all', rounds {args.rounds}")  # fmt: skip
    rows, verdicts = [], []
    for name, (net, head) in architectures().items():
        if args.models and name not in args.models:
            continue
        base = export(net, args.size)
        models, labels = [base], ["unpruned"]
        for ratio in RATIOS:
            models.append(sg.prune(base, ratio=ratio))
            labels.append(f"ours {ratio}")
            models.append(export(prune_with_torch_pruning(net, head, ratio, args.size), args.size))
            labels.append(f"torch-pruning {ratio}")
        if args.round_to:
            for ratio in RATIOS:
                models.append(sg.prune(base, ratio=ratio, round_to=args.round_to))
                labels.append(f"ours {ratio} round_to {args.round_to}")
        if args.int8:
            calibration = {"x": np.random.default_rng(1).standard_normal(
                (16, 3, args.size, args.size)).astype(np.float32)}  # fmt: skip
            for k in (3, 4):  # the 0.5 models
                models.append(sg.quantize(models[k], calibration=calibration))
                labels.append(f"{labels[k]} + int8")
        latency: dict[int, list[float]] = {}
        for batch in BATCHES:
            feeds = {"x": np.random.default_rng(0).standard_normal(
                (batch, 3, args.size, args.size)).astype(np.float32)}  # fmt: skip
            result = benchmark(models, feeds, labels=labels, rounds=args.rounds,
                               threads=args.threads)  # fmt: skip
            latency[batch] = [t.ratio for t in result.timings]
        params = [analysis.parameter_count(m) for m in models]
        costs = [macs(m) for m in models]
        for i, label in enumerate(labels):
            rows.append([name, label, format_count(params[i]), f"{params[i] / params[0]:.3f}",
                         format_count(costs[i]), f"{costs[i] / costs[0]:.3f}",
                         f"{latency[1][i]:.3f}", f"{latency[8][i]:.3f}"])  # fmt: skip
        for k, ratio in enumerate(RATIOS):
            ours, theirs = 1 + 2 * k, 2 + 2 * k
            checks = [costs[ours] <= (1 + MARGIN) * costs[theirs]]
            checks += [latency[b][ours] <= (1 + MARGIN) * latency[b][theirs] for b in BATCHES]
            verdicts.append(
                f"{name} ratio {ratio}: MACs {costs[ours] / costs[theirs]:.3f}x of "
                f"torch-pruning's, latency {latency[1][ours] / latency[1][theirs]:.3f}x (batch 1) "
                f"{latency[8][ours] / latency[8][theirs]:.3f}x (batch 8): "
                f"{'PASS' if all(checks) else 'FAIL'}"
            )
    headers = ["model", "variant", "params", "ratio", "MACs", "ratio", "lat b1", "lat b8"]
    print(render_table(headers, rows, align="llrrrrrr"))
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
