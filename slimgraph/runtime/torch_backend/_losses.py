"""Knowledge-distillation losses: response, feature and relation knowledge (seeds 001, 002).

- Response (Hinton et al. 2015): `KL(softmax(t/T) || softmax(s/T)) * T^2`, mixed with the
  cross-entropy on labels as `alpha * kd + (1 - alpha) * ce`.
- Feature (FitNets, Romero et al. 2015): mean squared error between named intermediate values of
  student and teacher, through a learned 1x1 adapter where channel counts differ (a pruned
  student has fewer channels than its unpruned teacher); or `1 - cosine` over the channel axis,
  for embeddings (a sentence encoder's last hidden state is judged by its direction).
- Relation (RKD, Park et al. 2019): distance-wise and angle-wise potentials over the samples of a
  batch, compared with the Huber loss (smooth L1, beta 1).

Every loss takes the teacher's tensors as targets: they are detached here, so no gradient reaches
the teacher through a distillation term.

Example:
    >>> loss = response_loss(student_logits, teacher_logits, labels, temperature=4.0, alpha=0.9)
    ... # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from slimgraph.errors import BadOptionError

__all__ = [
    "class_rows",
    "kd_divergence",
    "response_loss",
    "FeatureDistiller",
    "rkd_distance_loss",
    "rkd_angle_loss",
    "relation_loss",
]


def class_rows(scores: torch.Tensor) -> torch.Tensor:
    """Scores [N, ..., C] as rows [N * ..., C] (class scores on the last axis); [N] -> [N, 1]."""
    if scores.ndim == 1:
        return scores[:, None]
    return scores.reshape(-1, scores.shape[-1])


def kd_divergence(
    student: torch.Tensor, teacher: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """`KL(softmax(t/T) || softmax(s/T)) * T^2`, summed over classes, averaged over rows.

    Args:
        student: float logits [N, ..., C] (class scores on the last axis).
        teacher: float logits of the same shape (detached here).
        temperature: T > 0; the T^2 factor keeps gradient magnitudes independent of T.

    Returns:
        A scalar tensor.
    """
    s = class_rows(student).float() / temperature
    t = class_rows(teacher).detach().float() / temperature
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1).mean()
    return kl * temperature**2


def response_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Response-based distillation mixed with the label loss (Hinton et al. 2015).

    `alpha * KL(softmax(t/T) || softmax(s/T)) * T^2 + (1 - alpha) * CE(s, labels)`; the KD term
    alone without labels, the cross-entropy alone without a teacher.

    Args:
        student: logits [N, C] (or [N, ..., C] with labels [N * ...]).
        teacher: logits of the same shape, or None.
        labels: int64 class indices [N], or None.
        temperature: softening temperature T > 0.
        alpha: weight of the distillation term, in [0, 1].

    Raises:
        BadOptionError: neither a teacher nor labels (nothing to learn from).
    """
    if teacher is None:
        if labels is None:
            raise BadOptionError("nothing to learn from: no labels and no teacher")
        return F.cross_entropy(class_rows(student).float(), labels.reshape(-1))
    kd = kd_divergence(student, teacher, temperature=temperature)
    if labels is None:
        return kd
    ce = F.cross_entropy(class_rows(student).float(), labels.reshape(-1))
    return alpha * kd + (1.0 - alpha) * ce


def _channel_axis(rank: int) -> int:
    """Axis holding channels: 1 for images [N, C, H, W], the last for [N, C] and [N, S, C]."""
    return 1 if rank == 4 else rank - 1


