"""One-node models of any domain for the op-table tests (built with `onnx.helper`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MS", "F", "I32", "I64", "U8", "node_model"]

MS = "com.microsoft"
F, I32, I64, U8 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8


def node_model(
    op_type: str,
    feeds: Mapping[str, np.ndarray],
    constants: Sequence[np.ndarray | None] = (),
    out_types: Sequence[int] = (F,),
    *,
    domain: str = "",
    opset: int = 21,
    inputs: Sequence[str | None] | None = None,
    **attributes: object,
) -> ir.Model:
    """`op_type` reading the graph inputs `feeds` then the initializers `constants` (None: an
    empty optional input), or the names `inputs` in that order (graph inputs by their feed
    names, initializers as c0, c1, ...; None: empty). Outputs y0, y1, ... of `out_types` (0:
    an output left unnamed). `opset` for the ONNX domain; com.microsoft is version 1."""
    initializers = []
    names: list[str] = list(feeds)
    for i, value in enumerate(constants):
        if value is None:
            names.append("")
            continue
        initializers.append(numpy_helper.from_array(np.asarray(value), f"c{i}"))
        names.append(f"c{i}")
    if inputs is not None:
        names = [name or "" for name in inputs]
    while names and names[-1] == "":
        names.pop()
    outputs = [f"y{i}" if t else "" for i, t in enumerate(out_types)]
    node = helper.make_node(op_type, names, outputs, name="node0", domain=domain, **attributes)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for n, v in feeds.items()],
        [helper.make_tensor_value_info(n, t, None)
         for n, t in zip(outputs, out_types, strict=True) if n],
        initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    return ir.from_proto(helper.make_model(graph, opset_imports=opsets, ir_version=10))
