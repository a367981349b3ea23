"""The training loop on modules that follow the lowered-model interface, on real digits data.

These tests exercise the loop itself (determinism, schemes, NaN, nothing to learn, BatchNorm in
train mode, history) with small hand-written modules; tests/tools/test_finetune*.py run it on
lowered ONNX graphs end to end.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import slimgraph as sg  # noqa: E402
from slimgraph.errors import BadOptionError  # noqa: E402
from slimgraph.runtime.metrics import LabelledData, load_data  # noqa: E402
from slimgraph.runtime.torch_backend._train import (  # noqa: E402
    ArrayBatches,
    EmaTeacher,
    ModuleTeacher,
    OrtTeacher,
    StreamBatches,
    Taps,
    TrainOptions,
    Validation,
    train,
)
from slimgraph.tools.demo_cmd import bundled  # noqa: E402


class TinyNet(nn.Module):
    """Conv-BN-ReLU, flatten, linear: the lowered-model interface by hand."""

    input_names = ["image"]
    output_names = ["logits", "features"]

    def __init__(self, width: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 64, 10)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.bn(self.conv(image)))
        return self.fc(features.flatten(1)), features


class NaNAt(TinyNet):
    """Outputs NaN from the given training step on."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.calls, self.step = 0, step

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = super().forward(image)
        if self.training:
            self.calls += 1
            if self.calls >= self.step:
                logits = logits * float("nan")
        return logits, features


@pytest.fixture(scope="module")
def digits() -> tuple[LabelledData, LabelledData]:
    model = sg.load(bundled("digits_cnn.onnx"))
    return (load_data(bundled("digits_train.npz"), model),
            load_data(bundled("digits_test.npz"), model))  # fmt: skip


def _subset(data: LabelledData, rows: int, labels: bool = True) -> LabelledData:
    return LabelledData({k: v[:rows] for k, v in data.feeds.items()},
                        data.labels[:rows] if labels and data.labels is not None else None,
                        data.source)  # fmt: skip


TAPS = Taps(("logits", "logits"))
FAST = TrainOptions(epochs=2, batch_size=64, lr=1e-2, progress=False)


def _weights(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def test_labels_alone_train_the_model_and_record_the_history(digits) -> None:  # noqa: ANN001
    train_data, test_data = digits
    student = TinyNet()
    mean_before = student.bn.running_mean.clone()
    seen = []
    history = train(student, ArrayBatches(train_data, 64), FAST, taps=TAPS,
                    validation=Validation(test_data, ["logits"]), on_epoch=seen.append)  # fmt: skip
    assert [r.epoch for r in history.records] == [0, 1, 2] and seen == history.records
    assert history.metric == "accuracy"
    before, after = history.records[0].val, history.records[-1].val
    assert before < 0.3 and after > 0.75, (before, after)
    assert history.records[0].loss is None and all(r.loss > 0 for r in history.records[1:])
    assert history.records[1].steps == 22  # 1347 rows: 21 batches of 64 and one of 3 rows
    assert not student.training  # left in eval mode
    assert not torch.equal(student.bn.running_mean, mean_before)  # BatchNorm trained in train mode


def test_same_seed_same_result_other_seed_other_result(digits) -> None:  # noqa: ANN001
    data = _subset(digits[0], 300)
    runs = []
    for seed in (3, 3, 4):
        student = TinyNet()
        train(student, ArrayBatches(data, 32), TrainOptions(epochs=1, lr=1e-2, seed=seed,
                                                            progress=False), taps=TAPS)  # fmt: skip
        runs.append(_weights(student))
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(np.array_equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_nan_loss_stops_naming_epoch_and_step(digits) -> None:  # noqa: ANN001
    data = _subset(digits[0], 300)
    with pytest.raises(BadOptionError) as caught:
        train(NaNAt(step=7), ArrayBatches(data, 64),
              TrainOptions(epochs=3, lr=1e-2, progress=False), taps=TAPS)  # fmt: skip
    # 300 rows at 64: 5 steps per epoch, so the 7th step is epoch 2, step 2
    assert str(caught.value) == ("training diverged: the loss is nan at epoch 2, step 2; nothing "
                                 "was written (try a lower learning rate than 0.01)")  # fmt: skip


def test_no_labels_and_no_teacher_is_nothing_to_learn_from(digits) -> None:  # noqa: ANN001
    data = _subset(digits[0], 100, labels=False)
    with pytest.raises(BadOptionError, match="^nothing to learn from: the data has no labels"):
        train(TinyNet(), ArrayBatches(data, 32), FAST, taps=TAPS)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (TrainOptions(epochs=-1), "epochs must be >= 0, got -1"),
        (TrainOptions(batch_size=0), "batch size must be >= 1, got 0"),
        (TrainOptions(lr=0.0), "learning rate must be > 0, got 0.0"),
        (TrainOptions(lr=float("nan")), "learning rate must be > 0, got nan"),
        (TrainOptions(optimizer="adam"), "unknown optimizer 'adam' (choose from adamw, sgd)"),
        (TrainOptions(alpha=1.5), "alpha must be in [0, 1], got 1.5"),
        (TrainOptions(temperature=0.0), "temperature must be > 0, got 0.0"),
        (TrainOptions(ema_decay=1.0), "ema decay must be in [0, 1), got 1.0"),
    ],
)
def test_impossible_options_are_refused(options, message, digits) -> None:  # noqa: ANN001
    with pytest.raises(BadOptionError) as caught:
        train(TinyNet(), ArrayBatches(_subset(digits[0], 64), 32), options, taps=TAPS)
    assert str(caught.value) == message


