"""CP decomposition of 2-D convolutions: 1x1 -> Kx1 depthwise -> 1xK depthwise -> 1x1.

Source: Lebedev et al. 2015, "Speeding-up Convolutional Neural Networks Using Fine-tuned
CP-Decomposition" (seed 001, "CP Decomposition"). A Conv weight W (C_out, C_in, Kh, Kw) is
approximated by a sum of R rank-one terms

    W[o, i, h, w] ~= sum_r A[o, r] B[i, r] C[h, r] D[w, r]

found by alternating least squares (`cp_als`), which the graph computes as four convolutions:
1x1 with weight B^T (C_in -> R), Kh x 1 depthwise with C^T (R groups: strides, dilations and pads
of the height axis), 1 x Kw depthwise with D^T (the width axis), and 1x1 with A (R -> C_out, the
original bias). The first conv has no bias, so zero padding commutes with it and the chain equals
the conv whose weight is the CP reconstruction, exactly.

Ranks: a fixed `rank`; `rank_ratio` of the cost-equal rank, the smaller of
C_out C_in Kh Kw / (C_in + Kh + Kw + C_out), at which the chain holds as many parameters as the
conv, and the rank at which it costs as many MACs (counted at each factor's own spatial size: the
first 1x1 at the input's, the Kx1 at the output's height and input's width, the rest at the
output's; with a stride the first 1x1 costs up to stride^2 times more per rank), so that a ratio
is about the share of the layer's cost kept; or "auto"
(multiples of 16 that make the chain cheaper by the auto margin). A ratio's rank of 16 or more
is rounded to a multiple of 16: the rank is the depthwise convs' group count, and onnxruntime's
blocked kernels want it aligned (measured: a 64->64 3x3 conv at 8x8, batch 256, ran at 0.35x
of the conv's time at rank 64 and at 0.84x at rank 69). The rank is clipped to
`exact_rank(shape)`, the smallest product of three of the four mode sizes: at that rank the
factors are written down exactly (one mode's unfolding against one-hot indicators of the other
three), with no iteration.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BadOptionError
from slimgraph.ir import analysis
from slimgraph.passes.lowrank._base import FactorizationPass, Layer, LayerReport
from slimgraph.passes.lowrank._linear import blas_threads, relative_error
from slimgraph.passes.lowrank._rank import AUTO_RANK_MULTIPLE, aligned_rank
from slimgraph.passes.lowrank._tucker import mode_basis
from slimgraph.passes.registry import register_pass

__all__ = ["CPConv", "cp_als", "cp_reconstruct", "exact_rank"]

# ALS stops when the relative error changes by less than this between sweeps, or after
# CP_MAX_ITERATIONS sweeps.
CP_TOLERANCE = 1e-6
CP_MAX_ITERATIONS = 100

# ... and at most CP_WORK / (weight size x rank) sweeps (at least CP_MIN_ITERATIONS), so that a
# 512x512x3x3 kernel at rank 1000 takes seconds, not minutes; fine-tuning recovers the rest.
CP_WORK = 5e9
CP_MIN_ITERATIONS = 10

Factors = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def exact_rank(shape: tuple[int, ...]) -> int:
    """The smallest product of three of the four mode sizes: a CP rank that always suffices."""
    return min(math.prod(shape) // size for size in shape)


def cp_reconstruct(factors: Factors) -> np.ndarray:
    """sum_r A[:, r] x B[:, r] x C[:, r] x D[:, r], shape (C_out, C_in, Kh, Kw)."""
    a, b, c, d = factors
    return np.einsum("or,ir,hr,wr->oihw", a, b, c, d, optimize=True)


def _exact(weight: np.ndarray) -> Factors:
    """Factors of rank `exact_rank`: the mode with the largest size keeps its unfolding, the other
    three get one-hot indicator columns (one column per index triple)."""
    shape = weight.shape
    keep = int(np.argmax(shape))
    rest = [axis for axis in range(4) if axis != keep]
    rank = math.prod(shape[axis] for axis in rest)
    factors: list[np.ndarray] = [np.empty(0)] * 4
    factors[keep] = np.moveaxis(weight, keep, 0).reshape(shape[keep], rank)
    grids = np.unravel_index(np.arange(rank), [shape[axis] for axis in rest])
    for axis, index in zip(rest, grids, strict=True):
        onehot = np.zeros((shape[axis], rank))
        onehot[index, np.arange(rank)] = 1.0
        factors[axis] = onehot
    return factors[0], factors[1], factors[2], factors[3]


def _initial(weight: np.ndarray, rank: int, seed: int) -> list[np.ndarray]:
    """HOSVD initialization: the leading left singular vectors of each mode's unfolding, padded
    with seeded random columns where the mode is narrower than the rank."""
    rng = np.random.default_rng(seed)
    factors = []
    for mode, size in enumerate(weight.shape):
        basis = mode_basis(weight, mode)[0][:, :rank]
        if basis.shape[1] < rank:
            extra = rng.standard_normal((size, rank - basis.shape[1])) / math.sqrt(size)
            basis = np.concatenate([basis, extra], axis=1)
        factors.append(basis)
    return factors


def cp_als(
    weight: np.ndarray,
    rank: int,
    *,
    iterations: int = CP_MAX_ITERATIONS,
    tolerance: float = CP_TOLERANCE,
    seed: int = 0,
) -> Factors:
    """Rank-`rank` CP factors (A: C_out x R, B: C_in x R, C: Kh x R, D: Kw x R) of a 4-D weight.

    Alternating least squares from a HOSVD initialization (Kolda & Bader 2009, sec. 3.4): each
    factor in turn solves its linear least-squares problem with the other three fixed (the
    matricized tensor times the Khatri-Rao product of the others, against the Hadamard product of
    their Gram matrices). Stops when the relative error changes by less than `tolerance`, or
    after `iterations` sweeps (fewer for large kernels: `CP_WORK`). At
    `rank >= exact_rank(shape)` the exact factors are returned directly. The columns are balanced
    (each factor's columns have the same norm) so that float32 storage loses nothing.
    Computed in float64.

    Raises:
        ValueError: a weight that is not 4-D, or a rank below 1.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4:
        raise ValueError(f"CP of a conv needs a 4-D weight, got {w.ndim}-D")
    if rank < 1:
        raise ValueError(f"CP rank must be >= 1, got {rank}")
    if rank >= exact_rank(w.shape):
        return _balance(_exact(w))
    factors = _initial(w, rank, seed)
    iterations = min(iterations, max(CP_MIN_ITERATIONS, int(CP_WORK / (w.size * rank))))
    squared_norm = float(np.sum(w * w)) or 1.0
    previous = math.inf
    with blas_threads(1):
        for _ in range(iterations):
            kernel = None
            for mode in range(4):
                others = [m for m in range(4) if m != mode]
                if mode == 2:  # the kernel modes share one contraction of both channel modes
                    kernel = _kernel_product(w, factors[0], factors[1])
                mttkrp = (_mttkrp(w, factors, mode) if kernel is None
                          else np.einsum("hwr,wr->hr", kernel, factors[3]) if mode == 2
                          else np.einsum("hwr,hr->wr", kernel, factors[2]))
                gram = np.ones((rank, rank))
                for m in others:
                    gram *= factors[m].T @ factors[m]
                factors[mode] = _solve(gram, mttkrp)
            # ||W - X||^2 = ||W||^2 - 2 <W, X> + ||X||^2, from the last mode's products
            inner = float(np.sum(factors[3] * mttkrp))
            model = float(np.sum(gram * (factors[3].T @ factors[3])))
            error = math.sqrt(max(squared_norm - 2 * inner + model, 0.0) / squared_norm)
            if abs(previous - error) < tolerance * max(error, 1e-12) or error < 1e-7:
                break
            previous = error
    return _balance((factors[0], factors[1], factors[2], factors[3]))


def _kernel_product(w: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Q[h, w, r] = sum_oi W[o, i, h, w] A[o, r] B[i, r] (Kh x Kw x R): both kernel modes' MTTKRP
    follow from it with one small product each, so one sweep contracts the whole tensor three
    times instead of four (memory: C_in x Kh x Kw x R, as `_mttkrp`)."""
    partial = np.tensordot(a, w, axes=(0, 0))  # (r, i, h, w)
    return np.einsum("rihw,ir->hwr", partial, b)


def _mttkrp(w: np.ndarray, factors: list[np.ndarray], mode: int) -> np.ndarray:
    """The mode-`mode` unfolding of `w` times the Khatri-Rao product of the other factors
    (size x R), without forming that product: the largest other mode is contracted first by a
    matrix product, then the others one axis at a time (memory: the tensor's size / that mode's
    size x R)."""
    others = sorted((m for m in range(4) if m != mode), key=lambda m: -w.shape[m])
    first = others[0]
    # (remaining axes in order..., R)
    partial = np.tensordot(w, factors[first], axes=(first, 0))
    axes = [m for m in range(4) if m != first]
    for m in others[1:]:
        position = axes.index(m)
        shape = [1] * (partial.ndim - 1) + [partial.shape[-1]]
        shape[position] = w.shape[m]
        partial = np.sum(partial * factors[m].reshape(shape), axis=position)
        axes.remove(m)
    return partial  # (size of `mode`, R)


def _solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """rhs @ pinv(gram) for a symmetric positive semi-definite `gram` (R x R)."""
    try:
        return np.linalg.solve(gram, rhs.T).T
    except np.linalg.LinAlgError:
        return rhs @ np.linalg.pinv(gram, hermitian=True)


# The last CP_CACHE_SIZE decompositions by (weight digest, rank): a rank allocation factorizes the
# same layer at the same rank once to measure it and again in every model it builds.
CP_CACHE_SIZE = 64
_cache: OrderedDict[tuple[str, tuple[int, ...], int], Factors] = OrderedDict()


def _cached_als(weight: np.ndarray, rank: int) -> Factors:
    """`cp_als(weight, rank)`, remembered for the last `CP_CACHE_SIZE` (weight, rank) pairs."""
    key = (hashlib.sha1(np.ascontiguousarray(weight).tobytes()).hexdigest(), weight.shape, rank)
    found = _cache.get(key)
    if found is None:
        found = cp_als(weight, rank)
        _cache[key] = found
        while len(_cache) > CP_CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return found


def _balance(factors: Factors) -> Factors:
    """Rescale each rank-one term so its four vectors have equal norms (same product)."""
    norms = np.stack([np.linalg.norm(f, axis=0) for f in factors])  # (4, R)
    scale = np.prod(norms, axis=0) ** 0.25
    safe = np.where(norms > 0, norms, 1.0)
    a, b, c, d = (f * (scale / s) for f, s in zip(factors, safe, strict=True))
    return a, b, c, d


@register_pass("cp-conv", exact=False)
class CPConv(FactorizationPass):
    """Replace group-1 2-D Conv layers by the CP chain of four convs (approximate).

    See the module docstring for the algebra. Skipped with the reason: grouped and depthwise
    convs, 1-D and 3-D convs, 1x1 convs (no spatial kernel to split), `auto_pad` SAME_* (the pads
    depend on the input size), non-constant weights (an error for a layer named by `include`) and
    layers whose factors would not hold fewer parameters or cost fewer MACs (or, with "auto", not
    be faster), unless `allow_growth`. Tied weights are
    decomposed once.

    Raises:
        BadOptionError: `energy` or `error_budget` (rules on singular values, which a CP
            decomposition has none of).

    Example:
        >>> result = CPConv(rank=16)(model)  # doctest: +SKIP
    """

    default_ops = ("Conv",)

    def __init__(
        self,
        *,
        rank_ratio: float | None = None,
        rank: int | Literal["auto"] | None = None,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        allow_growth: bool = False,
        layer_ratios: Mapping[str, float] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(rank_ratio=rank_ratio, rank=rank, include=include, exclude=exclude,
                         allow_growth=allow_growth, layer_ratios=layer_ratios, **options)
        if self.policy.energy is not None or self.policy.error_budget is not None:
            raise BadOptionError(
                "--method cp takes --rank-ratio or --rank: --energy and --error-budget choose "
                "ranks from singular values, which a CP decomposition has none of"
            )

    def factorize_layer(self, graph: ir.Graph, layer: Layer) -> LayerReport | str:
        node = layer.node
        if node.op_type != "Conv":
            return f"{node.op_type} is not a convolution"
        group = node.attributes.get_int("group", 1)
        if group != 1:
            return f"grouped or depthwise conv (group={group}): CP would mix the groups"
        auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
        if auto_pad not in ("NOTSET", "VALID"):
            return f"auto_pad {auto_pad}: the pads depend on the input size"
        inputs = list(node.inputs)
        weight = self.constant_weight(layer, inputs[1] if len(inputs) > 1 else None, "weight")
        if isinstance(weight, str):
            return weight
        if weight.ndim != 4:
            return f"{weight.ndim - 2}-D conv: CP splits 2-D kernels only"
        if weight.shape[2] * weight.shape[3] == 1:
            return "1x1 (pointwise) conv: no spatial kernel to split"
        weight_value = inputs[1]
        assert weight_value is not None
        bias = inputs[2] if len(inputs) > 2 else None
        bias_params = 0 if bias is None or bias.const_value is None else bias.const_value.size
        c_out, c_in, kh, kw = weight.shape
        macs_before, rows = self._rows(layer, c_in, c_out)

        def cost(rank: int) -> tuple[int, int | None]:
            params = rank * (c_in + kh + kw + c_out) + bias_params
            if rows is None:
                return params, None
            rows_in, rows_mid, rows_out = rows
            return params, (rows_in * c_in * rank + rows_mid * rank * kh
                            + rows_out * rank * (kw + c_out))

        params_before = c_out * c_in * kh * kw + bias_params
        limit = exact_rank(weight.shape)
        cached = self.cache.get(("cp", id(weight_value)))
        if cached is not None:
            first, cached_values = cached
            values = tuple(v for v in cached_values if v is not None)
            params_after, macs_after = cost(first.rank[0])
            report = self.layer_report(
                layer, "cp", weight.shape, first.rank, (params_before, params_after),
                (macs_before, macs_after), first.weight_error, shared_with=first.layer,
            )
            self._rewrite(graph, layer, values, bias)
            return report
        equal_rank = c_out * c_in * kh * kw / (c_in + kh + kw + c_out)
        if rows is not None and macs_before:  # MACs per unit of rank: cost is linear in it
            rows_in, rows_mid, rows_out = rows
            equal_rank = min(equal_rank, macs_before / (
                rows_in * c_in + rows_mid * kh + rows_out * (kw + c_out)))
        rank_or_reason = self._rank(equal_rank, limit, params_before, macs_before, cost)
        if isinstance(rank_or_reason, str):
            return rank_or_reason
        rank = rank_or_reason
        params_after, macs_after = cost(rank)
        reason = self.gate(params_before, params_after, macs_before, macs_after)
        if reason is not None:
            return reason
        w = weight.astype(np.float64)
        a, b, c, d = _cached_als(w, rank)
        dtype = weight.dtype
        approximation = cp_reconstruct(
            tuple(f.astype(dtype).astype(np.float64) for f in (a, b, c, d))  # type: ignore[arg-type]
        )
        error = relative_error(w, approximation)
        self.record(layer, approximation, weight)
        base = weight_value.name or f"{node.name}.weight"
        arrays = (
            b.T.reshape(rank, c_in, 1, 1), c.T.reshape(rank, 1, kh, 1),
            d.T.reshape(rank, 1, 1, kw), a.reshape(c_out, rank, 1, 1),
        )
        values = tuple(
            self.initializer(f"{base}.{suffix}", array.astype(dtype))
            for array, suffix in zip(arrays, _SUFFIXES, strict=True)
        )
        report = self.layer_report(
            layer, "cp", weight.shape, (rank,), (params_before, params_after),
            (macs_before, macs_after), error,
        )
        self._rewrite(graph, layer, values, bias)
        self.cache[("cp", id(weight_value))] = (report, values)
        return report

    def _rank(
        self, equal_rank: float, limit: int, params_before: int, macs_before: int | None,
        cost: object,
    ) -> int | str:
        """The CP rank the policy asks for (clipped to the exact rank), or why there is none.
        `equal_rank` is the cost-equal rank: the smaller of the ranks at which the chain holds as
        many parameters and costs as many MACs as the conv."""
        assert callable(cost)
        policy = self.policy
        if policy.auto_only:
            for rank in range(int(equal_rank) // AUTO_RANK_MULTIPLE * AUTO_RANK_MULTIPLE, 0,
                              -AUTO_RANK_MULTIPLE):
                params, macs = cost(min(rank, limit))
                if self.gate(params_before, params, macs_before, macs) is None:
                    return min(rank, limit)
            return "auto: no rank makes this conv cheaper by the auto margin"
        if policy.rank_ratio is not None:
            rank = max(1, math.floor(policy.rank_ratio * equal_rank + 0.5))
            if rank >= AUTO_RANK_MULTIPLE:  # the depthwise convs' groups (module docstring)
                rank = aligned_rank(rank, limit)
        elif isinstance(policy.rank, int):
            rank = policy.rank
        else:  # energy / error_budget are refused in __init__
            return "no CP rank rule"
        if policy.auto:
            rank = aligned_rank(rank, limit)
        return min(rank, limit)

    def _rows(
        self, layer: Layer, c_in: int, c_out: int
    ) -> tuple[int | None, tuple[int, int, int] | None]:
        """The conv's MACs and the rows (batch x positions) entering the chain, after the Kx1
        conv (output height, input width) and leaving it."""
        twin = layer.twin
        if twin is None:
            return None, None
        source = analysis.static_shape(twin.inputs[0])
        result = analysis.static_shape(twin.outputs[0])
        macs = analysis.node_macs(twin)
        if not source or not result or len(source) != 4 or len(result) != 4:
            return macs, None
        batch, _, _, width = source
        _, _, height_out, width_out = result
        return macs, (math.prod(source) // c_in, batch * height_out * width,
                      batch * height_out * width_out)

    def _rewrite(
        self, graph: ir.Graph, layer: Layer, values: tuple[ir.Value, ...],
        bias: ir.Value | None,
    ) -> None:
        """Insert the four convs; height attributes on the Kx1, width ones on the 1xK."""
        node = layer.node
        rank = values[0].const_value.shape[0] if values[0].const_value is not None else None
        strides = _ints(node, "strides", [1, 1])
        dilations = _ints(node, "dilations", [1, 1])
        pads = _ints(node, "pads", [0, 0, 0, 0])
        if node.attributes.get_string("auto_pad", "NOTSET") == "VALID":
            pads = [0, 0, 0, 0]
        kh, kw = values[1].shape[2], values[2].shape[3]  # type: ignore[index]
        attributes: tuple[dict[str, object], ...] = (
            {"kernel_shape": [1, 1]},
            {"kernel_shape": [kh, 1], "group": rank, "strides": [strides[0], 1],
             "dilations": [dilations[0], 1], "pads": [pads[0], 0, pads[2], 0]},
            {"kernel_shape": [1, kw], "group": rank, "strides": [1, strides[1]],
             "dilations": [1, dilations[1]], "pads": [0, pads[1], 0, pads[3]]},
            {"kernel_shape": [1, 1]},
        )
        current = node.inputs[0]
        new_nodes = []
        for index, (value, suffix, attrs) in enumerate(
            zip(values, _SUFFIXES, attributes, strict=True)
        ):
            inputs: list[ir.Value | None] = [current, value]
            if index == 3 and bias is not None:
                inputs.append(bias)
            conv = self.new_node(node, suffix, "Conv", inputs, attrs)
            new_nodes.append(conv)
            current = conv.outputs[0]
        self.replace(graph, node, new_nodes)


_SUFFIXES = ("cp_in", "cp_height", "cp_width", "cp_out")


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    attribute = node.attributes.get(name)
    return list(attribute.as_ints()) if attribute is not None else list(default)
