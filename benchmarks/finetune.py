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

With --recovery it prints instead the accuracy-recovery figures of issue 13 on the held-out
digits split: prune 0.5 + 10 epochs of KD, low-rank (rank ratio 0.25) + 10 epochs of KD, PTQ int8
against PTQ + 3 epochs of QAT (accuracy, op multiset, latency side by side with
`slimgraph.runtime.benchmark`, target: QAT at most 5% slower than PTQ), and the
DigitsTransformer of tests/models.py (trained here) with its MLP pruned 0.5, recovered with
feature + response KD.

With --holdout it runs issue 24's comparison on four CNNs no test uses (benchmarks/holdout_cnns.py:
a ResNet with BatchNorm, a MobileNetV2-style net with depthwise convolutions, a VGG whose BatchNorm
torch folded before export, ResNet-50-style bottlenecks exported by torch.onnx with optimize=True,
which folds BatchNorm): prune 0.5 + KD, low-rank 0.25 + KD and QAT from PTQ with slimgraph's
default options, 10 epochs, against Torch-Pruning + a plain torch cross-entropy loop (AdamW 1e-3,
batch 64), then the evidence for the defaults (each fix switched off in turn). Teachers are
trained once by a plain torch loop and kept in --cache.

With --encoder it distils a MiniLM-sized BERT encoder (BertConfig hidden 384, 6 layers, 12 heads,
FFN 1536, seeded random weights, bytewise token ids from /usr/share/common-licenses, 32 tokens a
row) after pruning its FFN 0.5, on unlabelled rows: feature KD on the last hidden state with the
cosine loss, defaults otherwise; it prints the mean-pooled embedding cosine to the teacher on
held-out rows (target >= 0.98).

Usage:
    python benchmarks/finetune.py [--epochs 10] [--repeats 2] [--lr 3e-3] [--threads N]
    python benchmarks/finetune.py --recovery [--rounds 50]
    python benchmarks/finetune.py --holdout [--models resnet,vgg] [--cache DIR] [--no-ablation]
    python benchmarks/finetune.py --encoder [--encoder-rows 1024] [--epochs 5]
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
sys.path[0] = str(ROOT)  # not this folder: its transformers.py would shadow the package

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import slimgraph as sg  # noqa: E402
from slimgraph._tables import render_table  # noqa: E402
from slimgraph.runtime.metrics import evaluate, load_data  # noqa: E402

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


def _ops(model: object) -> dict[str, int]:
    import collections

    return dict(collections.Counter(f"{n.domain}::{n.op_type}"
                                    for n in model.graph.all_nodes()))  # type: ignore[attr-defined]