def test_offline_teacher_in_onnxruntime_without_labels_pulls_the_student_to_it(digits) -> None:  # noqa: ANN001
    train_data, test_data = digits
    teacher_model = sg.load(bundled("digits_cnn.onnx"))
    logits = teacher_model.graph.outputs[0].name
    teacher = OrtTeacher(teacher_model, [logits, "relu_2"])  # relu_2: block1's output [N,32,8,8]
    teacher.cache(train_data)
    assert teacher.cached is not None and teacher.cached["relu_2"].shape == (1347, 32, 8, 8)
    unlabelled = _subset(train_data, 1347, labels=False)
    reference = {"logits": np.concatenate(
        [teacher.run_numpy(f)[logits] for f, _ in test_data.batches(256)])}  # fmt: skip
    validation = Validation(_subset(test_data, 450, labels=False), ["logits"], reference)
    student = TinyNet()
    history = train(student, ArrayBatches(unlabelled, 64), FAST,
                    taps=Taps(("logits", logits), (("features", "relu_2"),)),
                    kd=("response", "feature"), teacher=teacher, validation=validation)  # fmt: skip
    assert history.metric == "cosine"
    before, after = history.records[0].val, history.records[-1].val
    assert after > before + 0.3 and after > 0.8, (before, after)


def test_cached_and_streamed_teacher_outputs_agree(digits) -> None:  # noqa: ANN001
    data = _subset(digits[0], 100)
    model = sg.load(bundled("digits_cnn.onnx"))
    name = model.graph.outputs[0].name
    cached, live = OrtTeacher(model, [name]), OrtTeacher(model, [name])
    cached.cache(data)
    batch = next(ArrayBatches(data, 32).epoch(np.random.default_rng(0)))
    np.testing.assert_allclose(cached.outputs(batch)[name].numpy(),
                               live.outputs(batch._replace(rows=None))[name].numpy(),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_online_scheme_trains_both_peers(digits) -> None:  # noqa: ANN001
    data = _subset(digits[0], 256)
    student, peer = TinyNet(seed=0), TinyNet(width=16, seed=1)
    student_before, peer_before = _weights(student), _weights(peer)
    train(student, ArrayBatches(data, 64), FAST, taps=TAPS, teacher=ModuleTeacher(peer))
    assert not np.array_equal(_weights(student)["fc.weight"], student_before["fc.weight"])
    assert not np.array_equal(_weights(peer)["fc.weight"], peer_before["fc.weight"])
    assert not peer.training


def test_self_scheme_teacher_is_the_moving_average(digits) -> None:  # noqa: ANN001
    data = _subset(digits[0], 256)
    student = TinyNet()
    start = _weights(student)
    ema = EmaTeacher(student, decay=0.9)
    train(student, ArrayBatches(data, 64), TrainOptions(epochs=1, lr=1e-2, progress=False),
          taps=TAPS, teacher=ema)  # fmt: skip
    end, average = _weights(student), _weights(ema.module)
    # the average lies between where the student started and where it ended, closer to the end
    w0, w1, wa = start["fc.weight"], end["fc.weight"], average["fc.weight"]
    assert np.abs(wa - w1).mean() < np.abs(w0 - w1).mean()
    assert not np.array_equal(wa, w1) and not np.array_equal(wa, w0)
    np.testing.assert_array_equal(average["bn.running_mean"], end["bn.running_mean"])
    assert all(not p.requires_grad for p in ema.module.parameters())


def test_streamed_feed_dicts_are_checked_and_used_in_order(digits) -> None:  # noqa: ANN001
    model = sg.load(bundled("digits_cnn.onnx"))
    data = _subset(digits[0], 128)
    items = [{"image": data.feeds["image"][i : i + 32], "labels": data.labels[i : i + 32]}
             for i in range(0, 128, 32)]  # fmt: skip
    history = train(TinyNet(), StreamBatches(items, model, "labels"), FAST, taps=TAPS)
    assert history.records[1].steps == 4
    bad = [{"image": data.feeds["image"][:4].astype(np.int32)}]
    with pytest.raises(sg.BadDataError, match="^data batch 0: 'image' is int32"):
        StreamBatches(bad, model, "labels")
