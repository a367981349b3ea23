"""Convolution, pooling and Resize kernels of the op table.

Pads follow ONNX ([b1, b2, ..., e1, e2, ...], auto_pad SAME_UPPER/SAME_LOWER/VALID); asymmetric
pads are applied by F.pad before the torch op. Resize implements the nearest and linear modes with
every coordinate transformation exporters write (half_pixel, pytorch_half_pixel, align_corners,
asymmetric, tf_half_pixel_for_nn), axis by axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir
import torch
from torch.nn import functional as F

from slimgraph.runtime.torch_backend._ops._registry import (
    Kernel,
    LowerContext,
    Tensor,
    attr,
    ints,
    op,
    unsupported,
)

__all__ = ["conv_kernel"]



def _auto_pads(
    auto_pad: str, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
    dilations: Sequence[int],
) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] for SAME_UPPER/SAME_LOWER/VALID."""
    rank = len(spatial)
    if auto_pad == "VALID":
        return [0] * (2 * rank)
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else total - small)
        end.append(total - small if auto_pad == "SAME_UPPER" else small)
    return begin + end


def _torch_pads(pads: Sequence[int]) -> list[int]:
    """ONNX [b1, b2, e1, e2] to F.pad's [b2, e2, b1, e1] (last axis first)."""
    rank = len(pads) // 2
    out: list[int] = []
    for i in range(rank - 1, -1, -1):
        out += [pads[i], pads[i + rank]]
    return out


