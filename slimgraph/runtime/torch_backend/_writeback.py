"""Write-back: trained values from a `LoweredModel` into a copy of the model's initializers."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BadOptionError
from slimgraph.ir import copy_model

if TYPE_CHECKING:
    from slimgraph.runtime.torch_backend._lower import LoweredModel

__all__ = ["write_back"]

logger = logging.getLogger(__name__)


def write_back(model: ir.Model, lowered: LoweredModel) -> ir.Model:
    """A copy of `model` whose initializers hold `lowered`'s current values.

    Float weights keep their names, dtypes and shapes; BatchNormalization running statistics are
    written; integer weights read by DequantizeLinear are re-quantized with their own scale and
    zero point (round half to even, saturating); learned activation scales go into their scale
    initializers. Nothing else changes (node and value names, metadata, opsets, ops). An
    initializer whose bytes did not change keeps its original tensor, so
    `write_back(m, lower(m))` is an exact round trip.

    Args:
        model: the model `lowered` was built from (not modified).
        lowered: the trained module.

    Returns:
        The new model.

    Raises:
        BadOptionError: `lowered` holds a value for an initializer `model` does not have, or of
            another shape.
    """
    out = copy_model(model)
    initializers = out.graph.initializers
    changed = 0
    for name, array in lowered.trained_values().items():
        value = initializers.get(name)
        if value is None or value.const_value is None:
            raise BadOptionError(f"the lowered module holds '{name}', which the model lacks")
        old = value.const_value
        if tuple(old.shape) != array.shape:
            raise BadOptionError(
                f"'{name}' has shape {tuple(array.shape)} in the lowered module, "
                f"{tuple(old.shape)} in the model"
            )
        old_array = old.numpy()
        if old_array.dtype == array.dtype and old_array.tobytes() == array.tobytes():
            continue
        value.const_value = ir.Tensor(
            np.array(array, order="C"), dtype=old.dtype, name=name,
            doc_string=old.doc_string, metadata_props=dict(old.metadata_props),
        )
        changed += 1
    logger.debug("write_back: %d of %d initializers changed", changed, len(initializers))
    return out
