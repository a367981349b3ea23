"""Recovery defaults: batch statistics for BatchNorm-folded convolutions (`_batchnorm`), the
learning-rate range test (`_lr_range`), the best epoch handed back, cosine feature KD."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import slimgraph as sg  # noqa: E402
from slimgraph.runtime.session import create_session, run  # noqa: E402
from slimgraph.runtime.torch_backend import lower, write_back  # noqa: E402
from slimgraph.runtime.torch_backend._batchnorm import fold_batchnorm, unfold_batchnorm  # noqa: E402
from slimgraph.runtime.torch_backend._losses import FeatureDistiller  # noqa: E402
from slimgraph.runtime.torch_backend._lr_range import HIGHEST, LOWEST, lr_range_test  # noqa: E402
from tests.kit.data import DIGITS  # noqa: E402

TRAIN = DIGITS.with_name("digits_train.npz")
TEST = DIGITS.with_name("digits_test.npz")


class FoldedNet(nn.Module):
    """Conv(+bias)-ReLU, depthwise Conv(+bias)-ReLU, GAP, linear: what a BN-folded export is."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.depthwise(F.relu(self.conv(image))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def folded() -> sg.ir.Model:
    return sg.from_torch(FoldedNet().eval(), (torch.zeros(2, 1, 8, 8),), input_names=["image"])


def _images(rows: int, seed: int = 0) -> np.ndarray:
    with np.load(TRAIN) as archive:
        return archive["image"][seed * rows : (seed + 1) * rows]


def _outputs(module: nn.Module, images: np.ndarray) -> np.ndarray:
    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(images))[0].numpy()


def test_unfolded_batchnorm_starts_as_identity_and_folds_back_exactly(folded) -> None:  # noqa: ANN001
    module = lower(folded)
    images = _images(64)
    before = _outputs(module, images)
    unfolded = unfold_batchnorm(module, folded, {"image": torch.from_numpy(images)})
    assert len(unfolded) == 2  # both convolutions; the Gemm is left alone
    np.testing.assert_allclose(_outputs(module, images), before, rtol=1e-4, atol=1e-5)
    # train a few steps with batch statistics: the eval-mode function moves
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module.train()
    for step in range(3):
        batch = torch.from_numpy(_images(32, seed=step + 1))
        loss = module(batch)[0].pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = _outputs(module, images)
    assert np.abs(trained - before).max() > 1e-3
    fold_batchnorm(module, unfolded)
    assert not any("unfolded" in name for name, _ in module.named_parameters())
    np.testing.assert_allclose(_outputs(module, images), trained, rtol=1e-4, atol=1e-5)
    # the graph keeps its structure and runs on onnxruntime as the module did
    model = write_back(folded, module)
    assert [n.op_type for n in model.graph] == [n.op_type for n in folded.graph]
    got = next(iter(run(create_session(model), {"image": images}).values()))
    np.testing.assert_allclose(got, trained, rtol=1e-4, atol=1e-5)


def test_finetune_trains_a_folded_graph_and_keeps_its_nodes(folded) -> None:  # noqa: ANN001
    with np.load(TRAIN) as archive:
        train = {"image": archive["image"][:128], "labels": archive["labels"][:128]}
    for scheme, unfolded in (("offline", 2), ("self", 0)):  # self: the EMA has no norms
        trained, report = sg.finetune_with_report(folded, train, epochs=1, lr=1e-2,
                                                  scheme=scheme, progress=False)  # fmt: skip
        assert report.history is not None and report.history.unfolded == unfolded
        assert [n.op_type for n in trained.graph] == [n.op_type for n in folded.graph]
        assert set(trained.graph.initializers) == set(folded.graph.initializers)


def test_convolutions_before_batchnorm_are_not_unfolded() -> None:
    model = sg.load(DIGITS)  # Conv -> BatchNormalization in the graph
    assert any(n.op_type == "BatchNormalization" for n in model.graph)
    module = lower(model)
    assert unfold_batchnorm(module, model, {"image": torch.from_numpy(_images(16))}) == []


def _quadratic(curvature: float) -> tuple[nn.Parameter, object]:
    weight = nn.Parameter(torch.ones(4))
    return weight, lambda: 0.5 * curvature * weight.pow(2).sum()


def test_range_test_restores_the_weights_and_adapts_to_curvature() -> None:
    picks = {}
    for curvature in (1.0, 100.0):
        weight, loss = _quadratic(curvature)
        holder = nn.Module()
        holder.weight = weight
        search = lr_range_test(loss, [holder], lambda lr, w=weight: torch.optim.SGD([w], lr=lr),
                               start=1e-5, stop=10.0, steps=40)  # fmt: skip
        assert torch.equal(weight.detach(), torch.ones(4))  # put back
        assert LOWEST <= search.lr <= HIGHEST
        assert search.lrs[-1] < 10.0  # stopped once the loss ran away
        picks[curvature] = search.lr
    # SGD on 0.5 c w^2 diverges above 2 / c: the sharper problem gets a lower rate
    assert picks[100.0] < picks[1.0]
    assert picks[100.0] < 2.0 / 100.0