class _Window:
    """Kernel, strides, dilations and pads of a Conv or pooling node."""

    def __init__(self, node: ir.Node, kernel: Sequence[int] | None) -> None:
        self.kernel = list(kernel) if kernel is not None else None
        rank = len(self.kernel) if self.kernel is not None else None
        self.strides = attr(node, "strides")
        self.dilations = attr(node, "dilations")
        self.auto_pad = attr(node, "auto_pad", "NOTSET")
        self.pads = attr(node, "pads")
        self.rank = rank

    def resolve(self, x: Tensor, kernel: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        rank = len(kernel)
        strides = self.strides or [1] * rank
        dilations = self.dilations or [1] * rank
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
            pads = _auto_pads(self.auto_pad, x.shape[2:], kernel, strides, dilations)
        else:
            pads = self.pads or [0] * (2 * rank)
        return list(strides), list(dilations), list(pads)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@op("Conv")
def conv_kernel(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    window = _Window(node, attr(node, "kernel_shape"))
    group = attr(node, "group", 1)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, w = xs[0], xs[1]
        b = xs[2] if len(xs) > 2 else None
        rank = w.dim() - 2
        strides, dilations, pads = window.resolve(x, w.shape[2:])
        if pads[:rank] == pads[rank:]:
            padding: Any = pads[:rank]
        else:
            x, padding = F.pad(x, _torch_pads(pads)), 0
        return [_CONV[rank](x, w, b, strides, padding, dilations, group)]

    return run


@op("ConvTranspose")
def _conv_transpose(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    window = _Window(node, attr(node, "kernel_shape"))
    group = attr(node, "group", 1)
    output_padding = attr(node, "output_padding")
    output_shape = attr(node, "output_shape")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, w = xs[0], xs[1]
        b = xs[2] if len(xs) > 2 else None
        rank = w.dim() - 2
        kernel = list(w.shape[2:])
        strides = window.strides or [1] * rank
        dilations = window.dilations or [1] * rank
        extra = output_padding or [0] * rank
        full = [(x.shape[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
                for i in range(rank)]
        if output_shape is not None or window.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            target = (list(output_shape)[-rank:] if output_shape is not None
                      else [x.shape[2 + i] * strides[i] for i in range(rank)])
            total = [full[i] + extra[i] - target[i] for i in range(rank)]
            if window.auto_pad == "SAME_UPPER":
                begin = [t // 2 for t in total]
            else:
                begin = [t - t // 2 for t in total]
            pads = begin + [t - bg for t, bg in zip(total, begin, strict=True)]
        elif window.auto_pad == "VALID":
            pads = [0] * (2 * rank)
        else:
            pads = window.pads or [0] * (2 * rank)
        symmetric = pads[:rank] == pads[rank:] and all(
            0 <= e < max(s, d) for e, s, d in zip(extra, strides, dilations, strict=True)
        )
        if symmetric:
            return [_CONV_T[rank](x, w, b, strides, pads[:rank], extra, group, dilations)]
        y = _CONV_T[rank](x, w, None, strides, 0, 0, group, dilations)
        crop: list[int] = []
        for i in range(rank - 1, -1, -1):
            crop += [-pads[i], -pads[i + rank] + extra[i]]
        y = F.pad(y, crop)
        if b is not None:
            y = y + b.reshape(1, -1, *([1] * rank))
        return [y]

    return run


class _PoolWindow(_Window):
    """The window of a pooling node: its kernel is the `kernel_shape` attribute (a Conv's is its
    weight's shape), and `ceil_mode` rounds the output size up."""

    def __init__(self, node: ir.Node) -> None:
        super().__init__(node, attr(node, "kernel_shape"))
        self.pool_kernel: list[int] = list(attr(node, "kernel_shape"))
        self.ceil = bool(attr(node, "ceil_mode", 0))

    def resolve_pool(self, x: Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
        """Kernel, strides, dilations and ONNX pads for input `x`."""
        return self.pool_kernel, *self.resolve(x, self.pool_kernel)


_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


@op("MaxPool")
def _max_pool(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    window = _PoolWindow(node)
    ceil = window.ceil
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
        raise unsupported(node, "the Indices output")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        kernel, strides, dilations, pads = window.resolve_pool(x)
        rank = len(kernel)
        if pads[:rank] == pads[rank:] and all(
            p <= (k - 1) * d // 2 for p, k, d in zip(pads[:rank], kernel, dilations, strict=True)
        ):
            return [_MAXPOOL[rank](x, kernel, strides, pads[:rank], dilations, ceil)]
        x = F.pad(x, _torch_pads(pads), value=-math.inf)
        return [_MAXPOOL[rank](x, kernel, strides, 0, dilations, ceil)]

    return run


def _sum_pool(x: Tensor, kernel: list[int], strides: list[int], ceil: bool) -> Tensor:
    rank = len(kernel)
    if rank == 1:
        return _sum_pool(x.unsqueeze(-1), kernel + [1], strides + [1], ceil).squeeze(-1)
    pool = F.avg_pool2d if rank == 2 else F.avg_pool3d
    return pool(x, kernel, strides, 0, ceil, True, 1)


@op("AveragePool")
def _avg_pool(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    window = _PoolWindow(node)
    ceil = window.ceil
    include_pad = bool(attr(node, "count_include_pad", 0))
    if window.dilations and any(d != 1 for d in window.dilations):
        raise unsupported(node, "dilations")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        kernel, strides, _, pads = window.resolve_pool(x)
        rank = len(kernel)
        if not any(pads) and not ceil:
            pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[rank]
            return [pool(x, kernel, strides)]
        padded = F.pad(x, _torch_pads(pads))
        sums = _sum_pool(padded, kernel, strides, ceil)
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
        mask = F.pad(ones, _torch_pads(pads), value=1.0 if include_pad else 0.0)
        counts = _sum_pool(mask, kernel, strides, ceil)
        return [sums / counts]

    return run


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    mean = node.op_type == "GlobalAveragePool"

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        dims = list(range(2, x.dim()))
        return [x.mean(dims, keepdim=True) if mean else x.amax(dims, keepdim=True)]

    return run


# --- resize ------------------------------------------------------------------------------------


def _source_coords(mode: str, out: int, size: int, scale: float) -> Tensor:
    x = torch.arange(out, dtype=torch.float64)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out > 1 else torch.zeros(out, dtype=torch.float64)
    if mode == "align_corners":
        return x * (size - 1) / (out - 1) if out > 1 else torch.zeros(out, dtype=torch.float64)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    raise ValueError(mode)


_NEAREST = {
    "round_prefer_floor": lambda c: torch.ceil(c - 0.5),
    "round_prefer_ceil": lambda c: torch.floor(c + 0.5),
    "floor": torch.floor,
    "ceil": torch.ceil,
}


def _cubic(x: Tensor, axis: int, c: Tensor, a: float, exclude_outside: bool) -> Tensor:
    """Cubic convolution (Keys, 1981) along `axis` at source coordinates `c`: four taps around
    floor(c), indices clamped to the edge (or, with `exclude_outside`, taps outside dropped and
    the weights renormalized)."""
    size = x.shape[axis]
    base = torch.floor(c)
    t = c - base
    taps = [base.to(torch.int64) + k for k in (-1, 0, 1, 2)]
    distances = [1 + t, t, 1 - t, 2 - t]

    def weight(d: Tensor) -> Tensor:
        d = d.abs()
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return torch.where(d <= 1, near, far)

    weights = [weight(d) for d in distances]
    if exclude_outside:
        weights = [torch.where((i >= 0) & (i < size), w, 0.0) for i, w in zip(taps, weights,
                                                                              strict=True)]
        total = sum(weights)
        weights = [w / total for w in weights]
    shape = [1] * x.dim()
    shape[axis] = c.shape[0]
    out = None
    for index, w in zip(taps, weights, strict=True):
        term = x.index_select(axis, index.clamp(0, size - 1)) * w.to(x.dtype).reshape(shape)
        out = term if out is None else out + term
    assert out is not None
    return out


@op("GridSample")
def _grid_sample(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """4-D GridSample (bilinear/linear, nearest, bicubic/cubic; zeros, border or reflection
    padding) by torch's grid_sample, which follows the same definition."""
    mode = {"linear": "bilinear", "cubic": "bicubic"}.get(attr(node, "mode", "bilinear"),
                                                          attr(node, "mode", "bilinear"))
    padding, corners = attr(node, "padding_mode", "zeros"), bool(attr(node, "align_corners", 0))
    if mode not in ("bilinear", "nearest", "bicubic"):
        raise unsupported(node, f"mode '{mode}'")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        if xs[0].dim() != 4:
            raise unsupported(node, "a grid of other than 2 spatial dimensions")
        return [F.grid_sample(xs[0], xs[1], mode, padding, corners)]

    return run


@op("Resize", "Upsample")
def _resize(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    mode = attr(node, "mode", "nearest")
    legacy = node.op_type == "Upsample" or opset < 11
    coord = "asymmetric" if legacy else attr(node, "coordinate_transformation_mode", "half_pixel")
    nearest = "floor" if legacy else attr(node, "nearest_mode", "round_prefer_floor")
    cubic_a, exclude_outside = attr(node, "cubic_coeff_a", -0.75), attr(node, "exclude_outside", 0)
    antialias = attr(node, "antialias", 0)
    if mode not in ("nearest", "linear", "bilinear", "cubic") or coord not in (
        "half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn"
    ) or nearest not in _NEAREST:
        raise unsupported(node, f"mode '{mode}' with '{coord}' coordinates")
    policy = attr(node, "keep_aspect_ratio_policy", "stretch")
    if attr(node, "axes") is not None or policy != "stretch":
        raise unsupported(node, "axes or keep_aspect_ratio_policy")
    scales_attr = attr(node, "scales") if node.op_type == "Upsample" and opset < 9 else None

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        scales: list[Any] | None
        sizes: list[int] | None
        if scales_attr is not None:
            scales, sizes = list(scales_attr), None
        elif legacy:
            scales, sizes = xs[1].reshape(-1).tolist(), None
        else:
            scales_t = xs[2] if len(xs) > 2 else None
            sizes_t = xs[3] if len(xs) > 3 else None
            given = scales_t is not None and scales_t.numel()
            scales = scales_t.reshape(-1).tolist() if given and scales_t is not None else None
            sizes = ints(sizes_t) if sizes_t is not None and sizes_t.numel() else None
        if scales is None and sizes is None:
            raise unsupported(node, "neither scales nor sizes")
        for axis in range(x.dim()):
            size = x.shape[axis]
            if sizes is not None:
                out, scale = sizes[axis], sizes[axis] / size
            else:
                assert scales is not None
                scale = float(scales[axis])
                out = int(math.floor(size * scale))
            if out == size and scale == 1.0:
                continue
            if antialias and scale < 1.0 and mode != "nearest":
                raise unsupported(node, "antialiased downsampling")
            c = _source_coords(coord, out, size, scale)
            if mode == "cubic":
                x = _cubic(x, axis, c, cubic_a, bool(exclude_outside))
                continue
            if mode == "nearest":
                idx = _NEAREST[nearest](c).clamp(0, size - 1).to(torch.int64)
                x = x.index_select(axis, idx)
                continue
            c = c.clamp(0, size - 1)
            lo = torch.floor(c).to(torch.int64)
            hi = torch.clamp(lo + 1, max=size - 1)
            frac = (c - lo).to(x.dtype)
            shape = [1] * x.dim()
            shape[axis] = out
            frac = frac.reshape(shape)
            x = x.index_select(axis, lo) * (1 - frac) + x.index_select(axis, hi) * frac
        return [x]

    return run
