"""Prune + recover side by side: slimgraph (ONNX graph) against Torch-Pruning + a torch loop.

Same model, same data, same epochs and the same recipe on both sides:

- model: the bundled digits CNN (slimgraph/data/digits_cnn.onnx). The torch side rebuilds
  `DigitsCNN` from examples/train_digits_cnn.py and loads the bundled weights by name (checked
  against onnxruntime before anything else).
- pruning, ratio 0.5, L1 magnitude, classifier kept: slimgraph `sg.prune(model, ratio=0.5)` on the
  ONNX graph; Torch-Pruning (`pip install --no-deps torch-pruning`) `MetaPruner` with
  `GroupMagnitudeImportance(p=1)` on the torch module.
- recovery: response distillation from the unpruned model (KL at T=4 times T^2, mixed 0.5 / 0.5
  with the label cross-entropy), AdamW (lr 3e-3, weight decay 1e-4 on weights with 2+ axes),
  cosine decay to 0, batch 64, 10 epochs, on slimgraph/data/digits_train.npz (1347 rows);
  slimgraph: `sg.finetune(pruned, train, teacher=model)`; torch: a plain loop written here. Both
  compute the teacher's logits once for the training rows (slimgraph does so by itself; the torch
  loop is given the same favour).
- accuracy: top-1 on the held-out digits_test.npz (450 rows), the slimgraph model on onnxruntime,
  the torch model in eval mode.

Runs alternate (slimgraph, torch, slimgraph, torch, ...) `--repeats` times with seeds 0, 1, ...;
seconds per epoch are the medians over all epochs of all runs of a side (training only: no
validation, no lowering or teacher set-up). The machine may be shared: the ratio is what counts.

Targets (issue 13): slimgraph accuracy >= Torch-Pruning's - 0.5 points (mean over repeats) and
slimgraph seconds per epoch <= 1.5x torch's. Prints PASS/FAIL for each.

Usage:
    python benchmarks/finetune.py [--epochs 10] [--repeats 2] [--lr 3e-3] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import slimgraph as sg  # noqa: E402
from slimgraph.runtime.metrics import evaluate, load_data  # noqa: E402
from slimgraph.tools.tables import render_table  # noqa: E402

DATA = ROOT / "slimgraph" / "data"
ACCURACY_MARGIN = 0.005  # 0.5 points
TIME_RATIO = 1.5


def digits_cnn() -> torch.nn.Module:
    """examples/train_digits_cnn.DigitsCNN with the bundled ONNX weights loaded by name."""
    spec = importlib.util.spec_from_file_location("train_digits_cnn",
                                                  ROOT / "examples" / "train_digits_cnn.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.DigitsCNN()
    onnx_model = sg.load(DATA / "digits_cnn.onnx")
    weights = {name: torch.from_numpy(value.const_value.numpy().copy())
               for name, value in onnx_model.graph.initializers.items()}  # fmt: skip
    state = net.state_dict()
    loaded = {k: weights[k] for k in state if k in weights}
    missing = [k for k in state if k not in weights and not k.endswith("num_batches_tracked")]
    if missing:
        raise SystemExit(f"bundled weights lack {missing}")
    net.load_state_dict(loaded, strict=False)
    return net.eval()


def torch_pruning(net: torch.nn.Module, ratio: float) -> torch.nn.Module:
    import torch_pruning as tp

    example = torch.zeros(1, 1, 8, 8)
    pruner = tp.pruner.MetaPruner(
        net, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=ratio, ignored_layers=[net.fc],
    )  # fmt: skip
    pruner.step()
    return net


def torch_loop(
    net: torch.nn.Module, teacher_logits: torch.Tensor, images: torch.Tensor,
    labels: torch.Tensor, *, epochs: int, batch_size: int, lr: float, seed: int,
) -> list[float]:
    """The same recipe as sg.finetune's defaults, by hand. Returns seconds per epoch."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 1e-4},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=lr)
    rows = len(images)
    full, rest = divmod(rows, batch_size)
    steps = full + (1 if rest > 1 else 0)
    total = epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    temperature, alpha = 4.0, 0.5
    seconds = []
    net.train()
    for _ in range(epochs):
        start = time.perf_counter()
        order = rng.permutation(rows)
        for step in range(steps):
            index = torch.from_numpy(np.sort(order[step * batch_size:(step + 1) * batch_size]))
            logits = net(images[index])
            t = teacher_logits[index]
            kd = F.kl_div(F.log_softmax(logits / temperature, -1),
                          F.log_softmax(t / temperature, -1), log_target=True,
                          reduction="batchmean") * temperature**2  # fmt: skip
            loss = alpha * kd + (1 - alpha) * F.cross_entropy(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        seconds.append(time.perf_counter() - start)
    net.eval()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import torch_pruning as tp

    model = sg.load(DATA / "digits_cnn.onnx")
    train_path, test_path = DATA / "digits_train.npz", DATA / "digits_test.npz"
    train, test = load_data(train_path, model), load_data(test_path, model)
    images, labels = torch.from_numpy(train.feeds["image"]), torch.from_numpy(train.labels)
    test_images = torch.from_numpy(test.feeds["image"])

    reference = digits_cnn()
    with torch.no_grad():
        ours = reference(test_images).numpy()
    onnx_logits = next(iter(sg.runtime.run(sg.runtime.create_session(model),
                                           {"image": test.feeds["image"]}).values()))
    np.testing.assert_allclose(ours, onnx_logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        teacher_logits = reference(images)
    unpruned = float((ours.argmax(1) == test.labels).mean())

    pruned_onnx = sg.prune(model, ratio=0.5)
    results: dict[str, dict[str, list[float]]] = {
        "slimgraph": {"accuracy": [], "seconds": [], "pruned": []},
        "torch-pruning": {"accuracy": [], "seconds": [], "pruned": []},
    }
    for seed in range(args.repeats):
        # slimgraph: prune the ONNX graph, distil, evaluate on onnxruntime
        start = time.perf_counter()
        recovered, report = sg.finetune_with_report(
            pruned_onnx, train_path, teacher=model, epochs=args.epochs, lr=args.lr,
            batch_size=args.batch_size, seed=seed, progress=False,
        )  # fmt: skip
        wall = time.perf_counter() - start
        side = results["slimgraph"]
        side["accuracy"].append(evaluate(recovered, test).accuracy or 0.0)
        side["pruned"].append(evaluate(pruned_onnx, test).accuracy or 0.0)
        assert report.history is not None
        side["seconds"] += [r.seconds for r in report.history.records if r.epoch > 0]
        print(f"slimgraph     seed {seed}: accuracy {side['accuracy'][-1]:.2%} "
              f"({wall:.1f} s with set-up)", flush=True)  # fmt: skip
        # Torch-Pruning: prune the torch module, plain loop, evaluate in eval mode
        net = torch_pruning(digits_cnn(), 0.5)
        with torch.no_grad():
            pruned_accuracy = float((net(test_images).argmax(1).numpy() == test.labels).mean())
        seconds = torch_loop(net, teacher_logits, images, labels, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, seed=seed)  # fmt: skip
        with torch.no_grad():
            accuracy = float((net(test_images).argmax(1).numpy() == test.labels).mean())
        side = results["torch-pruning"]
        side["accuracy"].append(accuracy)
        side["pruned"].append(pruned_accuracy)
        side["seconds"] += seconds
        print(f"torch-pruning seed {seed}: accuracy {accuracy:.2%}", flush=True)

    params_ours = sum(int(np.prod(v.shape)) for v in pruned_onnx.graph.initializers.values()
                      if v.dtype is not None and v.dtype.is_floating_point())  # fmt: skip
    params_tp = sum(p.numel() for p in net.parameters()) + sum(
        b.numel() for n, b in net.named_buffers() if "running" in n)
    rows = []
    for name, side in results.items():
        rows.append([name, params_ours if name == "slimgraph" else params_tp,
                     f"{np.mean(side['pruned']):.2%}", f"{np.mean(side['accuracy']):.2%}",
                     " ".join(f"{a:.2%}" for a in side["accuracy"]),
                     f"{np.median(side['seconds']):.3f}"])  # fmt: skip
    print()
    print(f"digits CNN, unpruned accuracy {unpruned:.2%}; prune 0.5 then {args.epochs} epochs of "
          f"response KD (batch {args.batch_size}, lr {args.lr}); torch threads "
          f"{torch.get_num_threads()}, Torch-Pruning {tp.__version__}")  # fmt: skip
    print(render_table(["", "parameters", "pruned acc", "recovered acc (mean)", "per seed",
                        "s/epoch (median)"], rows, align="lrrrrr"))  # fmt: skip
    ours, theirs = results["slimgraph"], results["torch-pruning"]
    gap = np.mean(ours["accuracy"]) - np.mean(theirs["accuracy"])
    ratio = np.median(ours["seconds"]) / np.median(theirs["seconds"])
    accuracy_ok = gap >= -ACCURACY_MARGIN
    time_ok = ratio <= TIME_RATIO
    print(f"accuracy: slimgraph - torch-pruning = {gap * 100:+.2f} points (target >= -0.5): "
          f"{'PASS' if accuracy_ok else 'FAIL'}")
    print(f"seconds per epoch: slimgraph / torch = {ratio:.2f}x (target <= {TIME_RATIO}x): "
          f"{'PASS' if time_ok else 'FAIL'}")


if __name__ == "__main__":
    main()
