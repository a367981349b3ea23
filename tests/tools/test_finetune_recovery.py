"""Accuracy recovery on real data (issue 13's "Done when"), held-out digits split, slow.

- prune 0.5, then 10 epochs of distillation from the unpruned model: within 1 point;
- low-rank at rank ratio 0.25 (every conv and the classifier), then 10 epochs: within 1 point;
- PTQ int8, then 3 epochs of QAT: accuracy >= PTQ's, same QDQ op multiset;
- a transformer classifier (digits rows as 8 tokens, 2 encoder layers) with its MLP pruned 0.5:
  within 1 point with feature + response KD.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import slimgraph as sg  # noqa: E402
from slimgraph.runtime.metrics import evaluate, load_data  # noqa: E402
from tests.kit.data import DIGITS  # noqa: E402
from tests.models import DigitsTransformer  # noqa: E402

pytestmark = pytest.mark.slow

TRAIN = DIGITS.with_name("digits_train.npz")
TEST = DIGITS.with_name("digits_test.npz")
CALIB = DIGITS.with_name("digits_calib.npz")
POINT = 0.01


def _accuracy(model) -> float:  # noqa: ANN001
    return evaluate(model, load_data(TEST, model)).accuracy


def _ops(model) -> collections.Counter[str]:  # noqa: ANN001
    return collections.Counter(f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes())


@pytest.fixture(scope="module")
def digits_cnn():  # noqa: ANN201
    model = sg.load(DIGITS)
    return model, _accuracy(model)


def test_prune_half_then_distil_10_epochs_is_within_a_point(digits_cnn) -> None:  # noqa: ANN001
    model, unpruned = digits_cnn
    pruned = sg.prune(model, ratio=0.5)
    assert _accuracy(pruned) < 0.5  # collapsed
    recovered = sg.finetune(pruned, TRAIN, teacher=model, epochs=10, lr=3e-3, progress=False)
    assert _accuracy(recovered) >= unpruned - POINT
    assert _ops(recovered) == _ops(pruned)


def test_low_rank_quarter_then_distil_10_epochs_is_within_a_point(digits_cnn) -> None:  # noqa: ANN001
    model, unpruned = digits_cnn
    factorized = sg.factorize(model, rank_ratio=0.25)
    assert _accuracy(factorized) < 0.5
    recovered = sg.finetune(factorized, TRAIN, teacher=model, epochs=10, lr=1e-2, batch_size=32,
                            alpha=0.2, progress=False)  # fmt: skip
    assert _accuracy(recovered) >= unpruned - POINT
    assert _ops(recovered) == _ops(factorized)


def test_ptq_then_3_epochs_of_qat_is_at_least_as_accurate(digits_cnn) -> None:  # noqa: ANN001
    model, _ = digits_cnn
    ptq = sg.quantize(model, calibration=CALIB, progress=False)
    qat = sg.finetune(ptq, TRAIN, teacher=model, epochs=3, lr=1e-4, progress=False)
    assert _accuracy(qat) >= _accuracy(ptq)
    assert _ops(qat) == _ops(ptq)
    for name, value in qat.graph.initializers.items():
        assert value.dtype == ptq.graph.initializers[name].dtype
        assert value.shape == ptq.graph.initializers[name].shape


@pytest.fixture(scope="module")
def transformer():  # noqa: ANN201
    """DigitsTransformer trained on the digits training split (about 98% held out)."""
    with np.load(TRAIN) as archive:
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
            index = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(net(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()
    return sg.from_torch(net, (images[:2],),
                         dynamic_shapes={"image": {0: torch.export.Dim("batch")}})  # fmt: skip


def test_transformer_mlp_pruned_half_recovers_with_feature_and_response_kd(transformer) -> None:  # noqa: ANN001
    model = transformer
    unpruned = _accuracy(model)
    assert unpruned > 0.95
    attention = ["layers.*.query", "layers.*.key", "layers.*.value", "layers.*.out", "embed",
                 "head"]  # fmt: skip
    pruned, report = sg.prune_with_report(model, ratio=0.5, exclude=attention)
    hidden = {layer.layer: layer.after for layer in report.layers if layer.layer.endswith("fc1")}
    assert hidden == {"layers.0.fc1": 32, "layers.1.fc1": 32}  # the MLPs lost half their units
    recovered, result = sg.finetune_with_report(
        pruned, TRAIN, teacher=model, kd=("response", "feature"),
        feature_layers=["layers.0.fc1", "layers.1.fc1", "layers.0", "layers.1"], epochs=10,
        lr=1e-3, progress=False,
    )  # fmt: skip
    assert len(result.features) == 4
    assert _accuracy(recovered) >= unpruned - POINT
    assert _accuracy(recovered) >= _accuracy(pruned)
