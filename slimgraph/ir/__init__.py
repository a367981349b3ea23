"""The IR layer: `onnx_ir` models in and out, safely, plus the analysis slimgraph needs.

`onnx_ir` is the IR; this package adds the safe loader, the atomic saver, the torch frontend and
read-only analysis (dataflow view, weights, MACs). It imports nothing of slimgraph but `errors`.
"""

from __future__ import annotations

from slimgraph.ir import analysis, metadata
from slimgraph.ir._causal_lm import from_torch_causal_lm
from slimgraph.ir._copy import copy_model
from slimgraph.ir._dims import io_shapes, restore_dim_names
from slimgraph.ir._load import ModelLike, as_model, load, load_proto
from slimgraph.ir._save import save, size_on_disk, tensor_bytes
from slimgraph.ir._torch import from_torch
from slimgraph.ir.names import annotate_layers, display_name, layer_name

__all__ = [
    "analysis",
    "metadata",
    "copy_model",
    "io_shapes",
    "restore_dim_names",
    "ModelLike",
    "as_model",
    "load",
    "load_proto",
    "save",
    "size_on_disk",
    "tensor_bytes",
    "from_torch",
    "from_torch_causal_lm",
    "annotate_layers",
    "layer_name",
    "display_name",
]
