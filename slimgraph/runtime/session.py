"""onnxruntime sessions with explicit threads, optimization level and no spinning workers."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from slimgraph.errors import BadDataError, BadOptionError, UnsupportedModelError
from slimgraph.ir import load_proto, save, tensor_bytes
from slimgraph.ir._save import inlined_external_data, without_initializer_value_info

__all__ = ["OptLevel", "create_session", "run", "model_bytes"]

OptLevel = Literal["disable", "basic", "extended", "all"]

_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# Sessions built from bytes must stay under protobuf's 2 GB; larger models go through a file.
_IN_MEMORY_LIMIT = 1_500_000_000


def model_bytes(model: ir.Model) -> bytes:
    """The serialized model with every weight inline, for onnxruntime and size measurements.

    External tensors (from a model loaded with external data: initializers, Constant values, also
    in subgraphs) are read here and inlined, so the bytes stand alone.
    """
    with inlined_external_data(model), without_initializer_value_info(model):
        return ir.to_proto(model).SerializeToString()


def create_session(
    model: ir.Model | str | os.PathLike[str],
    *,
    threads: int | None = None,
    optimization: OptLevel = "all",
) -> ort.InferenceSession:
    """An onnxruntime CPU session for an IR model or an ONNX file.

    Args:
        model: an `onnx_ir.Model` or a path (checked by the safe loader before onnxruntime
            reads it).
        threads: intra-op threads; None uses every core. Worker threads never spin
            (`session.intra_op.allow_spinning = 0`), so sessions timed side by side do not steal
            each other's cores (DESIGN.md section 8).
        optimization: onnxruntime's graph optimization level.
    """
    if optimization not in _LEVELS:
        raise BadOptionError(
            f"unknown optimization level '{optimization}' (choose from {', '.join(_LEVELS)})"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[optimization]
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 4  # fatal only: errors reach the user once, as our message
    providers = ["CPUExecutionProvider"]
    if not isinstance(model, ir.Model):
        load_proto(model)  # the safe loader's checks (external data, structure) come first
        return ort.InferenceSession(str(model), options, providers=providers)
    if tensor_bytes(model) < _IN_MEMORY_LIMIT:
        return ort.InferenceSession(model_bytes(model), options, providers=providers)
    with tempfile.TemporaryDirectory(prefix="slimgraph-session-") as folder:
        path = Path(folder) / "model.onnx"
        save(model, path, external_data=True)
        return ort.InferenceSession(str(path), options, providers=providers)


def run(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run once and return outputs by name.

    Raises:
        BadDataError: onnxruntime rejected the feeds (missing or unknown names, wrong dtype or
            shape); the message lists what the session expects.
        UnsupportedModelError: onnxruntime failed while running (a shape the model cannot take);
            its own exception classes never reach the caller.
    """
    names = [output.name for output in session.get_outputs()]
    try:
        outputs = session.run(names, dict(feeds))
    except (InvalidArgument, ValueError) as error:
        expected = "; ".join(
            f"{i.name}: {i.type}{i.shape}".replace("'", "") for i in session.get_inputs()
        )
        detail = " ".join(str(error).split()).replace(
            "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ", ""
        )
        raise BadDataError(
            f"the inputs do not fit the model ({detail}); it expects {expected}"
        ) from None
    except Exception as error:  # onnxruntime's own classes (Fail, RuntimeException, ...)
        text = " ".join(str(error).split()).replace("[ONNXRuntimeError] : ", "")
        raise UnsupportedModelError(
            f"onnxruntime cannot run the model on these inputs: {text[:500]}"
        ) from None
    return dict(zip(names, outputs, strict=True))
