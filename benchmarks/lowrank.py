"""Low-rank factorization side by side: parameters, MACs, latency ratio and output cosine.

Two models, each timed with its factorized variants in one `slimgraph.runtime.benchmark` run
(interleaved shuffled rounds, medians, ratio to the original):
- a BERT-style encoder (tests/models.BertStyleEncoder: hidden 384, 6 layers, 6 heads, ffn 1536;
  batch 8, sequence 128), factorizing the feed-forward layers (fc1, fc2) only;
- a ResNet-18-style CNN (tests/models.resnet18_style, 1x3x64x64), factorizing its 3x3 convs by
  Tucker-2 (1x1 convs are left alone).
Variants: rank ratio 0.25 and 0.5, `--rank auto` alone, and auto gating each ratio.

Then a per-layer check of `--rank auto`: every distinct layer auto factorized is rebuilt as a
one-layer model with the same weight and input shape, and timed against its original (a reading
above the margin is re-measured with twice the rounds before it counts as slower). Verdict:
PASS when no auto model and no auto layer is slower than its original by more than the noise
margin (3%).

Baseline: the torch export (`slimgraph.from_torch`, dynamo, exporter optimizer off) with its
computed weights folded to initializers (what `factorize` does first), so the original and the
factorized models differ only by the factorization. onnxruntime optimization level "all".
Weights are random (seeded): their singular values are flat, so the cosine at a given rank is a
pessimistic figure; trained weights have decaying spectra.

Usage:
    python benchmarks/lowrank.py [--rounds 20] [--threads 1] [--models encoder cnn]
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
import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402
import torch  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

import slimgraph as sg  # noqa: E402
from slimgraph._tables import format_count, render_table  # noqa: E402
from slimgraph.ir import analysis  # noqa: E402
from slimgraph.passes.lowrank import FactorizeReport, fold_weights  # noqa: E402
from slimgraph.runtime import benchmark, compare  # noqa: E402
from tests import models as test_models  # noqa: E402

NOISE_MARGIN = 0.03
RATIOS = (0.25, 0.5)


def encoder() -> tuple[ir.Model, dict[str, np.ndarray], dict[str, object]]:
    torch.manual_seed(0)
    net = test_models.BertStyleEncoder(
        vocab=1000, dim=384, heads=6, hidden=1536, layers=6, max_len=128
    ).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (8, 128), generator=generator)
    mask = torch.ones(8, 128, dtype=torch.int64)
    mask[:, 100:] = 0
    model = sg.from_torch(net, (ids, mask))
    feeds = {model.graph.inputs[0].name: ids.numpy(), model.graph.inputs[1].name: mask.numpy()}
    return model, feeds, {"include": ["*fc1", "*fc2"], "op_types": ["MatMul", "Gemm"]}


def cnn() -> tuple[ir.Model, dict[str, np.ndarray], dict[str, object]]:
    torch.manual_seed(0)
    net = test_models._randomize_batchnorm(test_models.resnet18_style()).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model = sg.from_torch(net, (x,))
    return model, {model.graph.inputs[0].name: x.numpy()}, {"op_types": ["Conv"]}


MODELS = {"encoder": encoder, "cnn": cnn}


def variants() -> list[tuple[str, dict[str, object]]]:
    found: list[tuple[str, dict[str, object]]] = []
    for ratio in RATIOS:
        found.append((f"ratio {ratio}", {"rank_ratio": ratio}))
    found.append(("auto", {"rank": "auto"}))
    for ratio in RATIOS:
        found.append((f"auto + ratio {ratio}", {"rank": "auto", "rank_ratio": ratio}))
    return found


def _count(value: int | None) -> str:
    return "?" if value is None else format_count(value)


def run_model(name: str, rounds: int, threads: int) -> tuple[list[list[object]], bool]:
    print(f"\n== {name}: exporting and factorizing", flush=True)
    model, feeds, selection = MODELS[name]()
    baseline = model.clone()
    fold_weights(baseline)
    candidates: list[tuple[str, ir.Model, FactorizeReport]] = []
    for label, options in variants():
        start = time.perf_counter()
        small, report = sg.factorize_with_report(model, **selection, **options)  # type: ignore[arg-type]
        print(f"   {label}: {len(report.layers)} layers factorized, "
              f"{len(report.skipped)} skipped ({time.perf_counter() - start:.1f} s)", flush=True)  # fmt: skip
        candidates.append((label, small, report))
    # variants that produce the very same model (auto gating let every layer through) are
    # timed once: timing copies would only show the noise between identical models
    unique: dict[bytes, int] = {}
    timed_index: list[int] = []
    distinct: list[tuple[str, ir.Model]] = []
    for label, small, _ in candidates:
        key = ir.to_proto(small).SerializeToString(deterministic=True)
        if key not in unique:
            unique[key] = len(distinct)
            distinct.append((label, small))
        timed_index.append(unique[key])
    print(f"   timing {1 + len(distinct)} distinct models side by side ({rounds} rounds)...",
          flush=True)  # fmt: skip
    timing = benchmark(
        [baseline, *(small for _, small in distinct)],
        feeds,
        labels=["original", *(label for label, _ in distinct)],
        rounds=rounds,
        threads=threads,
    )
    params0 = analysis.parameter_count(baseline)
    macs0 = sum(analysis.model_macs(baseline).values())
    rows: list[list[object]] = [
        [name, "original", "-", _count(params0), _count(macs0), "1.00x", f"{timing.timings[0].median_ms:.1f}", 1.0, ""]
    ]  # fmt: skip
    all_ok = True
    for (label, small, report), index in zip(candidates, timed_index, strict=True):
        timed = timing.timings[1 + index]
        cosine = compare(baseline, small, feeds, threads=threads).worst_cosine
        verdict = ""
        if label.startswith("auto"):
            ok = timed.ratio <= 1 + NOISE_MARGIN
            all_ok &= ok
            verdict = "ok" if ok else "SLOWER"
        if distinct[index][0] != label:
            verdict += f" (same model as {distinct[index][0]})"
        rows.append(
            [
                name,
                label,
                len(report.layers),
                f"{_count(report.params_after)} ({report.params_after / params0:.2f}x)",
                f"{_count(report.macs_after)} ({(report.macs_after or 0) / macs0:.2f}x)",
                f"{timed.ratio:.2f}x",
                f"{timed.median_ms:.1f}",
                round(cosine, 4),
                verdict,
            ]
        )
    layer_ok = check_auto_layers(name, baseline, candidates, rounds, threads)
    return rows, all_ok and layer_ok


def _one_layer(node: ir.Node, twin: ir.Node) -> ir.Model | None:
    """`node` alone with its weight (and bias), fed by a random input of its static shape."""
    source = analysis.static_shape(twin.inputs[0])
    if source is None:
        return None
    inputs = ["x"]
    initializers = []
    for index, value in enumerate(node.inputs[1:], start=1):
        if value is None or value.const_value is None:
            return None
        name = f"p{index}"
        inputs.append(name)
        initializers.append(numpy_helper.from_array(value.const_value.numpy(), name))
    attributes = {key: attr.value for key, attr in node.attributes.items()}
    proto_node = helper.make_node(node.op_type, inputs, ["y"], name="layer", **attributes)
    graph = helper.make_graph(
        [proto_node], "layer",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(source))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        initializers,
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    proto.ir_version = 10
    return ir.from_proto(proto)


def check_auto_layers(
    name: str,
    baseline: ir.Model,
    candidates: list[tuple[str, ir.Model, FactorizeReport]],
    rounds: int,
    threads: int,
) -> bool:
    """Time every distinct layer that an auto variant factorized against its original."""
    shaped = list(analysis.with_static_shapes(baseline).graph)
    nodes = {node.name: (node, twin) for node, twin in zip(baseline.graph, shaped, strict=True)}
    seen: dict[tuple[object, ...], tuple[str, str, dict[str, object]]] = {}
    for label, _, report in candidates:
        if not label.startswith("auto"):
            continue
        options = dict(next(o for lab, o in variants() if lab == label))
        for layer in report.layers:
            twin = nodes[layer.node][1]
            key = (layer.op_type, layer.shape, analysis.static_shape(twin.inputs[0]), layer.rank)
            seen.setdefault(key, (layer.node, label, options))
    if not seen:
        print("   auto factorized no layer: nothing can be slower")
        return True
    print(f"   timing {len(seen)} distinct auto-factorized layers alone...", flush=True)
    rows = []
    ok = True
    for (op, shape, source, _), (node_name, label, options) in seen.items():
        node, twin = nodes[node_name]
        single = _one_layer(node, twin)
        if single is None or source is None:
            continue
        small, report = sg.factorize_with_report(single, **options)  # type: ignore[arg-type]
        if not report.layers:
            continue
        (layer,) = report.layers
        feeds = {"x": np.random.default_rng(0).standard_normal(source).astype(np.float32)}
        timed = benchmark([single, small], feeds, labels=["original", "factorized"],
                          rounds=rounds, threads=threads).timings[1]  # fmt: skip
        note = ""
        if timed.ratio > 1 + NOISE_MARGIN:  # confirm a slow reading before calling it slower
            first = timed.ratio
            timed = benchmark([single, small], feeds, labels=["original", "factorized"],
                              rounds=2 * rounds, threads=threads, seed=1).timings[1]  # fmt: skip
            note = f" (re-measured; first {first:.2f}x)"
        good = timed.ratio <= 1 + NOISE_MARGIN
        ok &= good
        rows.append([name, node_name, label, op, "x".join(map(str, shape)),
                     "x".join(map(str, source)), "/".join(map(str, layer.rank)),
                     f"{(layer.macs_after or 0) / (layer.macs_before or 1):.2f}x",
                     f"{timed.ratio:.2f}x", ("ok" if good else "SLOWER") + note])  # fmt: skip
    print(render_table(
        ["model", "node", "variant", "op", "weight", "input", "rank", "MACs", "latency", ""], rows
    ))  # fmt: skip
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    args = parser.parse_args()
    rows: list[list[object]] = []
    ok = True
    for name in args.models:
        model_rows, model_ok = run_model(name, args.rounds, args.threads)
        rows += model_rows
        ok &= model_ok
    print()
    print(render_table(
        ["model", "variant", "layers", "parameters", "MACs", "latency", "median ms", "cosine", "auto"],
        rows,
    ))  # fmt: skip
    print(f"\nthreads={args.threads}, rounds={args.rounds}, onnxruntime optimization 'all'; "
          f"latency = median ratio to the original measured in the same rounds")  # fmt: skip
    print("verdict:", "PASS (auto never slower)" if ok else "FAIL (an auto model or layer is slower)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
