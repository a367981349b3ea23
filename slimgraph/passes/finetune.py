"""The `finetune` pipeline step: recover accuracy inside a recipe.

A recipe can say prune -> finetune -> quantize -> finetune (QAT):

    passes:
      - {name: prune, ratio: 0.5}
      - {name: finetune, data: train.npz, epochs: 10, kd: [response, feature]}
      - {name: quantize, calibration: calib.npz}
      - {name: finetune, data: train.npz, epochs: 3, lr: 0.0001}

The teacher defaults to "input": the model the pipeline started from (before pruning), which
`run_pipeline` hands to every pass taking an `input_model` keyword. `teacher: null` trains on the
labels alone; a path names another model. Approximate (`exact=False`): the pipeline reports the
step's output fidelity; the result carries the validation metric before and after.

torch is imported only when the step runs (`slimgraph.runtime.finetune`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from slimgraph.errors import BadOptionError
from slimgraph.passes.base import SlimgraphFunctionalPass, SlimgraphPassResult
from slimgraph.passes.registry import register_pass
from slimgraph.runtime.finetune import SCHEMES, FinetuneOptions, parse_kd, run_finetune

__all__ = ["FinetunePass", "FinetuneResult"]


@dataclasses.dataclass
class FinetuneResult(SlimgraphPassResult):
    """The trained model plus the run's figures (shown in pipeline reports)."""

    epochs: int = 0
    scheme: str = "offline"
    metric: str | None = None
    val_before: float | None = None
    val_after: float | None = None
    seconds_per_epoch: float | None = None


@register_pass("finetune", exact=False, options=FinetuneOptions)
class FinetunePass(SlimgraphFunctionalPass):
    """Train the model's weights on data and/or a teacher (see `slimgraph.finetune`).

    Replaces initializer values only; nodes, names and the op multiset stay (a QDQ model is
    trained quantization-aware). Approximate.

    Args:
        data: training data (.npz path of the inputs plus labels).
        teacher: "input" (the pipeline's input model, the default), None (labels only), or a
            path to a teacher model.
        input_model: given by the pipeline (its input model); not set in recipes.
        **options: the keywords of `slimgraph.finetune` (labels, kd, scheme, epochs, batch_size,
            lr, val, seed, learn_scales, temperature, alpha, feature_layers, ...: the fields of
            `FinetuneOptions`); declared at registration (`options=`), so recipes are checked
            against them.

    Raises:
        BadOptionError: no data, a teacher "input" without a pipeline input model, bad options.
    """

    def __init__(
        self,
        *,
        data: str | os.PathLike[str] | None = None,
        teacher: str | os.PathLike[str] | ir.Model | None = "input",
        input_model: ir.Model | None = None,
        kd: str | Sequence[str] = ("response",),
        scheme: str = "offline",
        **options: Any,
    ) -> None:
        super().__init__()
        if data is None:
            raise BadOptionError("finetune needs training data: data: TRAIN.npz")
        if scheme not in SCHEMES:
            raise BadOptionError(f"unknown scheme '{scheme}' (choose from {', '.join(SCHEMES)})")
        if scheme == "self" and teacher == "input":
            teacher = None
        self.data = data
        self.teacher = teacher
        self.input_model = input_model
        self.kd = parse_kd(kd)
        self.scheme = scheme
        self.options = dict(options)
        self.options.setdefault("progress", False)

    def call(self, model: ir.Model) -> FinetuneResult:
        teacher: Any = self.teacher
        if isinstance(teacher, str) and teacher == "input":
            if self.input_model is None:
                raise BadOptionError(
                    "finetune: teacher 'input' needs the pipeline's input model; give a teacher "
                    "path or teacher: null"
                )
            teacher = self.input_model
        options = FinetuneOptions(teacher=teacher, kd=self.kd, scheme=self.scheme, **self.options)
        trained, report = run_finetune(model, self.data, options)
        return FinetuneResult(
            trained,
            modified=report.epochs > 0,
            epochs=report.epochs,
            scheme=report.scheme,
            metric=report.metric,
            val_before=report.before,
            val_after=report.after,
            seconds_per_epoch=report.seconds_per_epoch,
        )
