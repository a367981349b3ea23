"""Fine-tuning, knowledge distillation and QAT of the ONNX graph itself: the training run.

`run_finetune` (what `slimgraph.finetune` and the pipeline's `finetune` step run) lowers the
model to torch (`torch_backend.lower`), trains it on labelled data and/or a teacher, and writes
the trained values back into the same initializers (`write_back`): names, metadata, opsets and op
multiset are untouched, so a QDQ model is quantization-aware trained as exactly the graph that is
deployed, and `epochs=0` gives back identical initializer bytes. `FinetuneOptions` and
`FinetuneReport` are the public verb's options and report.

Knowledge kinds (`kd`, seeds 001 and 002): "response" (softened outputs, T^2-scaled KL, mixed with
the label cross-entropy by `alpha`), "feature" (MSE on named intermediate values, 1x1 adapters
where a pruned student has fewer channels), "relation" (RKD distance + angle over a batch).
Schemes: "offline" (frozen teacher in onnxruntime), "online" (teacher and student trained
together, deep mutual learning), "self" (the student's own EMA as teacher).

Values for feature and relation KD are named by torch layer (`block1`, `layers.0.fc1`: the last
float output of that module's nodes) or by ONNX value name; both survive pruning and low-rank.

torch is imported only when training starts, so `import slimgraph` stays light.

Example:
    >>> import slimgraph as sg
    >>> pruned = sg.prune(sg.load("model.onnx"), ratio=0.5)  # doctest: +SKIP
    >>> recovered = sg.finetune(pruned, "train.npz", teacher="model.onnx", epochs=10,
    ...                         kd=("response", "feature"), val="val.npz")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

import slimgraph.ir as sg_ir
from slimgraph._optional import require_torch
from slimgraph._tables import format_metric, render_table
from slimgraph.errors import BadDataError, BadOptionError
from slimgraph.runtime.data import (
    DEFAULT_LABELS,
    LabelledData,
    as_data,
    check_label_range,
    split_labels,
)
from slimgraph.runtime.feeds import input_specs
from slimgraph.runtime.metrics import evaluate
from slimgraph.runtime.session import create_session, run
from slimgraph.runtime.torch_backend import lower, write_back
from slimgraph.runtime.torch_backend._options import KD_KINDS, SCHEMES, TrainOptions

if TYPE_CHECKING:
    from slimgraph.runtime.torch_backend._train import EpochRecord, History

__all__ = [
    "KD_KINDS",
    "SCHEMES",
    "FinetuneReport",
    "FinetuneOptions",
    "metric_text",
    "run_finetune",
    "resolve_value",
    "parse_kd",
    "biases_before_batchnorm",
]

logger = logging.getLogger(__name__)

ModelLike = ir.Model | str | os.PathLike[str]
DataLike = (
    str | os.PathLike[str] | LabelledData | Mapping[str, np.ndarray]
    | Iterable[Mapping[str, np.ndarray]]
)


@dataclass
class FinetuneReport:
    """What a fine-tuning run did, for the command line and `--report`.

    Attributes:
        scheme: offline, online or self.
        kd: the knowledge kinds that were used (empty: labels only).
        epochs: epochs trained.
        samples: training rows per epoch (None for streamed data of unknown length).
        features: (student value, teacher value) pairs of feature KD.
        relation: (student value, teacher value) of relation KD, or None.
        qat: the model had QuantizeLinear/DequantizeLinear (quantization-aware training).
        learn_scales: activation scales were learned (LSQ).
        teacher_val: the teacher's metric on the validation data (offline/online), or None.
        history: per-epoch loss and validation metric (epoch 0: before training).
        seconds: wall time of the whole run (lowering, teacher, training, write-back).
    """

    scheme: str
    kd: tuple[str, ...]
    epochs: int
    samples: int | None
    features: list[tuple[str, str]] = field(default_factory=list)
    relation: tuple[str, str] | None = None
    qat: bool = False
    learn_scales: bool = False
    teacher_val: float | None = None
    history: History | None = None
    seconds: float = 0.0

    @property
    def metric(self) -> str | None:
        return None if self.history is None else self.history.metric

    @property
    def before(self) -> float | None:
        if self.history is None or not self.history.records:
            return None
        return self.history.records[0].val

    @property
    def after(self) -> float | None:
        """The validation metric of the model handed back (the best epoch's)."""
        kept = None if self.history is None else self.history.kept_record
        return None if kept is None else kept.val

    @property
    def seconds_per_epoch(self) -> float | None:
        return None if self.history is None else self.history.seconds_per_epoch

    def __str__(self) -> str:
        """The run as text (what `slimgraph finetune` prints): what was trained how, the
        per-epoch table and the validation metric before and after."""
        kinds = ", ".join(self.kd) if self.kd else "labels only"
        lines = [f"{'QAT of the QDQ graph' if self.qat else 'fine-tuning'}: scheme {self.scheme}, "
                 f"knowledge {kinds}, {self.epochs} epochs"
                 + (f" on {self.samples} samples" if self.samples else "")]  # fmt: skip
        if self.features:
            pairs = ", ".join(s if s == t else f"{s}->{t}" for s, t in self.features)
            lines.append(f"feature KD on: {pairs}")
        if self.relation is not None:
            lines.append(f"relation KD on: {self.relation[0]}")
        history = self.history
        if history is not None and history.records:
            name = history.metric
            rows = [[r.epoch, "-" if r.loss is None else f"{r.loss:.4f}",
                     metric_text(r.val, name), f"{r.seconds:.2f}" if r.epoch else "-"]
                    for r in history.records]  # fmt: skip
            header = ["epoch", "loss", f"val {name}" if name else "val", "seconds"]
            lines += ["", render_table(header, rows, align="rrrr")]
        if self.before is not None and self.after is not None:
            summary = (f"val {self.metric}: {metric_text(self.before, self.metric)} -> "
                       f"{metric_text(self.after, self.metric)}")
            if self.teacher_val is not None:
                summary += f" (teacher {metric_text(self.teacher_val, self.metric)})"
            lines += ["", summary]
        lines += self._choices()
        if self.seconds_per_epoch is not None:
            lines.append(f"{self.seconds_per_epoch:.2f} s per epoch (median), "
                         f"{self.seconds:.1f} s in all")  # fmt: skip
        return "\n".join(lines)

    def _choices(self) -> list[str]:
        """What the run chose by itself: learning rate, batch statistics, the epoch kept."""
        history = self.history
        if history is None or history.lr is None:
            return []
        lines = [str(history.lr_search) if history.lr_search is not None
                 else f"learning rate {history.lr:.3g}"]  # fmt: skip
        if history.unfolded:
            lines.append(f"{history.unfolded} convolutions trained with batch statistics "
                         "(BatchNorm folded in the graph; folded back)")  # fmt: skip
        records = history.records
        if history.kept is not None and records and history.kept != records[-1].epoch:
            last = records[-1]
            lines.append(
                f"val {self.metric} fell to {metric_text(last.val, self.metric)} by epoch "
                f"{last.epoch}: "
                + ("no epoch beat the input model, which is handed back unchanged"
                   if history.kept == 0 else f"the weights of epoch {history.kept} are kept")
            )  # fmt: skip
        return lines

    def __repr__(self) -> str:
        change = ("" if self.before is None or self.after is None else
                  f", val {self.metric} {metric_text(self.before, self.metric)} -> "
                  f"{metric_text(self.after, self.metric)}")
        return f"<FinetuneReport: {self.scheme}, {self.epochs} epochs{change}>"

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "kd": list(self.kd),
            "epochs": self.epochs,
            "samples": self.samples,
            "features": [list(pair) for pair in self.features],
            "relation": None if self.relation is None else list(self.relation),
            "qat": self.qat,
            "learn_scales": self.learn_scales,
            "metric": self.metric,
            "val_before": self.before,
            "val_after": self.after,
            "teacher_val": self.teacher_val,
            "seconds": self.seconds,
            "seconds_per_epoch": self.seconds_per_epoch,
            "lr": None if self.history is None else self.history.lr,
            "kept_epoch": None if self.history is None else self.history.kept,
            "unfolded_batchnorm": 0 if self.history is None else self.history.unfolded,
            "history": None if self.history is None else self.history.to_dict()["epochs"],
        }