def test_finetune_measures_its_learning_rate_and_reports_it() -> None:
    model = sg.prune(sg.load(DIGITS), ratio=0.5)
    with np.load(TRAIN) as archive:
        train = {"image": archive["image"][:256], "labels": archive["labels"][:256]}
    _, report = sg.finetune_with_report(model, train, epochs=1, progress=False)
    assert report.history is not None and report.history.lr_search is not None
    assert report.history.lr == report.history.lr_search.lr
    assert LOWEST <= report.history.lr <= HIGHEST
    assert f"learning rate {report.history.lr:.3g} (range test" in str(report)
    assert report.to_dict()["lr"] == report.history.lr


def test_a_run_that_only_makes_things_worse_hands_back_the_input() -> None:
    model = sg.load(DIGITS)
    with np.load(TRAIN) as archive:
        train = {"image": archive["image"][:128], "labels": archive["labels"][:128]}
    with np.load(TEST) as archive:
        val = {"image": archive["image"][:200], "labels": archive["labels"][:200]}
    # a rate far too high for a trained model: every epoch is worse than the input
    trained, report = sg.finetune_with_report(model, train, val=val, epochs=2, lr=0.5,
                                              optimizer="sgd", progress=False)  # fmt: skip
    assert report.history is not None
    records = report.history.records
    assert all(r.val < records[0].val for r in records[1:])
    assert report.history.kept == 0 and report.after == report.before
    for name, value in model.graph.initializers.items():
        assert trained.graph.initializers[name].const_value.tobytes() == \
            value.const_value.tobytes()  # fmt: skip
    assert "no epoch beat the input model, which is handed back unchanged" in str(report)


def test_the_best_epoch_is_kept_when_validation_falls_later() -> None:
    from slimgraph.runtime.torch_backend._train import EpochRecord, History, _BestKeeper

    module = nn.Linear(2, 2)
    history = History("accuracy", [EpochRecord(0, None, 0.5, 0.0, 0)])
    keeper = _BestKeeper(module, history)
    snapshots = {}
    for epoch, val in ((1, 0.7), (2, 0.9), (3, 0.8)):
        with torch.no_grad():
            module.weight.add_(1.0)
        snapshots[epoch] = module.weight.detach().clone()
        history.records.append(EpochRecord(epoch, 0.1, val, 0.0, 1))
        keeper.offer(history.records[-1])
    keeper.restore()
    assert history.kept == 2
    assert torch.equal(module.weight.detach(), snapshots[2])


def test_cosine_feature_loss_is_one_minus_cosine_over_channels() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    distiller = FeatureDistiller(["h"], [student.shape], [teacher.shape], cosine=True)
    want = (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    torch.testing.assert_close(distiller([student], [teacher]), want)
    scaled = distiller([student * 7.0], [teacher])  # scale-free: only directions count
    torch.testing.assert_close(scaled, want)


def _text_rows(rows: int, seq: int) -> np.ndarray:
    """Token ids from the licence texts every Debian system ships, bytewise (ids 3..258)."""
    from pathlib import Path

    text = b"".join(p.read_bytes() for p in sorted(Path("/usr/share/common-licenses").glob("*"))
                    if p.is_file())  # fmt: skip
    if len(text) < rows * seq:
        pytest.skip("too little text in /usr/share/common-licenses")
    ids = np.frombuffer(text[: rows * seq], dtype=np.uint8).astype(np.int64) + 3
    return ids.reshape(rows, seq)[np.random.default_rng(0).permutation(rows)]


def _mean_embeddings(model: sg.ir.Model, ids: np.ndarray) -> np.ndarray:
    out = run(create_session(model), {"input_ids": ids})
    return out[model.graph.outputs[0].name].mean(axis=1)  # [N, S, H] -> [N, H]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.slow
def test_encoder_distils_its_last_hidden_state_on_unlabelled_rows() -> None:
    """The documented recipe: prune a sentence encoder's FFN, then feature KD on the last hidden
    state with the cosine loss, no labels, no response KD."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=259, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=256,
                                     max_position_embeddings=32)  # fmt: skip
    net = transformers.BertModel(config, add_pooling_layer=False).eval()
    rows = _text_rows(448, 16)
    train, held = rows[:384], rows[384:]
    model = sg.from_torch(net, (torch.from_numpy(train[:2]),), input_names=["input_ids"],
                          dynamic_shapes={"input_ids": {0: torch.export.Dim("batch")}})  # fmt: skip
    pruned = sg.prune(model, ratio=0.5)  # the FFN's channels (heads stay)
    hidden = model.graph.outputs[0].name
    student, report = sg.finetune_with_report(
        pruned, {"input_ids": train}, teacher=model, kd=("feature",), feature_layers=[hidden],
        feature_loss="cosine", epochs=4, batch_size=32, val={"input_ids": held[:32]},
        progress=False,
    )  # fmt: skip
    assert report.features == [(hidden, hidden)] and report.metric == "cosine"
    teacher = _mean_embeddings(model, held[32:])
    before = _cosines(_mean_embeddings(pruned, held[32:]), teacher)
    after = _cosines(_mean_embeddings(student, held[32:]), teacher)
    assert after.mean() > before.mean()
    assert 1 - after.mean() < 0.5 * (1 - before.mean())  # at least half the gap closed
