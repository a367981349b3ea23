"""The torch backend: lower an ONNX graph to a trainable torch module and write weights back.

`lower(model)` turns an `onnx_ir.Model` into a `LoweredModel` (a `torch.nn.Module` that runs the
graph, weights as parameters, QuantizeLinear/DequantizeLinear as fake quantization with a
straight-through gradient); `write_back(model, lowered)` puts the trained values into a copy of the
model's initializers (docs/architecture.md, "The torch backend"). torch is imported only when
these are called.

Example:
    >>> from slimgraph.runtime.torch_backend import lower, write_back  # doctest: +SKIP
    >>> lowered = lower(model)  # doctest: +SKIP
    >>> trained = write_back(model, lowered)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from slimgraph._optional import require_torch  # the one check, naming slimgraph[torch]
from slimgraph.runtime.torch_backend._bn_bounds import (  # no torch
    ZERO_SHOT_METHOD,
    batchnorm_bounds,
    zero_shot_options,
)
from slimgraph.runtime.torch_backend._options import (  # no torch
    LearnedWeight,
    RoundingLayer,
    bias_scale_after,
)
from slimgraph.runtime.torch_backend._writeback import write_back  # needs no torch

if TYPE_CHECKING:
    from slimgraph.runtime.torch_backend._lower import LoweredModel

__all__ = [
    "require_torch",
    "lower",
    "write_back",
    "LoweredModel",
    "zero_shot_calibration",
    "batchnorm_bounds",
    "zero_shot_options",
    "ZERO_SHOT_METHOD",
    "learn_rounding",
    "RoundingLayer",
    "LearnedWeight",
    "bias_scale_after",
]


def lower(
    model: ir.Model, *, extra_outputs: Sequence[str] = (), learn_scales: bool = False
) -> LoweredModel:
    """Lower `model` to a trainable torch module (see `_lower.lower`)."""
    require_torch()
    from slimgraph.runtime.torch_backend import _lower

    return _lower.lower(model, extra_outputs=extra_outputs, learn_scales=learn_scales)


def zero_shot_calibration(
    model: ir.Model, *, samples: int = 64, steps: int = 200, seed: int = 0,
    batch_size: int = 32, time_budget: float | None = None, progress: bool | None = None,
) -> dict[str, np.ndarray]:
    """Synthetic calibration inputs matching the model's BatchNorm statistics, in batches of
    `batch_size`, each until its loss plateaus (at most `steps`), within `time_budget` seconds
    (see `_zeroshot.zero_shot_calibration`). Quantize with the options `quantize --zero-shot`
    takes for such rows: `sg.quantize(model, calibration=feeds, **zero_shot_options(model))`."""
    require_torch()
    from slimgraph.runtime.torch_backend import _zeroshot

    return _zeroshot.zero_shot_calibration(
        model, samples=samples, steps=steps, seed=seed, batch_size=batch_size,
        time_budget=time_budget, progress=progress,
    )


def learn_rounding(
    float_model: ir.Model, quantized: ir.Model, layers: Sequence[RoundingLayer],
    feeds: Mapping[str, np.ndarray], *, method: str, steps: int = 1000, batch_size: int = 32,
    lr: float | None = None, seed: int = 0,
) -> dict[str, LearnedWeight]:
    """AdaRound or AdaQuant of `layers` of a QDQ model, layer by layer (see `_rounding`)."""
    require_torch()
    from slimgraph.runtime.torch_backend import _rounding

    return _rounding.learn_rounding(float_model, quantized, layers, feeds, method=method,
                                    steps=steps, batch_size=batch_size, lr=lr, seed=seed)


def __getattr__(name: str) -> Any:
    if name == "LoweredModel":
        require_torch()
        from slimgraph.runtime.torch_backend._lower import LoweredModel

        return LoweredModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