def metric_text(value: float | None, name: str | None) -> str:
    """A validation figure as every report prints it (`_tables.format_metric`): accuracy in
    percent ('12.32%'), the output cosine with six decimals ('0.999871'); '-' when not measured."""
    return format_metric(value, name)


def parse_kd(kd: str | Sequence[str]) -> tuple[str, ...]:
    """Knowledge kinds from "response,feature" or a sequence; duplicates dropped, order kept.

    Raises:
        BadOptionError: an unknown kind (the message lists the known ones).
    """
    items = kd.split(",") if isinstance(kd, str) else list(kd)
    kinds = tuple(dict.fromkeys(k.strip() for k in items if k.strip()))
    for kind in kinds:
        if kind not in KD_KINDS:
            raise BadOptionError(
                f"unknown knowledge kind '{kind}' (choose from {', '.join(KD_KINDS)})"
            )
    return kinds


def _as_model(model: ModelLike, role: str) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, (str, os.PathLike)):
        return sg_ir.load(model)
    raise BadOptionError(f"{role}: expected an onnx_ir.Model or a path, got {type(model).__name__}")


def _is_float(value: ir.Value) -> bool:
    dtype = value.dtype
    return dtype is None or dtype.is_floating_point()


def resolve_value(model: ir.Model, spec: str, *, role: str = "model") -> str:
    """The value a feature/relation spec names: a value name, or a torch layer's output.

    A torch layer `block1` (or `layers.0.fc1`) names the last float output, in graph order, of
    the nodes that layer (or any module inside it) produced.

    Raises:
        BadOptionError: no value and no layer of that name (the message lists the top-level
            layers and the graph outputs).
    """
    graph = model.graph
    for value in graph.inputs:
        if value.name == spec:
            return spec
    found: str | None = None
    for node in graph:
        for output in node.outputs:
            if output.name == spec:
                return spec
        layer = sg_ir.layer_name(node)
        if layer == spec or layer.startswith(spec + "."):
            for output in node.outputs:
                if output.name and _is_float(output):
                    found = output.name
    if found is None:
        layers = sorted({sg_ir.layer_name(n).split(".")[0] for n in graph} - {""})
        outputs = [v.name for v in graph.outputs if v.name]
        raise BadOptionError(
            f"{role}: no value or torch layer named '{spec}' (top-level layers: "
            f"{', '.join(layers) or 'none recorded'}; graph outputs: {', '.join(outputs)})"
        )
    return found


