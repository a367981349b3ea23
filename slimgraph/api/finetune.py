"""`slimgraph.finetune`: train a copy of a model's own weights on labels and/or a teacher.

The training run is `slimgraph.runtime.finetune.run_finetune` (the torch backend: lower, train,
write back); its options are `FinetuneOptions` and its report `FinetuneReport`. Here: the verb
and its `*_with_report` twin, taking keywords or `options=`.
"""

from __future__ import annotations

import onnx_ir as ir

from slimgraph.api._options import takes_options
from slimgraph.runtime.finetune import (
    DataLike,
    FinetuneOptions,
    FinetuneReport,
    ModelLike,
    run_finetune,
)

__all__ = ["FinetuneOptions", "FinetuneReport", "finetune", "finetune_with_report"]


@takes_options(FinetuneOptions)
def finetune_with_report(
    model: ModelLike, data: DataLike, *, options: FinetuneOptions
) -> tuple[ir.Model, FinetuneReport]:
    """`finetune`, also returning the `FinetuneReport` (history, metrics, what was matched).

    Args: as for `finetune`; the keywords are the fields of `FinetuneOptions` (`on_epoch`
    among them, called with each epoch's `EpochRecord`).

    Returns:
        (trained model, `FinetuneReport`).

    Raises: as for `finetune`.
    """
    return run_finetune(model, data, options)


@takes_options(FinetuneOptions)
def finetune(model: ModelLike, data: DataLike, *, options: FinetuneOptions) -> ir.Model:
    """Train a copy of `model` on labels and/or a teacher and return it (the input is untouched).

    Takes its options as keywords or as `options=` a `FinetuneOptions`; keywords given with
    `options=` replace its fields.

    Args:
        model: an `onnx_ir.Model` or an .onnx path; a QDQ model is trained quantization-aware
            (fake quantization, straight-through gradient) and keeps its op multiset.
        data: an .npz path of the model's inputs (+ `labels`), stacked arrays, a `LabelledData`,
            or a re-iterable of feed dicts (one batch each, labels under the same key).
        labels: the labels key (int class indices, one per row); optional with a teacher.
        teacher: a model or path with the same inputs (offline: run in onnxruntime; online:
            trained alongside). None: labels only, or the model's own EMA with scheme "self".
        kd: knowledge kinds, any of "response", "feature", "relation" (or "response,feature").
        scheme: "offline", "online" or "self".
        epochs, batch_size, lr: optimization (AdamW, cosine decay; `optimizer="sgd"`).
            `lr=None` (the default) measures it with a short learning-rate range test.
        val: held-out data (path or arrays): accuracy, or output cosine to the teacher (or to the
            input model) without labels, before training and after every epoch. The best
            epoch's weights are handed back; if no epoch beats the input, the input is.
        seed: same seed, same result.
        learn_scales: learn activation quantization scales (LSQ) in QAT.
        optimizer, weight_decay, schedule, temperature, alpha, feature_layers, feature_weight,
            feature_loss, unfold_batchnorm, relation_layer, relation_weights, ema_decay,
            progress, on_epoch: the other fields of `FinetuneOptions`, where each is described.
        options: a `FinetuneOptions` instead of (or under) the keywords.

    Returns:
        The trained model: same graph, names, metadata and op multiset; new initializer values.

    Raises:
        BadOptionError: impossible options, nothing to learn from (no labels, no teacher), a
            feature layer that is not there, a teacher with other inputs, a NaN loss (naming
            the epoch and step).
        BadDataError: data that does not fit the model, labels outside its classes.
        MissingExtraError: torch is not installed (`pip install 'slimgraph[torch]'`).
        UnsupportedModelError: an op the backend cannot lower, a QOperator model (train the QDQ
            form).
        TypeError: an unknown keyword, or `options` that is not a `FinetuneOptions`.

    Example:
        >>> recovered = sg.finetune(pruned, "train.npz", teacher=original, epochs=10)
        ... # doctest: +SKIP
    """
    return run_finetune(model, data, options)[0]
