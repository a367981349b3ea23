"""Model copies that keep where the model came from.

`onnx_ir`'s `Model.clone()` (and a protobuf round trip) drop `Model.meta`, where `load` records
the files the model was read from; `save` refuses to write over those files only while it knows
them. Every copy slimgraph returns to a user goes through `copy_model`.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

__all__ = ["copy_model"]

logger = logging.getLogger(__name__)


def copy_model(model: ir.Model) -> ir.Model:
    """A copy sharing the weight tensors, with `model.meta` (source files) carried over.

    Copies through a protobuf when cloning fails (onnx_ir cannot clone an unsorted graph).
    The copy's values share their type objects with the original: to change an existing
    value's type assign `value.type = ir.TensorType(...)`; setting `value.dtype` would change
    the original model as well.
    """
    try:
        copy = model.clone()
    except Exception:  # noqa: BLE001 - onnx_ir cannot clone a graph that is not sorted
        logger.debug("model.clone() failed; copying through a protobuf")
        copy = ir.from_proto(ir.to_proto(model))
    copy.meta.update(model.meta)
    return copy