def _default_feature_layers(model: ir.Model, teacher: ir.Model) -> list[str]:
    """Top-level torch layers of the student (in graph order) whose output is not a graph
    output and that the teacher also has."""
    outputs = {v.name for v in model.graph.outputs}
    teacher_layers = {sg_ir.layer_name(n).split(".")[0] for n in teacher.graph}
    layers: list[str] = []
    for node in model.graph:
        top = sg_ir.layer_name(node).split(".")[0]
        if top and top not in layers and top in teacher_layers:
            layers.append(top)
    chosen = [
        layer for layer in layers
        if resolve_value(model, layer) not in outputs
    ]  # fmt: skip
    if not chosen:
        raise BadOptionError(
            "feature KD: the model records no torch layers to match; name values with "
            "feature_layers (--feature-layers)"
        )
    return chosen


def _is_qdq(model: ir.Model) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.domain in ("", "ai.onnx")
               for n in model.graph.all_nodes())  # fmt: skip


def biases_before_batchnorm(model: ir.Model) -> list[str]:
    """Float bias initializers of Conv/ConvTranspose/Gemm whose output feeds only BatchNorm.

    In training mode BatchNormalization subtracts each channel's batch mean, so such a bias gets
    exactly zero gradient: it is left out of training (torch's conv backward with a trainable
    bias is also markedly slower). Its value is kept as it is.
    """
    names: list[str] = []
    for node in model.graph:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 3:
            continue
        bias = node.inputs[2]
        if bias is None or not bias.is_initializer() or not bias.name:
            continue
        if node.op_type == "Gemm" and bias.shape is not None and len(bias.shape) != 1:
            continue
        consumers = [(user, index) for user, index in node.outputs[0].uses()]
        if consumers and all(user.op_type == "BatchNormalization" and index == 0
                             for user, index in consumers) and node.outputs[0] not in \
                model.graph.outputs:  # fmt: skip
            if len(bias.uses()) == 1:
                names.append(bias.name)
    return names


