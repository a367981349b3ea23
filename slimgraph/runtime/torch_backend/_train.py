"""The training loop: fine-tuning and knowledge distillation of a lowered graph.

The student is a lowered model (see `lower`): an `nn.Module` with `input_names`, `output_names`
and a positional `forward` returning a tuple in `output_names` order. Mini-batches come from
in-memory stacked arrays (shuffled each epoch) or from any re-iterable of feed dicts (in order).

The loss of one step (seeds 001, 002):
    response KD (or cross-entropy alone without a teacher)
    + feature_weight * MSE(adapter(student value), teacher value)      (kd "feature")
    + RKD-D * w_d + RKD-A * w_a on a chosen value                      (kd "relation")

Teachers, by scheme:
- offline: a frozen teacher, run in onnxruntime (`OrtTeacher`); with in-memory data its outputs
  are computed once for every row and indexed per batch.
- online (deep mutual learning, Zhang et al. 2018): a second lowered model trained alongside,
  itself learning from the student's softened outputs and the labels.
- self: an exponential moving average of the student's own weights (mean teacher).

Example:
    >>> history = train(student, ArrayBatches(data, student.input_names, 64),  # doctest: +SKIP
    ...                 TrainOptions(epochs=10), logits="linear", teacher=OrtTeacher(t, ["linear"]))
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from slimgraph.errors import BadOptionError
from slimgraph.runtime._decoder import empty_past_fitter
from slimgraph.runtime.calibrate import with_outputs
from slimgraph.runtime.compare import FidelityAccumulator
from slimgraph.runtime.feeds import sample_count
from slimgraph.runtime.metrics import LabelledData, split_labels
from slimgraph.runtime.session import create_session, run
from slimgraph.runtime.torch_backend._batchnorm import fold_batchnorm, unfold_batchnorm
from slimgraph.runtime.torch_backend._losses import (
    FeatureDistiller,
    class_rows,
    relation_loss,
    response_loss,
)
from slimgraph.runtime.torch_backend._lower import LoweredModel
from slimgraph.runtime.torch_backend._lr_range import LrSearch, cycle, lr_range_test
from slimgraph.runtime.torch_backend._options import KD_KINDS, OPTIMIZERS, SCHEMES, TrainOptions

__all__ = [
    "KD_KINDS",
    "SCHEMES",
    "OPTIMIZERS",
    "TrainOptions",
    "EpochRecord",
    "History",
    "Batch",
    "ArrayBatches",
    "StreamBatches",
    "Taps",
    "Teacher",
    "OrtTeacher",
    "ModuleTeacher",
    "EmaTeacher",
    "Validation",
    "train",
]

logger = logging.getLogger(__name__)

# Cache the offline teacher's outputs for in-memory data up to this many bytes.
_CACHE_LIMIT = 1 << 30
_TEACHER_BATCH = 256


@dataclass(frozen=True)
class EpochRecord:
    """One epoch: mean training loss and the validation metric after it.

    Epoch 0 is the state before training (no loss). `val` is top-1 accuracy (0..1) or the worst
    output cosine to the reference, as `History.metric` says; None without validation data.
    """

    epoch: int
    loss: float | None
    val: float | None
    seconds: float
    steps: int
    metric: str | None = None


@dataclass
class History:
    """Per-epoch figures of a run (the report's training curves) and what the run chose.

    Attributes:
        metric: "accuracy" or "cosine" (None without validation data).
        records: epoch 0 (before training) and every epoch trained.
        lr: the learning rate used (the range test's pick when none was given).
        lr_search: the range test's measurements, or None when `lr` was given.
        unfolded: convolutions trained with batch statistics (`_batchnorm`).
        kept: the epoch whose weights were handed back (the best on validation; 0: the input
            model, which no epoch beat); None without validation data.
    """

    metric: str | None
    records: list[EpochRecord] = field(default_factory=list)
    lr: float | None = None
    lr_search: LrSearch | None = None
    unfolded: int = 0
    kept: int | None = None

    @property
    def kept_record(self) -> EpochRecord | None:
        """The record of the epoch handed back (the last one without validation)."""
        if not self.records:
            return None
        if self.kept is None:
            return self.records[-1]
        return next(r for r in self.records if r.epoch == self.kept)

    @property
    def seconds_per_epoch(self) -> float | None:
        trained = [r.seconds for r in self.records if r.epoch > 0]
        return float(np.median(trained)) if trained else None

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "epochs": [asdict(r) for r in self.records],
                "lr": self.lr, "lr_range_test": self.lr_search is not None,
                "unfolded_batchnorm": self.unfolded, "kept_epoch": self.kept}  # fmt: skip


class _BestKeeper:
    """The weights of the epoch with the best validation metric, handed back at the end.

    Epoch 0 (the input model) is replaced only by an epoch strictly better; later epochs replace
    earlier trained ones on a tie.
    """

    def __init__(self, module: nn.Module, history: History) -> None:
        self.module = module
        self.history = history
        self.best = history.records[0].val if history.records else None
        self.epoch = 0
        self.state = copy.deepcopy(module.state_dict())

    def offer(self, record: EpochRecord) -> None:
        if record.val is None:
            return
        if self.best is None or record.val > self.best or (
            record.val == self.best and self.epoch > 0
        ):
            self.best, self.epoch = record.val, record.epoch
            self.state = copy.deepcopy(self.module.state_dict())

    def restore(self) -> None:
        self.history.kept = self.epoch
        if self.history.records and self.epoch != self.history.records[-1].epoch:
            self.module.load_state_dict(self.state)
            logger.info("validation was best at epoch %d: its weights are handed back",
                        self.epoch)  # fmt: skip


class Batch(NamedTuple):
    """One mini-batch: inputs by name, labels [N] or None, and the rows' indices into in-memory
    data (None for streamed data)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None
    rows: np.ndarray | None


class ArrayBatches:
    """Shuffled mini-batches of in-memory data; a trailing single row is dropped (BatchNorm)."""

    def __init__(self, data: LabelledData, batch_size: int) -> None:
        self.data = data
        self.batch_size = batch_size
        self.inputs = {name: torch.from_numpy(np.ascontiguousarray(array))
                       for name, array in data.feeds.items()}  # fmt: skip
        self.labels = None if data.labels is None else torch.from_numpy(data.labels)
        rows = data.samples
        full, rest = divmod(rows, batch_size)
        self.steps = full + (1 if rest > 1 or (rest and not full) else 0)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return self.steps

    def epoch(self, rng: np.random.Generator) -> Iterator[Batch]:
        order = rng.permutation(self.data.samples)
        for step in range(self.steps):
            index = np.sort(order[step * self.batch_size : (step + 1) * self.batch_size])
            rows = torch.from_numpy(index)
            yield Batch(
                {name: tensor[rows] for name, tensor in self.inputs.items()},
                None if self.labels is None else self.labels[rows],
                index,
            )


class StreamBatches:
    """Feed dicts from a re-iterable, each one batch (inputs plus an optional labels key).

    Each feed dict is checked against the model as it arrives (`split_labels`).
    """

    def __init__(
        self, items: Iterable[Mapping[str, np.ndarray]], model: ir.Model, labels: str
    ) -> None:
        self.items = items
        self.model = model
        self.labels_key = labels
        self.first = self._convert(next(iter(items), None), 0)

    def _convert(self, item: Mapping[str, np.ndarray] | None, step: int) -> Batch:
        if item is None:
            raise BadOptionError("data: the iterable of feed dicts is empty")
        data = split_labels(item, self.model, labels=self.labels_key,
                            source=f"data batch {step}")  # fmt: skip
        return Batch(
            {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in data.feeds.items()},
            None if data.labels is None else torch.from_numpy(data.labels),
            None,
        )

    @property
    def has_labels(self) -> bool:
        return self.first.labels is not None

    def __len__(self) -> int:
        try:
            return len(self.items)  # type: ignore[arg-type]
        except TypeError:
            return 0

    def epoch(self, rng: np.random.Generator) -> Iterator[Batch]:
        del rng  # streamed batches keep their order
        for step, item in enumerate(self.items):
            yield self._convert(item, step)


Batches = ArrayBatches | StreamBatches


@dataclass(frozen=True)
class Taps:
    """Which values the losses read, by value name, in the student and in the teacher.

    Attributes:
        logits: (student, teacher) names of the class scores (the first graph output).
        features: (student, teacher) pairs for feature KD.
        relation: (student, teacher) for relation KD, or None.
    """

    logits: tuple[str, str]
    features: tuple[tuple[str, str], ...] = ()
    relation: tuple[str, str] | None = None

    def teacher_names(self) -> list[str]:
        names = [self.logits[1], *(t for _, t in self.features)]
        if self.relation is not None:
            names.append(self.relation[1])
        return list(dict.fromkeys(names))


class Teacher(Protocol):
    """Targets for a batch, by value name."""

    trainable: bool

    def outputs(self, batch: Batch) -> dict[str, torch.Tensor]: ...

    def after_step(self, student: nn.Module) -> None: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def train(self, mode: bool = True) -> Any: ...


class OrtTeacher:
    """A frozen teacher run by onnxruntime, exposing intermediate values as extra outputs.

    With in-memory data its outputs for every row are computed once (`cache`), in batches of
    256 rows, and then indexed per mini-batch.
    """

    trainable = False

    def __init__(self, model: ir.Model, names: Sequence[str]) -> None:
        self.names = list(names)
        self.fit = empty_past_fitter(model)
        self.session = create_session(with_outputs(model, self.names))
        self.cached: dict[str, torch.Tensor] | None = None

    def run_numpy(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # a head-pruned decode step's student: its token data's empty past has fewer heads
        outputs = run(self.session, self.fit(feeds))
        return {name: outputs[name] for name in self.names}

    def cache(self, data: LabelledData) -> None:
        """Compute the outputs for every row of `data` once (skipped above 1 GiB)."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.names}
        total = 0
        for feed, _ in data.batches(_TEACHER_BATCH):
            for name, value in self.run_numpy(feed).items():
                parts[name].append(value)
                total += value.nbytes
            if total > _CACHE_LIMIT:
                return
        self.cached = {name: torch.from_numpy(np.concatenate(arrays)) for name, arrays
                       in parts.items()}  # fmt: skip

    def outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.cached is not None and batch.rows is not None:
            rows = torch.from_numpy(batch.rows)
            return {name: value[rows] for name, value in self.cached.items()}
        feeds = {name: tensor.numpy() for name, tensor in batch.inputs.items()}
        return {name: torch.from_numpy(value) for name, value in self.run_numpy(feeds).items()}

    def after_step(self, student: nn.Module) -> None:
        del student

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def train(self, mode: bool = True) -> OrtTeacher:
        return self


def _forward(module: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run a lowered model on named inputs; its outputs by name."""
    input_names: list[str] = list(getattr(module, "input_names"))  # noqa: B009
    output_names: list[str] = list(getattr(module, "output_names"))  # noqa: B009
    outputs = module(*(inputs[name] for name in input_names))
    return dict(zip(output_names, outputs, strict=True))


class ModuleTeacher:
    """A lowered teacher trained alongside the student (online scheme)."""

    trainable = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        return _forward(self.module, batch.inputs)

    def after_step(self, student: nn.Module) -> None:
        del student

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()

    def train(self, mode: bool = True) -> ModuleTeacher:
        self.module.train(mode)
        return self


class EmaTeacher:
    """The student's own exponential moving average (self scheme), always in eval mode.

    After each step: `p_ema = decay * p_ema + (1 - decay) * p`; buffers (BatchNorm statistics)
    are copied.
    """

    trainable = False

    def __init__(self, student: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(student).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay

    def outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return _forward(self.module, batch.inputs)

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        for ema, current in zip(self.module.parameters(), student.parameters(), strict=True):
            ema.mul_(self.decay).add_(current.detach(), alpha=1.0 - self.decay)
        for ema_buffer, buffer in zip(self.module.buffers(), student.buffers(), strict=True):
            ema_buffer.copy_(buffer)

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def train(self, mode: bool = True) -> EmaTeacher:
        return self


@dataclass
class Validation:
    """Held-out data and what the student is judged by after each epoch.

    With labels: top-1 accuracy of the first of `outputs` (the graph outputs' names). Without:
    the worst cosine of those outputs against `reference` (the teacher's, or the input model's,
    outputs on the same rows).
    """

    data: LabelledData
    outputs: list[str]
    reference: dict[str, np.ndarray] | None = None
    batch_size: int = 256

    @property
    def metric(self) -> str:
        return "accuracy" if self.data.labels is not None else "cosine"

    @torch.no_grad()
    def evaluate(self, module: nn.Module) -> float:
        outputs = self.outputs
        was_training = module.training
        module.eval()
        correct = 0
        fidelity = FidelityAccumulator()
        start = 0
        try:
            for feed, labels in self.data.batches(self.batch_size):
                rows = sample_count(feed)
                got = _forward(module, {n: torch.from_numpy(a) for n, a in feed.items()})
                if labels is not None:
                    scores = class_rows(got[outputs[0]]).numpy()
                    correct += int((scores.argmax(-1) == labels).sum())
                elif self.reference is not None:
                    fidelity.add({n: self.reference[n][start : start + rows] for n in outputs},
                                 {n: got[n].numpy() for n in outputs})  # fmt: skip
                start += rows
        finally:
            module.train(was_training)
        if self.data.labels is not None:
            return correct / max(1, start)
        return float(fidelity.result().worst_cosine)


def _optimizer(
    parameters: list[nn.Parameter], options: TrainOptions, lr: float
) -> torch.optim.Optimizer:
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": options.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]  # fmt: skip
    if options.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def _progress(total: int, epoch: int, epochs: int, enabled: bool | None) -> Any:
    show = sys.stderr.isatty() if enabled is None else enabled
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total or None, desc=f"epoch {epoch}/{epochs}", leave=False,
                file=sys.stderr, unit="step")  # fmt: skip


def _feature_distiller(
    student: nn.Module, teacher: Teacher, taps: Taps, batch: Batch, *, cosine: bool = False
) -> FeatureDistiller | None:
    """Adapters sized from one forward pass (eval mode, no gradient) of student and teacher."""
    if not taps.features:
        return None
    was_training = student.training
    student.eval()
    with torch.no_grad():
        got = _forward(student, batch.inputs)
        targets = teacher.outputs(batch)
    student.train(was_training)
    return FeatureDistiller(
        [f"{s} -> {t}" if s != t else s for s, t in taps.features],
        [tuple(got[s].shape) for s, _ in taps.features],
        [tuple(targets[t].shape) for _, t in taps.features],
        cosine=cosine,
    )


def train(
    student: nn.Module,
    batches: Batches,
    options: TrainOptions,
    *,
    taps: Taps,
    kd: Sequence[str] = ("response",),
    teacher: Teacher | None = None,
    validation: Validation | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    model: ir.Model | None = None,
) -> History:
    """Train `student` in place and return the per-epoch history.

    Args:
        student: a lowered model (input_names, output_names, positional forward). Trained in
            train mode (BatchNorm batch statistics, dropout) and left in eval mode.
        batches: the training data.
        options: optimization settings (checked here).
        taps: the value names the losses read.
        kd: knowledge kinds used with a teacher: any of "response", "feature", "relation".
        teacher: targets (offline, online or self); None trains on labels alone.
        validation: held-out data evaluated before training and after every epoch.
        on_epoch: called with each epoch's record as it completes (for printing).
        model: the graph `student` was lowered from; with it, convolutions whose BatchNorm was
            folded train with batch statistics (`options.unfold_batchnorm`, see `_batchnorm`).

    With `options.lr` None the learning rate comes from a range test (`_lr_range`). With
    validation data the weights of the best epoch are handed back (`History.kept`; 0 means no
    epoch beat the input).

    Raises:
        BadOptionError: bad options; nothing to learn from (no labels and no teacher); the loss
            became NaN or infinite (the message names epoch and step).
    """
    options.check()
    unknown = [k for k in kd if k not in KD_KINDS]
    if unknown:
        raise BadOptionError(
            f"unknown knowledge kind '{unknown[0]}' (choose from {', '.join(KD_KINDS)})"
        )
    if teacher is None and not batches.has_labels:
        raise BadOptionError(
            "nothing to learn from: the data has no labels and there is no teacher"
        )
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    history = History(validation.metric if validation is not None else None)

    def record(epoch: int, loss: float | None, seconds: float, steps: int) -> None:
        val = validation.evaluate(student) if validation is not None else None
        entry = EpochRecord(epoch, loss, val, seconds, steps, history.metric)
        history.records.append(entry)
        logger.info("epoch %d: loss %s, val %s", epoch, loss, val)
        if on_epoch is not None:
            on_epoch(entry)

    record(0, None, 0.0, 0)
    if options.epochs == 0:
        student.eval()
        return history
    use_feature = teacher is not None and "feature" in kd and bool(taps.features)
    use_relation = teacher is not None and "relation" in kd and taps.relation is not None
    use_response = teacher is not None and "response" in kd
    first = next(iter(batches.epoch(np.random.default_rng(options.seed))))
    unfolded = []
    # (not under an EMA teacher: its copy of the student has no norms to average)
    if (options.unfold_batchnorm and isinstance(student, LoweredModel) and model is not None
            and not isinstance(teacher, EmaTeacher)):  # fmt: skip
        unfolded = unfold_batchnorm(student, model, first.inputs)
        history.unfolded = len(unfolded)
    distiller = None
    if use_feature and teacher is not None:
        distiller = _feature_distiller(student, teacher, taps, first,
                                       cosine=options.feature_loss == "cosine")  # fmt: skip
    parameters = [p for p in student.parameters() if p.requires_grad]
    if distiller is not None:
        parameters += list(distiller.parameters())
    if teacher is not None and teacher.trainable:
        parameters += [p for p in teacher.parameters() if p.requires_grad]
    if not parameters:
        raise BadOptionError("the model has no float weights to train")
    teacher_train = teacher is not None and teacher.trainable

    def loss_of(batch: Batch, epoch: int, step: int) -> torch.Tensor:
        got = _forward(student, batch.inputs)
        targets = teacher.outputs(batch) if teacher is not None else {}
        s_logits = got[taps.logits[0]]
        t_logits = targets.get(taps.logits[1]) if use_response else None
        if t_logits is None and batch.labels is None and distiller is None:
            raise BadOptionError(
                f"nothing to learn from: batch {step} of epoch {epoch} has no labels and "
                "response KD is off"
            )
        loss = s_logits.new_zeros((), dtype=torch.float32)
        if t_logits is not None or batch.labels is not None:
            loss = response_loss(s_logits, t_logits, batch.labels,
                                 temperature=options.temperature, alpha=options.alpha)  # fmt: skip
        if distiller is not None:
            loss = loss + options.feature_weight * distiller(
                [got[s] for s, _ in taps.features], [targets[t] for _, t in taps.features]
            )
        if use_relation and taps.relation is not None:
            w_d, w_a = options.relation_weights
            loss = loss + relation_loss(got[taps.relation[0]], targets[taps.relation[1]],
                                        distance_weight=w_d, angle_weight=w_a)  # fmt: skip
        if teacher_train:  # deep mutual learning: the peer learns from the student too
            loss = loss + response_loss(
                targets[taps.logits[1]], s_logits.detach(), batch.labels,
                temperature=options.temperature, alpha=options.alpha,
            )
        return loss

    student.train()
    if teacher is not None:
        teacher.train(teacher_train)
    lr = options.lr
    if lr is None:
        # in-memory data: shuffled batches; a stream may be one-shot: its first batch, repeated
        search_batches = (
            cycle(lambda: batches.epoch(np.random.default_rng(options.seed + 1)))
            if isinstance(batches, ArrayBatches) else itertools.repeat(first)
        )  # fmt: skip
        trained_modules: list[nn.Module] = [student]
        if distiller is not None:
            trained_modules.append(distiller)
        if teacher_train:
            trained_modules.append(teacher)  # type: ignore[arg-type]
        history.lr_search = lr_range_test(
            lambda: loss_of(next(search_batches), 0, 0),  # type: ignore[arg-type]
            trained_modules, lambda rate: _optimizer(parameters, options, rate),
        )  # fmt: skip
        lr = history.lr_search.lr
        torch.manual_seed(options.seed)
    history.lr = lr
    optimizer = _optimizer(parameters, options, lr)
    steps_per_epoch = len(batches) or 1
    total = max(1, options.epochs * steps_per_epoch)
    scheduler = None
    if options.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        )
    keeper = _BestKeeper(student, history) if validation is not None else None
    for epoch in range(1, options.epochs + 1):
        start = time.perf_counter()
        losses: list[float] = []
        bar = _progress(len(batches), epoch, options.epochs, options.progress)
        for step, batch in enumerate(batches.epoch(rng), start=1):
            loss = loss_of(batch, epoch, step)
            value = float(loss.detach())
            if not math.isfinite(value):
                if bar is not None:
                    bar.close()
                raise BadOptionError(
                    f"training diverged: the loss is {value} at epoch {epoch}, step {step}; "
                    f"nothing was written (try a lower learning rate than {lr:.3g})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if teacher is not None:
                teacher.after_step(student)
            losses.append(value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        record(epoch, float(np.mean(losses)) if losses else None, seconds, len(losses))
        if keeper is not None:
            keeper.offer(history.records[-1])
        student.train()
    if keeper is not None:
        keeper.restore()
    student.eval()
    if unfolded:
        fold_batchnorm(student, unfolded)  # type: ignore[arg-type]
    student.eval()
    if teacher is not None:
        teacher.train(False)
    return history