def _train_transformer() -> object:
    from tests.models import DigitsTransformer

    with np.load(DATA / "digits_train.npz") as archive:
        images, labels = torch.from_numpy(archive["image"]), torch.from_numpy(archive["labels"])
    torch.manual_seed(0)
    net = DigitsTransformer()
    epochs, steps = 30, -(-len(images) // 64)
    optimizer = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * steps)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(images))
        for start in range(0, len(images), 64):
            index = order[start:start + 64]
            loss = F.cross_entropy(net(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()
    return sg.from_torch(net, (images[:2],),
                         dynamic_shapes={"image": {0: torch.export.Dim("batch")}})  # fmt: skip


def recovery(rounds: int) -> None:
    """Issue 13's accuracy-recovery figures, one table."""
    model = sg.load(DATA / "digits_cnn.onnx")
    train, test_path = DATA / "digits_train.npz", DATA / "digits_test.npz"

    def acc(m: object) -> float:
        return evaluate(m, load_data(test_path, m)).accuracy or 0.0  # type: ignore[arg-type]

    base = acc(model)
    rows = []
    pruned = sg.prune(model, ratio=0.5)
    recovered = sg.finetune(pruned, train, teacher=model, epochs=10, lr=3e-3, progress=False)
    rows.append(["digits CNN, prune 0.5 + 10 ep. KD", base, acc(pruned), acc(recovered),
                 acc(recovered) >= base - 0.01])  # fmt: skip
    print(rows[-1], flush=True)
    low = sg.factorize(model, rank_ratio=0.25)
    recovered = sg.finetune(low, train, teacher=model, epochs=10, lr=1e-2, batch_size=32,
                            alpha=0.2, progress=False)  # fmt: skip
    rows.append(["digits CNN, low-rank 0.25 + 10 ep. KD", base, acc(low), acc(recovered),
                 acc(recovered) >= base - 0.01])  # fmt: skip
    print(rows[-1], flush=True)
    ptq = sg.quantize(model, calibration=DATA / "digits_calib.npz", progress=False)
    qat = sg.finetune(ptq, train, teacher=model, epochs=3, lr=1e-4, progress=False)
    same_ops = _ops(qat) == _ops(ptq)
    rows.append(["digits CNN, PTQ int8 -> + 3 ep. QAT", base, acc(ptq), acc(qat),
                 acc(qat) >= acc(ptq) and same_ops])  # fmt: skip
    print(rows[-1], flush=True)
    transformer = _train_transformer()
    t_base = acc(transformer)
    attention = ["layers.*.query", "layers.*.key", "layers.*.value", "layers.*.out", "embed",
                 "head"]  # fmt: skip
    t_pruned = sg.prune(transformer, ratio=0.5, exclude=attention)  # type: ignore[arg-type]
    t_recovered = sg.finetune(
        t_pruned, train, teacher=transformer, kd=("response", "feature"),
        feature_layers=["layers.0.fc1", "layers.1.fc1", "layers.0", "layers.1"], epochs=10,
        lr=1e-3, progress=False,
    )  # fmt: skip
    rows.append(["DigitsTransformer, MLP pruned 0.5 + 10 ep. KD", t_base, acc(t_pruned),
                 acc(t_recovered), acc(t_recovered) >= t_base - 0.01])  # fmt: skip
    print()
    print(render_table(["case", "reference", "compressed", "recovered", "target"],
                       [[r[0], f"{r[1]:.2%}", f"{r[2]:.2%}", f"{r[3]:.2%}",
                         "PASS" if r[4] else "FAIL"] for r in rows], align="lrrrl"))  # fmt: skip
    print("(reference: the uncompressed model, or for QAT the PTQ model's accuracy in "
          "'compressed'; targets: within 1 point of the reference, QAT >= PTQ with the same op "
          f"multiset: {same_ops})")
    with np.load(test_path) as archive:
        images = archive["image"]
    for batch in (1, len(images)):
        result = sg.benchmark([ptq, qat], {"image": images[:batch]}, labels=["PTQ", "QAT"],
                              rounds=rounds)  # fmt: skip
        ratio = result.timings[1].ratio
        print(f"latency batch {batch}: PTQ {result.timings[0].median_ms:.3f} ms, QAT "
              f"{result.timings[1].median_ms:.3f} ms, QAT/PTQ {ratio:.3f}x (target: at most 5% "
              f"slower, <= 1.05x): {'PASS' if ratio <= 1.05 else 'FAIL'}")


def encoder(rows: int, epochs: int) -> bool:
    """Issue 24's encoder figure: prune a MiniLM-sized BERT's FFN 0.5, distil it on unlabelled
    rows (cosine on the last hidden state), compare mean-pooled embeddings on held-out rows."""
    import glob
    import tempfile

    import transformers as hf

    seq, held_rows = 32, 256
    text = b"".join(Path(p).read_bytes() for p in sorted(glob.glob("/usr/share/common-licenses/*"))
                    if Path(p).is_file())  # fmt: skip
    ids = np.frombuffer(text[: len(text) // seq * seq], dtype=np.uint8).astype(np.int64) + 3
    ids = ids.reshape(-1, seq)[np.random.default_rng(0).permutation(len(text) // seq)]
    if len(ids) < rows + held_rows:
        raise SystemExit(f"only {len(ids)} rows of text, {rows + held_rows} wanted")
    train, held = ids[:rows], ids[-held_rows:]
    torch.manual_seed(0)
    config = hf.BertConfig(vocab_size=259, hidden_size=384, num_hidden_layers=6,
                           num_attention_heads=12, intermediate_size=1536,
                           max_position_embeddings=64)  # fmt: skip
    net = hf.BertModel(config, add_pooling_layer=False).eval()
    batch = torch.export.Dim("batch")
    model = sg.from_torch(net, (torch.from_numpy(train[:2]), torch.ones(2, seq, dtype=torch.int64)),
                          input_names=["input_ids", "attention_mask"],
                          dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}})
    pruned = sg.prune(model, ratio=0.5)
    hidden = model.graph.outputs[0].name

    def embeddings(m: object, x: np.ndarray) -> np.ndarray:
        session = sg.runtime.create_session(m)
        out = sg.runtime.run(session, {"input_ids": x, "attention_mask": np.ones_like(x)})
        return out[hidden].mean(axis=1)

    def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    with tempfile.TemporaryDirectory() as folder:
        train_path, val_path = Path(folder) / "rows.npz", Path(folder) / "val.npz"
        np.savez(train_path, input_ids=train, attention_mask=np.ones_like(train))
        np.savez(val_path, input_ids=held[:64], attention_mask=np.ones_like(held[:64]))
        start = time.perf_counter()
        student, report = sg.finetune_with_report(
            pruned, train_path, teacher=model, kd=("feature",), feature_layers=[hidden],
            feature_loss="cosine", epochs=epochs, val=val_path, progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    teacher = embeddings(model, held[64:])
    before = cosine(embeddings(pruned, held[64:]), teacher)
    after = cosine(embeddings(student, held[64:]), teacher)
    params = [sum(v.const_value.size for v in m.graph.initializers.values()
                  if v.const_value is not None) for m in (model, pruned)]  # fmt: skip
    print(report)
    print(f"MiniLM-sized BERT (seeded random weights), FFN pruned 0.5: {params[0]:,} -> "
          f"{params[1]:,} parameters; {rows} unlabelled rows x {seq} tokens, {epochs} epochs, "
          f"{seconds:.0f} s")
    ok = float(after.mean()) >= 0.98
    print(f"held-out rows ({len(after)}): mean-pooled embedding cosine to the teacher, pruned "
          f"{before.mean():.4f} (min {before.min():.4f}) -> distilled {after.mean():.4f} (min "
          f"{after.min():.4f}); target mean >= 0.98: {'PASS' if ok else 'FAIL'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--recovery", action="store_true",
                        help="print issue 13's accuracy-recovery figures instead")
    parser.add_argument("--rounds", type=int, default=50, help="latency rounds (--recovery)")
    parser.add_argument("--holdout", action="store_true",
                        help="print issue 24's held-out CNN comparison instead")
    parser.add_argument("--models", default="resnet,mobilenet,vgg,bottleneck",
                        help="held-out CNNs (--holdout)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/slimgraph-holdout"),
                        help="where the held-out teachers and data are kept (--holdout)")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false",
                        help="skip the evidence runs (--holdout)")
    parser.add_argument("--encoder", action="store_true",
                        help="print issue 24's encoder-distillation figure instead")
    parser.add_argument("--encoder-rows", dest="encoder_rows", type=int, default=1024,
                        help="unlabelled training rows (--encoder)")
    args = parser.parse_args()
    if args.encoder:
        raise SystemExit(0 if encoder(args.encoder_rows, args.epochs) else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.recovery:
        recovery(args.rounds)
        return
    if args.holdout:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from holdout_cnns import run_holdout

        ok = run_holdout(args.models.split(","), args.cache, ablation=args.ablation)
        raise SystemExit(0 if ok else 1)
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