def _check_same_inputs(model: ir.Model, teacher: ir.Model) -> None:
    mine = [(s.name, s.dtype) for s in input_specs(model)]
    theirs = [(s.name, s.dtype) for s in input_specs(teacher)]
    if sorted(mine, key=str) != sorted(theirs, key=str):
        def text(specs: list[tuple[str, Any]]) -> str:
            return ", ".join(f"{n} ({np.dtype(d).name})" for n, d in specs)

        raise BadOptionError(
            f"the teacher's inputs ({text(theirs)}) differ from the model's ({text(mine)})"
        )


def _training_data(
    data: DataLike, model: ir.Model, labels: str, epochs: int
) -> tuple[LabelledData | None, Iterable[Mapping[str, np.ndarray]] | None]:
    if isinstance(data, (LabelledData, str, os.PathLike, Mapping)):
        return as_data(data, model, labels=labels), None
    if isinstance(data, Iterable):
        if isinstance(data, Iterator) and epochs > 1:
            raise BadOptionError(
                "data: a one-shot iterator feeds one epoch only; give a list of feed dicts, "
                "a re-iterable or an .npz file"
            )
        return None, data
    raise BadDataError(
        f"data: expected an .npz path, stacked arrays or an iterable of feed dicts, got "
        f"{type(data).__name__}"
    )


def _validation_data(val: DataLike | None, model: ir.Model, labels: str) -> LabelledData | None:
    if val is None:
        return None
    if isinstance(val, Mapping) and not isinstance(val, LabelledData):
        return split_labels(val, model, labels=labels, source="val")
    if isinstance(val, (LabelledData, str, os.PathLike)):
        return as_data(val, model, labels=labels)
    raise BadDataError(
        f"val: expected an .npz path or stacked arrays, got {type(val).__name__}"
    )


def _check_labels(data: LabelledData | None, model: ir.Model, source: str) -> None:
    """Labels given as `LabelledData` (not read through `split_labels`) checked the same way."""
    if data is not None and data.labels is not None:
        check_label_range(model, data.labels, source)


def _reference_outputs(
    reference: ir.Model, student: ir.Model, data: LabelledData
) -> dict[str, np.ndarray]:
    """The reference model's graph outputs on `data`, keyed by the student's output names."""
    session = create_session(reference)
    parts: list[list[np.ndarray]] = [[] for _ in student.graph.outputs]
    for feed, _ in data.batches(256):
        outputs = list(run(session, feed).values())
        for i in range(len(parts)):
            parts[i].append(outputs[i])
    return {v.name: np.concatenate(p) for v, p in zip(student.graph.outputs, parts, strict=True)
            if v.name}  # fmt: skip


def _freeze(module: Any, initializers: Sequence[str]) -> None:
    """Leave the parameters holding these initializers out of training."""
    frozen = set(initializers)
    if not frozen:
        return
    paths = {path for path, name in module.weight_names().items() if name in frozen}
    for path, parameter in module.named_parameters():
        if path in paths:
            parameter.requires_grad_(False)
    logger.info("not trained (bias before BatchNorm, zero gradient): %s", sorted(frozen))


