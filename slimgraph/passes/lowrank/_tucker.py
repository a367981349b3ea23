"""`TuckerConv`: a k x k convolution becomes 1x1 -> k x k core -> 1x1 (Tucker-2).

For a weight W of shape (C_out, C_in, kh, kw), HOSVD on the two channel modes takes U_out, the
first r_out left singular vectors of the mode-0 unfolding W_(0) (C_out x C_in*kh*kw), and U_in,
the first r_in of the mode-1 unfolding W_(1) (C_in x C_out*kh*kw). The core is
G = W x_0 U_out^T x_1 U_in^T, of shape (r_out, r_in, kh, kw), and

    W ~ G x_0 U_out x_1 U_in,   ||W - W~||_F^2 <= sum(dropped s_(0)^2) + sum(dropped s_(1)^2)

(De Lathauwer et al., 2000). As convolutions: a 1x1 conv with weight U_in^T (C_in -> r_in, no
bias), the core conv G (r_in -> r_out, the original strides, pads, dilations, auto_pad), and a
1x1 conv with weight U_out (r_out -> C_out, the original bias). Zero padding commutes with the
first 1x1 conv because it has no bias, so the chain equals the conv with weight W~ exactly.
A mode kept at its full width (r_in = C_in or r_out = C_out) takes the identity basis, so its
1x1 conv is left out (Tucker-1), unless both are full and `allow_growth` asks for the chain.

A 1x1 conv has no spatial core; with `pointwise=True` it is split by SVD into two 1x1 convs
(the first keeps strides and pads), as a linear layer would be.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from slimgraph.ir import analysis
from slimgraph.passes.lowrank._base import FactorizationPass, Layer, LayerReport
from slimgraph.passes.lowrank._linear import (
    auto_rank,
    blas_threads,
    relative_error,
    split_factors,
    svd_factors,
)
from slimgraph.passes.lowrank._rank import AUTO_RANK_MULTIPLE, aligned_rank
from slimgraph.passes.registry import register_pass

__all__ = ["TuckerConv", "tucker2", "mode_basis"]

# Attributes of the original Conv that only the spatial (core) conv keeps.
_SPATIAL_ATTRIBUTES = ("strides", "pads", "dilations", "auto_pad")


def tucker2(
    weight: np.ndarray, r_out: int, r_in: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HOSVD factors (U_out: C_out x r_out, core: r_out x r_in x k..., U_in: C_in x r_in)."""
    w = np.asarray(weight, dtype=np.float64)
    u_out = mode_basis(w, 0)[0][:, :r_out]
    u_in = mode_basis(w, 1)[0][:, :r_in]
    return u_out, _mode_products(w, u_out.T, u_in.T), u_in