class FeatureDistiller(nn.Module):
    """MSE between matched intermediate values, with learned 1x1 adapters where channels differ.

    A 4-D value [N, C, H, W] is adapted by a 1x1 convolution (C_s -> C_t), a 2-D [N, C] or 3-D
    [N, S, C] value by a linear layer on its last axis. Values whose channels already match are
    compared directly. The adapters are trained with the student and are not part of the model.

    Args:
        names: one label per matched pair (for messages).
        student_shapes: the student values' shapes (axis 0 may be anything).
        teacher_shapes: the teacher values' shapes.
        cosine: compare by `1 - cosine similarity` over the channel axis (mean over the other
            positions) instead of the MSE.

    Raises:
        BadOptionError: ranks differ, a rank outside 2..4, or shapes that differ anywhere but the
            channel axis.
    """

    def __init__(
        self,
        names: Sequence[str],
        student_shapes: Sequence[Sequence[int]],
        teacher_shapes: Sequence[Sequence[int]],
        *,
        cosine: bool = False,
    ) -> None:
        super().__init__()
        self.names = list(names)
        self.cosine = cosine
        self.axes: list[int] = []
        adapters: list[nn.Module] = []
        for name, s_shape, t_shape in zip(names, student_shapes, teacher_shapes, strict=True):
            s_shape, t_shape = list(s_shape), list(t_shape)
            if len(s_shape) != len(t_shape) or not 2 <= len(s_shape) <= 4:
                raise BadOptionError(
                    f"feature '{name}': student {s_shape} and teacher {t_shape} values cannot be "
                    "matched (same rank, 2 to 4 axes needed)"
                )
            axis = _channel_axis(len(s_shape))
            self.axes.append(axis)
            others_s = [d for i, d in enumerate(s_shape) if i not in (0, axis)]
            others_t = [d for i, d in enumerate(t_shape) if i not in (0, axis)]
            if others_s != others_t:
                raise BadOptionError(
                    f"feature '{name}': student {s_shape} and teacher {t_shape} differ beyond "
                    "the channel axis"
                )
            c_s, c_t = s_shape[axis], t_shape[axis]
            if c_s == c_t:
                adapters.append(nn.Identity())
            elif len(s_shape) == 4:
                adapters.append(nn.Conv2d(c_s, c_t, 1, bias=False))
            else:
                adapters.append(nn.Linear(c_s, c_t, bias=False))
        self.adapters = nn.ModuleList(adapters)

    def forward(
        self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Mean over pairs of the MSE (mean over elements), or of `1 - cosine` (mean over
        positions), of adapter(student) and teacher."""
        losses = []
        for adapter, axis, s, t in zip(self.adapters, self.axes, student, teacher, strict=True):
            adapted, target = adapter(s.float()), t.detach().float()
            if self.cosine:
                similarity = F.cosine_similarity(adapted, target, dim=axis, eps=1e-8)
                losses.append((1.0 - similarity).mean())
            else:
                losses.append(F.mse_loss(adapted, target))
        return torch.stack(losses).mean()


def _rows(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], -1).float()


def _normalized_distances(rows: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances [N, N] divided by their mean over pairs i != j."""
    distances = torch.cdist(rows, rows, compute_mode="donot_use_mm_for_euclid_dist")
    off_diagonal = distances[~torch.eye(len(rows), dtype=torch.bool, device=rows.device)]
    mean = off_diagonal.mean().clamp_min(1e-12)
    return distances / mean


def _relation_mismatch(
    student: torch.Tensor,
    teacher: torch.Tensor,
    relation: Callable[[torch.Tensor], torch.Tensor],
    *,
    min_rows: int,
) -> torch.Tensor:
    """Huber(relation(student) - relation(teacher)) averaged over its entries (Park et al. 2019,
    RKD): each sample flattened to one row, no gradient through the teacher; 0 (float32 scalar)
    for fewer than `min_rows` samples."""
    if student.shape[0] < min_rows:
        return student.new_zeros((), dtype=torch.float32)
    related = relation(_rows(student))
    with torch.no_grad():
        target = relation(_rows(teacher.detach()))
    return F.smooth_l1_loss(related, target, reduction="mean", beta=1.0)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Distance-wise RKD: Huber(d_s(i, j) - d_t(i, j)) averaged over all N x N pairs.

    `d(i, j) = ||x_i - x_j|| / mu`, mu the mean distance over pairs i != j (Park et al. 2019,
    eq. 3-4); each sample is its value flattened to one row.

    Args:
        student: [N, ...] values, N >= 2.
        teacher: [N, ...] values (any width: only relations are compared).
    """
    return _relation_mismatch(student, teacher, _normalized_distances, min_rows=2)


def _angles(rows: torch.Tensor) -> torch.Tensor:
    """cos of the angle at vertex i between x_j and x_k: [N, N, N], entry [i, j, k]."""
    differences = rows[None, :, :] - rows[:, None, :]  # [i, j] = x_j - x_i
    unit = F.normalize(differences, p=2, dim=2, eps=1e-12)
    return torch.bmm(unit, unit.transpose(1, 2))


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Angle-wise RKD: Huber(cos_s - cos_t) averaged over all N^3 triplets (Park et al., eq. 5-6).

    `cos(i, j, k) = <e(x_j - x_i), e(x_k - x_i)>` with `e(v) = v / ||v||` (0 for v = 0).
    """
    return _relation_mismatch(student, teacher, _angles, min_rows=3)


def relation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    distance_weight: float = 1.0,
    angle_weight: float = 2.0,
) -> torch.Tensor:
    """`distance_weight * RKD-D + angle_weight * RKD-A` (the paper's weights 1 and 2 by default).

    Args:
        student: [N, ...] values of the chosen layer, N >= 2 samples.
        teacher: [N, ...] values of the teacher's matching layer.
    """
    loss = student.new_zeros((), dtype=torch.float32)
    if distance_weight:
        loss = loss + distance_weight * rkd_distance_loss(student, teacher)
    if angle_weight:
        loss = loss + angle_weight * rkd_angle_loss(student, teacher)
    return loss