@dataclass(frozen=True, kw_only=True)
class FinetuneOptions:
    """The keywords of `slimgraph.finetune` and `finetune_with_report`: one list, one set of
    defaults (the public `slimgraph.FinetuneOptions`).

    Attributes:
        labels, teacher, kd, scheme, epochs, batch_size, lr, val, seed, learn_scales: as
            `finetune` describes them.
        optimizer, weight_decay, schedule: "adamw" or "sgd", its weight decay, the learning-rate
            schedule (see `torch_backend.TrainOptions`).
        temperature, alpha: response KD: the softmax temperature, and the weight of the KD term
            against the label loss.
        feature_layers, feature_weight, feature_loss: feature KD: torch layer or value names
            (default every top-level layer), the loss weight, and "mse" or "cosine" (for
            embeddings: distil a sentence encoder's last hidden state without labels).
        unfold_batchnorm: convolutions whose BatchNorm was folded away train with batch
            statistics, folded back exactly at the end (see `torch_backend._batchnorm`).
        relation_layer, relation_weights: relation KD: the layer or value (default the first
            output) and the (distance, angle) weights.
        ema_decay: the moving-average decay of scheme "self".
        progress: a progress bar (None: only on a terminal).
        on_epoch: called with each epoch's `EpochRecord`.
    """

    labels: str = DEFAULT_LABELS
    teacher: ModelLike | None = None
    kd: str | Sequence[str] = ("response",)
    scheme: str = "offline"
    epochs: int = TrainOptions.epochs
    batch_size: int = TrainOptions.batch_size
    lr: float | None = TrainOptions.lr
    optimizer: str = TrainOptions.optimizer
    weight_decay: float = TrainOptions.weight_decay
    schedule: str = TrainOptions.schedule
    temperature: float = TrainOptions.temperature
    alpha: float = TrainOptions.alpha
    feature_layers: Sequence[str] | None = None
    feature_weight: float = TrainOptions.feature_weight
    feature_loss: str = TrainOptions.feature_loss
    unfold_batchnorm: bool = TrainOptions.unfold_batchnorm
    relation_layer: str | None = None
    relation_weights: tuple[float, float] = TrainOptions.relation_weights
    ema_decay: float = TrainOptions.ema_decay
    val: DataLike | None = None
    seed: int = TrainOptions.seed
    learn_scales: bool = False
    progress: bool | None = TrainOptions.progress
    on_epoch: Callable[[EpochRecord], None] | None = None


