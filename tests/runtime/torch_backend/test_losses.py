"""Each distillation loss against a hand computation in numpy (float64), explicit tolerances."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from slimgraph.errors import BadOptionError  # noqa: E402
from slimgraph.runtime.torch_backend._losses import (  # noqa: E402
    FeatureDistiller,
    kd_divergence,
    relation_loss,
    response_loss,
    rkd_angle_loss,
    rkd_distance_loss,
)

RTOL, ATOL = 1e-5, 1e-6


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _huber(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    return np.where(a < 1.0, 0.5 * x * x, a - 0.5)


def _t(x: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, requires_grad=grad)


@pytest.fixture
def logits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    s = rng.normal(size=(6, 5)).astype(np.float32) * 2
    t = rng.normal(size=(6, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=6)
    return s, t, labels


def test_kd_divergence_is_tempered_kl_times_t_squared(logits) -> None:  # noqa: ANN001
    s, t, _ = logits
    temperature = 3.0
    p_t = _softmax(t.astype(np.float64) / temperature)
    p_s = _softmax(s.astype(np.float64) / temperature)
    expected = (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1).mean() * temperature**2
    got = kd_divergence(_t(s), _t(t), temperature=temperature).item()
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    assert kd_divergence(_t(t), _t(t), temperature=temperature).item() == pytest.approx(0, abs=1e-6)


def test_response_loss_mixes_kd_and_cross_entropy_by_alpha(logits) -> None:  # noqa: ANN001
    s, t, labels = logits
    temperature, alpha = 4.0, 0.7
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    p_t, p_s = _softmax(t64 / temperature), _softmax(s64 / temperature)
    kd = (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1).mean() * temperature**2
    ce = -np.log(_softmax(s64)[np.arange(6), labels]).mean()
    got = response_loss(_t(s), _t(t), torch.from_numpy(labels), temperature=temperature,
                        alpha=alpha).item()  # fmt: skip
    np.testing.assert_allclose(got, alpha * kd + (1 - alpha) * ce, rtol=RTOL, atol=ATOL)
    only_ce = response_loss(_t(s), None, torch.from_numpy(labels)).item()
    np.testing.assert_allclose(only_ce, ce, rtol=RTOL, atol=ATOL)
    only_kd = response_loss(_t(s), _t(t), None, temperature=temperature).item()
    np.testing.assert_allclose(only_kd, kd, rtol=RTOL, atol=ATOL)


def test_response_loss_without_teacher_or_labels_is_refused(logits) -> None:  # noqa: ANN001
    with pytest.raises(BadOptionError, match="^nothing to learn from: no labels and no teacher$"):
        response_loss(_t(logits[0]), None, None)


def test_response_loss_sends_no_gradient_to_the_teacher(logits) -> None:  # noqa: ANN001
    s, t, labels = logits
    student, teacher = _t(s, grad=True), _t(t, grad=True)
    response_loss(student, teacher, torch.from_numpy(labels)).backward()
    assert teacher.grad is None
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


def test_feature_loss_is_mse_and_adapts_pruned_channels() -> None:
    rng = np.random.default_rng(1)
    s = rng.normal(size=(3, 4, 5, 5)).astype(np.float32)  # pruned student: 4 channels
    t = rng.normal(size=(3, 8, 5, 5)).astype(np.float32)  # teacher: 8 channels
    tokens_s = rng.normal(size=(3, 7, 6)).astype(np.float32)
    tokens_t = rng.normal(size=(3, 7, 6)).astype(np.float32)
    distiller = FeatureDistiller(["conv", "tokens"], [s.shape, tokens_s.shape],
                                 [t.shape, tokens_t.shape])  # fmt: skip
    conv = distiller.adapters[0]
    assert isinstance(conv, torch.nn.Conv2d) and conv.weight.shape == (8, 4, 1, 1)
    assert isinstance(distiller.adapters[1], torch.nn.Identity)
    w = conv.weight.detach().numpy()[:, :, 0, 0].astype(np.float64)  # [8, 4]
    adapted = np.einsum("oc,nchw->nohw", w, s.astype(np.float64))
    expected = (((adapted - t) ** 2).mean() + ((tokens_s - tokens_t.astype(np.float64)) ** 2)
                .mean()) / 2  # fmt: skip
    got = distiller([_t(s), _t(tokens_s)], [_t(t), _t(tokens_t)]).item()
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_feature_adapter_for_tokens_is_a_linear_map_on_the_last_axis() -> None:
    rng = np.random.default_rng(2)
    s = rng.normal(size=(2, 8, 16)).astype(np.float32)  # MLP pruned: 16 of 32 hidden units
    t = rng.normal(size=(2, 8, 32)).astype(np.float32)
    distiller = FeatureDistiller(["fc1"], [s.shape], [t.shape])
    linear = distiller.adapters[0]
    assert isinstance(linear, torch.nn.Linear) and linear.weight.shape == (32, 16)
    expected = ((s.astype(np.float64) @ linear.weight.detach().numpy().T - t) ** 2).mean()
    got = distiller([_t(s)], [_t(t)]).item()
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("student", "teacher", "message"),
    [
        ((2, 4, 5, 5), (2, 8, 4, 4), "feature 'x': student [2, 4, 5, 5] and teacher [2, 8, 4, 4] "
                                     "differ beyond the channel axis"),
        ((2, 4, 5, 5), (2, 8), "feature 'x': student [2, 4, 5, 5] and teacher [2, 8] values "
                               "cannot be matched (same rank, 2 to 4 axes needed)"),
    ],
)
def test_feature_values_that_cannot_be_matched_are_refused(student, teacher, message) -> None:  # noqa: ANN001
    with pytest.raises(BadOptionError) as caught:
        FeatureDistiller(["x"], [student], [teacher])
    assert str(caught.value) == message


def _rkd_distance_numpy(s: np.ndarray, t: np.ndarray) -> float:
    def normalized(x: np.ndarray) -> np.ndarray:
        x = x.reshape(len(x), -1).astype(np.float64)
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return d / d[~np.eye(len(x), dtype=bool)].mean()

    return float(_huber(normalized(s) - normalized(t)).mean())


def _rkd_angle_numpy(s: np.ndarray, t: np.ndarray) -> float:
    def angles(x: np.ndarray) -> np.ndarray:
        x = x.reshape(len(x), -1).astype(np.float64)
        n = len(x)
        out = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    a, b = x[j] - x[i], x[k] - x[i]
                    na, nb = np.linalg.norm(a), np.linalg.norm(b)
                    if na > 0 and nb > 0:
                        out[i, j, k] = a @ b / (na * nb)
        return out

    return float(_huber(angles(s) - angles(t)).mean())


def test_rkd_distance_and_angle_match_park_et_al() -> None:
    rng = np.random.default_rng(3)
    s = rng.normal(size=(5, 3, 2, 2)).astype(np.float32)  # widths may differ: only relations
    t = rng.normal(size=(5, 24)).astype(np.float32) * 4
    dist = rkd_distance_loss(_t(s), _t(t)).item()
    angle = rkd_angle_loss(_t(s), _t(t)).item()
    np.testing.assert_allclose(dist, _rkd_distance_numpy(s, t), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(angle, _rkd_angle_numpy(s, t), rtol=RTOL, atol=ATOL)
    both = relation_loss(_t(s), _t(t), distance_weight=1.0, angle_weight=2.0).item()
    np.testing.assert_allclose(both, dist + 2 * angle, rtol=RTOL, atol=ATOL)
    # scale invariance: the teacher times 10 has the same relations
    np.testing.assert_allclose(rkd_distance_loss(_t(s), _t(t * 10)).item(), dist, rtol=1e-4)


def test_rkd_gradient_is_finite_and_zero_at_the_teacher() -> None:
    rng = np.random.default_rng(4)
    t = rng.normal(size=(6, 10)).astype(np.float32)
    student = _t(t, grad=True)
    loss = relation_loss(student, _t(t))
    loss.backward()
    assert loss.item() == pytest.approx(0, abs=1e-6)
    assert torch.isfinite(student.grad).all()
    s = _t(rng.normal(size=(6, 10)).astype(np.float32), grad=True)
    relation_loss(s, _t(t)).backward()
    assert torch.isfinite(s.grad).all() and float(s.grad.abs().sum()) > 0
