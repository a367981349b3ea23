"""onnxruntime sessions with explicit threads, optimization level and no spinning workers.

This module is the one home of "an onnxruntime session": it imports onnxruntime on first use
(`onnxruntime_module()`), so importing slimgraph, a pass or the runtime package imports no
onnxruntime until a session is created. `is_session` tells a session apart without importing it.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal, TypeGuard

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BadDataError, BadOptionError, UnsupportedModelError
from slimgraph.ir import load_proto, save, tensor_bytes
from slimgraph.ir._save import inlined_external_data, without_initializer_value_info

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "OptLevel",
    "create_session",
    "run",
    "model_bytes",
    "onnxruntime_module",
    "is_session",
    "level_name",
]

OptLevel = Literal["disable", "basic", "extended", "all"]

# slimgraph's level names -> members of onnxruntime's GraphOptimizationLevel (looked up on use).
_LEVELS: dict[OptLevel, str] = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def onnxruntime_module() -> ModuleType:
    """The `onnxruntime` module, imported on first use (a dependency of the core, not an extra).

    Returns:
        The imported module.
    """
    return importlib.import_module("onnxruntime")


def is_session(value: object) -> TypeGuard[ort.InferenceSession]:
    """True when `value` is an `onnxruntime.InferenceSession`; never imports onnxruntime.

    No object can be a session before onnxruntime was imported, so an unimported onnxruntime
    answers False without loading it.
    """
    module = sys.modules.get("onnxruntime")
    return module is not None and isinstance(value, module.InferenceSession)


def level_name(level: ort.GraphOptimizationLevel) -> OptLevel | None:
    """slimgraph's name ("disable", "basic", "extended", "all") of an onnxruntime level, or None."""
    members = onnxruntime_module().GraphOptimizationLevel
    for name, member in _LEVELS.items():
        if getattr(members, member) == level:
            return name
    return None


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
            each other's cores (docs/architecture.md, "Runtime").
        optimization: onnxruntime's graph optimization level.
    """
    if optimization not in _LEVELS:
        raise BadOptionError(
            f"unknown optimization level '{optimization}' (choose from {', '.join(_LEVELS)})"
        )
    onnxruntime = onnxruntime_module()
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = getattr(
        onnxruntime.GraphOptimizationLevel, _LEVELS[optimization]
    )
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 4  # fatal only: errors reach the user once, as our message
    providers = ["CPUExecutionProvider"]
    if not isinstance(model, ir.Model):
        load_proto(model)  # the safe loader's checks (external data, structure) come first
        return onnxruntime.InferenceSession(str(model), options, providers=providers)
    if tensor_bytes(model) < _IN_MEMORY_LIMIT:
        return onnxruntime.InferenceSession(model_bytes(model), options, providers=providers)
    with tempfile.TemporaryDirectory(prefix="slimgraph-session-") as folder:
        path = Path(folder) / "model.onnx"
        save(model, path, external_data=True)
        return onnxruntime.InferenceSession(str(path), options, providers=providers)


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
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    names = [output.name for output in session.get_outputs()]
    try:
        # an empty optional input (None) is an input not given
        outputs = session.run(names, {k: v for k, v in feeds.items() if v is not None})
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