def run_finetune(
    model: ModelLike, data: DataLike, o: FinetuneOptions
) -> tuple[ir.Model, FinetuneReport]:
    """Train a copy of `model` on `data` as `o` says (see `slimgraph.finetune`, which runs
    this, as does the pipeline's `finetune` step).

    Returns:
        (trained model, `FinetuneReport`).

    Raises: as `slimgraph.finetune`.
    """
    start = time.perf_counter()
    kinds = parse_kd(o.kd)
    if o.scheme not in SCHEMES:
        raise BadOptionError(f"unknown scheme '{o.scheme}' (choose from {', '.join(SCHEMES)})")
    require_torch()
    from slimgraph.runtime.torch_backend._train import (
        ArrayBatches,
        EmaTeacher,
        ModuleTeacher,
        OrtTeacher,
        StreamBatches,
        Taps,
        Teacher,
        Validation,
        train,
    )

    trained_by = {f.name: getattr(o, f.name) for f in dataclasses.fields(TrainOptions)}
    trained_by["relation_weights"] = (float(o.relation_weights[0]), float(o.relation_weights[1]))
    options = TrainOptions(**trained_by)
    options.check()
    student_model = _as_model(model, "model")
    teacher_model = None if o.teacher is None else _as_model(o.teacher, "teacher")
    if o.scheme == "online" and teacher_model is None:
        raise BadOptionError("scheme 'online' trains a teacher alongside: give a teacher model")
    if o.scheme == "self" and teacher_model is not None:
        raise BadOptionError(
            "scheme 'self' distils from the model's own moving average: give no teacher"
        )
    if teacher_model is None and o.scheme == "offline":
        extra = [k for k in kinds if k != "response"]
        if extra:
            raise BadOptionError(
                f"kd '{extra[0]}' needs a teacher (give one, or use scheme 'self')"
            )
    if teacher_model is not None:
        _check_same_inputs(student_model, teacher_model)
    arrays, stream = _training_data(data, student_model, o.labels, o.epochs)
    _check_labels(arrays, student_model, arrays.source if arrays is not None else "data")
    val_data = _validation_data(o.val, student_model, o.labels)
    _check_labels(val_data, student_model, val_data.source if val_data is not None else "val")
    batches = (ArrayBatches(arrays, o.batch_size) if arrays is not None
               else StreamBatches(stream, student_model, o.labels))  # type: ignore[arg-type]
    if teacher_model is None and not batches.has_labels:
        source = arrays.source if arrays is not None else "data"
        if o.scheme == "self":
            # The moving average starts as the model itself: without labels the two agree and
            # the distillation loss has no gradient, so nothing would be learned.
            raise BadOptionError.worded(
                "nothing to learn from: scheme 'self' needs labels (its teacher, the model's own "
                "moving average, starts equal to the model and only steadies what labels "
                "teach), and {source} has no labels ('{key}'): add them ({labels} names their "
                "key) or give a teacher ({teacher}) with scheme 'offline' or 'online'",
                source=source, key=o.labels, labels=("labels=", "--labels KEY"),
                teacher=("teacher=", "--teacher MODEL"))
        raise BadOptionError(
            f"nothing to learn from: {source} has no labels ('{o.labels}') and there is no teacher"
        )
    used = kinds if (teacher_model is not None or o.scheme == "self") else ()
    # What the losses read, in the student and in the teacher.
    peer = teacher_model if teacher_model is not None else student_model
    logits = (student_model.graph.outputs[0].name or "", peer.graph.outputs[0].name or "")
    features: list[tuple[str, str]] = []
    if "feature" in used:
        specs = list(o.feature_layers) if o.feature_layers else _default_feature_layers(
            student_model, peer)  # fmt: skip
        features = [(resolve_value(student_model, s, role="model"),
                     resolve_value(peer, s, role="teacher")) for s in specs]  # fmt: skip
    relation = None
    if "relation" in used:
        relation = ((resolve_value(student_model, o.relation_layer, role="model"),
                     resolve_value(peer, o.relation_layer, role="teacher"))
                    if o.relation_layer else logits)  # fmt: skip
    taps = Taps(logits, tuple(features), relation)
    graph_outputs = [v.name or "" for v in student_model.graph.outputs]
    extra = [s for s, _ in features if s not in graph_outputs]
    if relation is not None and relation[0] not in graph_outputs:
        extra.append(relation[0])
    extra = list(dict.fromkeys(extra))
    student = lower(student_model, extra_outputs=extra, learn_scales=o.learn_scales)
    _freeze(student, biases_before_batchnorm(student_model))
    teacher_runner: Teacher | None = None
    if o.scheme == "offline" and teacher_model is not None:
        ort_teacher = OrtTeacher(teacher_model, taps.teacher_names())
        if arrays is not None and o.epochs > 0:
            ort_teacher.cache(arrays)
        teacher_runner = ort_teacher
    elif o.scheme == "online":
        assert teacher_model is not None
        peer_graph = [v.name or "" for v in teacher_model.graph.outputs]
        peer_extra = [t for t in taps.teacher_names() if t not in peer_graph]
        peer_module = lower(teacher_model, extra_outputs=peer_extra)
        _freeze(peer_module, biases_before_batchnorm(teacher_model))
        teacher_runner = ModuleTeacher(peer_module)
    elif o.scheme == "self":
        teacher_runner = EmaTeacher(student, o.ema_decay)
    validation = None
    teacher_val = None
    if val_data is not None:
        reference = None
        if val_data.labels is None:
            reference = _reference_outputs(peer, student_model, val_data)
        elif teacher_model is not None:
            teacher_val = evaluate(teacher_model, val_data).accuracy
        validation = Validation(val_data, graph_outputs, reference)
    history = train(student, batches, options, taps=taps, kd=used, teacher=teacher_runner,
                    validation=validation, on_epoch=o.on_epoch, model=student_model)  # fmt: skip
    # No epoch beat the input on validation: hand the input back, byte for byte.
    trained = (sg_ir.copy_model(student_model) if history.kept == 0
               else write_back(student_model, student))  # fmt: skip
    report = FinetuneReport(
        scheme=o.scheme,
        kd=tuple(k for k in used if k != "feature" or features),
        epochs=o.epochs,
        samples=arrays.samples if arrays is not None else None,
        features=features,
        relation=relation,
        qat=_is_qdq(student_model),
        learn_scales=o.learn_scales,
        teacher_val=teacher_val,
        history=history,
        seconds=time.perf_counter() - start,
    )
    return trained, report