def mode_basis(weight: np.ndarray, mode: int) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors and singular values of the mode-`mode` unfolding (descending).

    Computed from the eigen-decomposition of the small Gram matrix W_(mode) W_(mode)^T
    (C x C) rather than an SVD of the wide unfolding (C x everything else).
    """
    w = np.asarray(weight, dtype=np.float64)
    unfolding = np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)
    with blas_threads(1):
        values, vectors = np.linalg.eigh(unfolding @ unfolding.T)
    order = np.argsort(values)[::-1]
    singular = np.sqrt(np.clip(values[order], 0.0, None))
    return vectors[:, order], singular


def _mode_products(tensor: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """tensor x_0 left x_1 right: (a, b, k...) with left (o, a) and right (i, b) -> (o, i, k...)."""
    first = np.tensordot(left, tensor, axes=(1, 0))  # (o, b, k...)
    return np.moveaxis(np.tensordot(right, first, axes=(1, 1)), 0, 1)  # (o, i, k...)


def _reconstruct(u_out: np.ndarray, core: np.ndarray, u_in: np.ndarray) -> np.ndarray:
    return _mode_products(core, u_out, u_in)


@register_pass("tucker-conv", exact=False)
class TuckerConv(FactorizationPass):
    """Replace group-1 Conv layers by a Tucker-2 chain of three convs (approximate).

    See the module docstring for the algebra. Ranks (r_in, r_out) come from the same rules as
    `LowRankLinear` applied to each channel mode: `rank_ratio` of C_in and C_out, `energy` of each
    unfolding, `error_budget` split evenly over the two modes' squared errors (so the bound
    above keeps the weight's relative error within the budget), a fixed `rank` for both, or
    "auto". Skipped with the reason: grouped and depthwise convs, non-constant weights (an error
    for a layer named by `include`), 1x1 convs unless `pointwise=True`, and layers whose factors
    would not be smaller (or, with "auto", not faster). Tied weights are factorized once.

    Example:
        >>> result = TuckerConv(rank_ratio=0.5)(model)  # doctest: +SKIP
    """

    default_ops = ("Conv",)

    def __init__(
        self, *, pointwise: bool = False, output_only: bool = False, **options: object
    ) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.pointwise = pointwise
        self.output_only = output_only  # `--method svd`: r_in = C_in, an SVD of W's mode-0

    def factorize_layer(self, graph: ir.Graph, layer: Layer) -> LayerReport | str:
        node = layer.node
        if node.op_type != "Conv":
            return f"{node.op_type} is not a convolution"
        inputs = list(node.inputs)
        group = node.attributes.get_int("group", 1)
        if group != 1:
            c_in_group = _weight_dim(inputs, 1)
            kind = "depthwise" if c_in_group == 1 else "grouped"
            return f"{kind} conv (group={group}): channel factors would mix the groups"
        weight = self.constant_weight(layer, inputs[1] if len(inputs) > 1 else None, "weight")
        if isinstance(weight, str):
            return weight
        if weight.ndim < 3:
            return f"weight has {weight.ndim} dimensions; a Conv weight needs at least 3"
        kernel = math.prod(weight.shape[2:])
        if kernel == 1 and not self.pointwise:
            return ("1x1 (pointwise) conv: no spatial core; pointwise=True (--pointwise-convs) "
                    "splits it by SVD")
        weight_value = inputs[1]
        assert weight_value is not None
        bias = inputs[2] if len(inputs) > 2 else None
        bias_params = 0 if bias is None or bias.const_value is None else bias.const_value.size
        cached = self.cache.get(("conv", id(weight_value)))
        if cached is not None:
            first_report, factors = cached
            return self._rewrite(
                graph, layer, weight, factors, first_report, bias, first_report.layer
            )
        site = _ConvSite(layer, weight, bias, bias_params, self._spatial(layer, weight.shape[:2]))
        if kernel == 1:
            return self._pointwise(graph, site)
        return self._tucker(graph, site)

    # -- Tucker-2 ---------------------------------------------------------------------------

    def _tucker(self, graph: ir.Graph, site: _ConvSite) -> LayerReport | str:
        layer, weight, bias_params = site.layer, site.weight, site.bias_params
        c_out, c_in = weight.shape[:2]
        kernel = math.prod(weight.shape[2:])
        w = weight.astype(np.float64)
        basis_out, s_out = mode_basis(w, 0)
        basis_in, s_in = mode_basis(w, 1)
        s_out = s_out[: min(c_out, c_in * kernel)]
        s_in = s_in[: min(c_in, c_out * kernel)]
        macs_before, rows_in, rows_out = site.shapes

        def modes(r_in: int, r_out: int) -> tuple[bool, bool]:
            """Which 1x1 convs the chain needs: a mode kept at full width needs none."""
            use_in, use_out = r_in < c_in, r_out < c_out
            if not (use_in or use_out) and self.policy.allow_growth:
                return True, True  # full ranks on request: the whole chain, as a check
            return use_in, use_out

        def cost(r_in: int, r_out: int) -> tuple[int, int | None]:
            use_in, use_out = modes(r_in, r_out)
            params = r_out * r_in * kernel + bias_params
            params += (r_in * c_in if use_in else 0) + (c_out * r_out if use_out else 0)
            macs = None
            if rows_in is not None and rows_out is not None:
                macs = rows_out * r_in * r_out * kernel
                macs += (rows_in * c_in * r_in if use_in else 0)
                macs += (rows_out * r_out * c_out if use_out else 0)
            return params, macs

        params_before = c_out * c_in * kernel + bias_params
        if self.policy.auto_only:
            ranks = None
            step = AUTO_RANK_MULTIPLE
            for r_out in range(len(s_out) // step * step, 0, -step):
                r_in = c_in if self.output_only else aligned_rank(r_out * c_in / c_out,
                                                                   len(s_in))
                params, macs = cost(r_in, r_out)
                if self.gate(params_before, params, macs_before, macs) is None:
                    ranks = (r_in, r_out)
                    break
            if ranks is None:
                return "auto: no ranks make this conv cheaper by the auto margin"
            r_in, r_out = ranks
        else:
            share = 1.0 if self.output_only else 0.5
            r_out = self.policy.keep(s_out, budget_share=share)
            r_in = c_in if self.output_only else self.policy.keep(s_in, budget_share=share)
            if self.policy.auto:
                r_out = aligned_rank(r_out, len(s_out))
                r_in = c_in if self.output_only else aligned_rank(r_in, len(s_in))
        params_after, macs_after = cost(r_in, r_out)
        reason = self.gate(params_before, params_after, macs_before, macs_after)
        if reason is not None:
            return reason
        use_in, use_out = modes(r_in, r_out)
        dtype = weight.dtype
        ones = [1] * (weight.ndim - 2)
        # a mode kept whole uses the identity basis: W itself along it, and no 1x1 conv
        u_in = basis_in[:, :r_in].astype(dtype) if use_in else np.eye(c_in, dtype=dtype)
        u_out = basis_out[:, :r_out].astype(dtype) if use_out else np.eye(c_out, dtype=dtype)
        core = _mode_products(w, u_out.T.astype(np.float64), u_in.T.astype(np.float64))
        factors = (
            u_in.T.reshape(r_in, c_in, *ones) if use_in else None,
            core.astype(dtype),
            u_out.reshape(c_out, r_out, *ones) if use_out else None,
        )
        approx = _reconstruct(
            u_out.astype(np.float64), factors[1].astype(np.float64), u_in.astype(np.float64)
        )
        report = self.layer_report(
            layer, "svd" if self.output_only else "tucker2", weight.shape,
            (r_out,) if self.output_only else (r_in, r_out), (params_before, params_after),
            (macs_before, macs_after), relative_error(w, approx),
        )
        self.record(layer, approx, weight)
        return self._rewrite(graph, layer, weight, factors, report, site.bias, None)

    # -- 1x1 convs by SVD -------------------------------------------------------------------

    def _pointwise(self, graph: ir.Graph, site: _ConvSite) -> LayerReport | str:
        layer, weight, bias_params = site.layer, site.weight, site.bias_params
        c_out, c_in = weight.shape[:2]
        matrix = weight.reshape(c_out, c_in).astype(np.float64)
        u, s, vt = svd_factors(matrix)
        macs_before, _, rows_out = site.shapes
        k_or_reason = auto_rank(self.policy, s, c_out, c_in)
        if isinstance(k_or_reason, str):
            return k_or_reason
        k = k_or_reason
        params_before = c_out * c_in + bias_params
        params_after = k * (c_out + c_in) + bias_params
        macs_after = rows_out * k * (c_in + c_out) if rows_out is not None else None
        reason = self.gate(params_before, params_after, macs_before, macs_after)
        if reason is not None:
            return reason
        second, first, error = split_factors(matrix, (u, s, vt), k, weight.dtype)
        self.record(layer, second.astype(np.float64) @ first.astype(np.float64), weight)
        ones = [1] * (weight.ndim - 2)
        first, second = first.reshape(k, c_in, *ones), second.reshape(c_out, k, *ones)
        report = self.layer_report(
            layer, "svd", weight.shape, (k,), (params_before, params_after),
            (macs_before, macs_after), error,
        )
        return self._rewrite(graph, layer, weight, (first, second), report, site.bias, None)

    # -- shared -----------------------------------------------------------------------------

    def _rewrite(
        self,
        graph: ir.Graph,
        layer: Layer,
        weight: np.ndarray,
        factors: tuple[np.ndarray | ir.Value | None, ...],
        report: LayerReport,
        bias: ir.Value | None,
        shared_with: str | None,
    ) -> LayerReport:
        """Insert the chain of convs for `factors` (arrays, or values of a tied weight).

        Tucker-2 factors are (in, core, out), where a None 1x1 factor is left out; an SVD split
        of a 1x1 conv is (a, b), the first keeping strides and pads.
        """
        node = layer.node
        weight_value = node.inputs[1]
        assert weight_value is not None
        base = weight_value.name or f"{node.name}.weight"
        suffixes = ("tucker_in", "tucker_core", "tucker_out") if len(factors) == 3 else (
            "lowrank_a", "lowrank_b"
        )
        values = tuple(
            f if f is None or isinstance(f, ir.Value)
            else self.initializer(f"{base}.{suffix}", f)
            for f, suffix in zip(factors, suffixes, strict=True)
        )
        ones = [1] * (weight.ndim - 2)
        spatial = {
            name: attr.value
            for name, attr in node.attributes.items()
            if name in _SPATIAL_ATTRIBUTES
        }
        spatial["kernel_shape"] = list(weight.shape[2:])
        current = node.inputs[0]
        new_nodes = []
        chain = [(v, s) for v, s in zip(values, suffixes, strict=True) if v is not None]
        for index, (value, suffix) in enumerate(chain):
            last = index == len(chain) - 1
            inputs: list[ir.Value | None] = [current, value]
            if last and bias is not None:
                inputs.append(bias)
            if suffix == "tucker_core":
                attributes = spatial
            elif suffix == "lowrank_a":  # pointwise: the first conv keeps strides and pads
                attributes = {**spatial, "kernel_shape": ones}
            else:
                attributes = {"kernel_shape": ones}
            conv = self.new_node(node, suffix, "Conv", inputs, attributes)
            new_nodes.append(conv)
            current = conv.outputs[0]
        if shared_with is not None:
            macs_before = self._spatial(layer, weight.shape[:2])[0]
            same_cost = macs_before == report.macs_before
            report = dataclasses.replace(
                report,
                layer=layer.name,
                node=node.name or "",
                output=node.outputs[0].name or "",
                macs_before=macs_before,
                macs_after=report.macs_after if same_cost else None,
                shared_with=shared_with,
            )
        self.replace(graph, node, new_nodes)
        if shared_with is None:
            self.cache[("conv", id(weight_value))] = (report, values)
        return report

    def _spatial(
        self, layer: Layer, channels: tuple[int, ...]
    ) -> tuple[int | None, int | None, int | None]:
        """MACs of the conv, and rows (batch x spatial positions) of its input and output."""
        twin = layer.twin
        if twin is None:
            return None, None, None
        source = analysis.static_shape(twin.inputs[0])
        result = analysis.static_shape(twin.outputs[0])
        macs = analysis.node_macs(twin)
        rows_in = math.prod(source) // channels[1] if source and channels[1] else None
        rows_out = math.prod(result) // channels[0] if result and channels[0] else None
        return macs, rows_in, rows_out


@dataclasses.dataclass(frozen=True)
class _ConvSite:
    """A conv to factorize: its layer, constant weight (C_out, C_in, k...), bias, the bias's
    parameter count, and (MACs, input rows, output rows) at the analysed shapes."""

    layer: Layer
    weight: np.ndarray
    bias: ir.Value | None
    bias_params: int
    shapes: tuple[int | None, int | None, int | None]


def _weight_dim(inputs: list[ir.Value | None], axis: int) -> int | None:
    if len(inputs) < 2 or inputs[1] is None or inputs[1].shape is None:
        return None
    dim = inputs[1].shape[axis]
    return dim if isinstance(dim, int) else None
