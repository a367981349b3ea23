"""`LowRankLinear`: a Gemm or MatMul with a constant weight becomes two thin products.

For y = x @ W (+ b) with W of shape n x m and SVD W = U S V^T, keeping the k largest singular
values gives W_k = A @ B with A = U_k sqrt(S_k) (n x k) and B = sqrt(S_k) V_k^T (k x m), the best
rank-k approximation in Frobenius and spectral norm (Eckart-Young). So

    y_k = (x @ A) @ B (+ b),   ||y - y_k||_F <= ||x||_2 * sqrt(sum_{i>k} s_i^2)
                                ||y - y_k||_F <= ||x||_F * s_{k+1}

for any batch or sequence dimensions of x. One layer of n*m weights becomes two of k(n+m) in all.
Gemm: W is alpha * op(B) (transB honoured), the first Gemm keeps transA, the second takes the
bias C with beta. MatMul: two MatMuls, so x may have any rank.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import onnx_ir as ir

from slimgraph.ir import analysis
from slimgraph.passes._kit import layout
from slimgraph.passes.lowrank._base import FactorizationPass, Layer, LayerReport
from slimgraph.passes.lowrank._rank import (
    AUTO_MAX_MACS_RATIO,
    AUTO_RANK_MULTIPLE,
    RankPolicy,
    aligned_rank,
)
from slimgraph.passes.registry import register_pass

__all__ = [
    "LowRankLinear",
    "svd_factors",
    "split_factors",
    "relative_error",
    "blas_threads",
    "auto_rank",
]


def svd_factors(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U, s, V^T of `matrix` in float64 (thin SVD)."""
    with blas_threads(1):
        return np.linalg.svd(np.asarray(matrix, dtype=np.float64), full_matrices=False)


def blas_threads(limit: int) -> contextlib.AbstractContextManager[object]:
    """Limit BLAS threads where threadpoolctl is installed (it comes with scikit-learn).

    OpenBLAS's threads spin while they wait; on a loaded machine an SVD then crawls (measured
    here: a 64 x 576 SVD took 6 ms on one thread, 280 ms on two), so decompositions run on one.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=limit, user_api="blas")


def split_factors(
    matrix: np.ndarray, svd: tuple[np.ndarray, np.ndarray, np.ndarray], k: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, float]:
    """The rank-`k` factors A (m x k) and B (k x n) of `matrix` from its `svd` (U, S, Vt), with
    sqrt(S) on each side (equal norms keep both well scaled in low precision), cast to `dtype`,
    and the relative error of A @ B against `matrix`."""
    u, s, vt = svd
    root = np.sqrt(s[:k])
    a = (u[:, :k] * root).astype(dtype)
    b = (root[:, None] * vt[:k]).astype(dtype)
    error = relative_error(matrix, a.astype(np.float64) @ b.astype(np.float64))
    return a, b, error


def relative_error(reference: np.ndarray, approximation: np.ndarray) -> float:
    """||reference - approximation||_F / ||reference||_F (0 for a zero reference)."""
    ref = np.asarray(reference, dtype=np.float64)
    norm = float(np.linalg.norm(ref))
    if norm == 0:
        return 0.0 if not np.any(approximation) else math.inf
    return float(np.linalg.norm(ref - np.asarray(approximation, dtype=np.float64)) / norm)


@register_pass("lowrank-linear", exact=False)
class LowRankLinear(FactorizationPass):
    """Split Gemm/MatMul layers with a constant weight into two rank-k products (approximate).

    Replaces `MatMul(x, W)` by `MatMul(MatMul(x, A), B)` and `Gemm(x, W, C)` by
    `Gemm(Gemm(x, A), B, C)` (see the module docstring for the algebra). Skipped, with the reason
    in the result: a weight that is not a constant (an error for a layer named by `include`), a
    constant on the left of a MatMul, weights that are not 2-D or not float, and layers where the
    factors would not be smaller (k(n+m) >= nm) or, with `rank="auto"`, not faster.

    A weight shared by several layers (tied) is factorized once; every layer reuses the factors.
    If some other node still reads the original weight, it stays in the model as well.

    Options (keyword-only): `rank_ratio`, `energy`, `error_budget` or `rank` (an int or "auto"),
    see `RankPolicy`; `include`/`exclude` fnmatch patterns on layer or node names; `op_types`
    (default Gemm, MatMul); `allow_growth`; `feeds` (sample inputs: the result then carries the
    model's fidelity and each layer's output SQNR); `dims` (symbolic input sizes for MACs).

    Example:
        >>> result = LowRankLinear(rank_ratio=0.25)(model)  # doctest: +SKIP
        >>> [(layer.layer, layer.rank) for layer in result.layers]  # doctest: +SKIP
    """

    default_ops = ("Gemm", "MatMul")

    def factorize_layer(self, graph: ir.Graph, layer: Layer) -> LayerReport | str:
        node = layer.node
        if node.op_type not in ("Gemm", "MatMul"):
            return f"{node.op_type} is not a linear layer"
        inputs = list(node.inputs)
        if len(inputs) < 2 or inputs[0] is None:
            return "missing inputs"
        x, weight_value = inputs[0], inputs[1]
        left_constant = x.const_value is not None
        if node.op_type == "MatMul" and left_constant and (
            weight_value is None or weight_value.const_value is None
        ):
            return "the constant is on the left (W @ x); only x @ W is factorized"
        weight = self.constant_weight(layer, weight_value, "weight")
        if isinstance(weight, str):
            return weight
        assert weight_value is not None
        if weight.ndim != 2:
            return f"weight has {weight.ndim} dimensions, not 2"
        gemm = node.op_type == "Gemm"
        trans_a = node.attributes.get_int("transA", 0) if gemm else 0
        trans_b = found.trans_b if (found := layout(node)) is not None else 0
        alpha = node.attributes.get_float("alpha", 1.0) if gemm else 1.0
        beta = node.attributes.get_float("beta", 1.0) if gemm else 1.0
        bias = inputs[2] if gemm and len(inputs) > 2 else None
        matrix = (weight.T if trans_b else weight).astype(np.float64) * alpha
        n, m = matrix.shape
        bias_params = _size(bias)
        macs_before = analysis.node_macs(layer.twin) if layer.twin is not None else None
        rows = macs_before // (n * m) if macs_before is not None and n * m else None

        key = ("svd", id(weight_value), trans_b, alpha)
        cached = self.cache.get(key)
        if cached is not None:
            first_report, (cached_a, cached_b) = cached
            assert cached_a is not None and cached_b is not None  # an SVD caches both factors
            a_value, b_value = cached_a, cached_b
            k = first_report.rank[0]
            error = first_report.weight_error
            shared_with: str | None = first_report.layer
        else:
            u, s, vt = svd_factors(matrix)
            k_or_reason = self._rank(s, n, m, rows, bias_params)
            if isinstance(k_or_reason, str):
                return k_or_reason
            k = k_or_reason
            reason = self.gate(
                n * m + bias_params,
                k * (n + m) + bias_params,
                macs_before,
                rows * k * (n + m) if rows is not None else None,
            )
            if reason is not None:
                return reason
            a, b, error = split_factors(matrix, (u, s, vt), k, weight.dtype)
            product = (a.astype(np.float64) @ b.astype(np.float64)) / alpha  # matrix's layout
            self.record(layer, product.T if trans_b else product, weight)
            base = weight_value.name or f"{node.name}.weight"
            a_value = self.initializer(f"{base}.lowrank_a", a)
            b_value = self.initializer(f"{base}.lowrank_b", b)
            shared_with = None

        if gemm:
            first, second = self._gemm_pair(graph, node, x, a_value, b_value, bias, trans_a, beta)
        else:
            first = self.new_node(node, "lowrank_a", "MatMul", [x, a_value])
            second = self.new_node(node, "lowrank_b", "MatMul", [first.outputs[0], b_value])
        report = self.layer_report(
            layer, "svd", weight.shape, (k,),
            (n * m + bias_params, k * (n + m) + bias_params),
            (macs_before, rows * k * (n + m) if rows is not None else None),
            error, shared_with,
        )
        self.replace(graph, node, [first, second])
        if shared_with is None:
            self.cache[key] = (report, (a_value, b_value))
        return report

    def _gemm_pair(
        self,
        graph: ir.Graph,
        node: ir.Node,
        x: ir.Value,
        a_value: ir.Value,
        b_value: ir.Value,
        bias: ir.Value | None,
        trans_a: int,
        beta: float,
    ) -> tuple[ir.Node, ir.Node]:
        """Gemm(x, A) then Gemm(h, B, C); MatMul where a Gemm would need no attribute.

        Before opset 11 Gemm requires C, so a product without bias or transpose is a MatMul
        (the same 2-D product), and the transA product gets a zero C.
        """
        old_gemm = graph.opset_imports.get("", 11) < 11
        if trans_a:
            inputs: list[ir.Value | None] = [x, a_value]
            if old_gemm:
                dtype = a_value.dtype.numpy() if a_value.dtype is not None else np.float32
                zero = np.zeros((1,), dtype=dtype)
                inputs.append(self.initializer(f"{a_value.name}.zero", zero))
            first = self.new_node(node, "lowrank_a", "Gemm", inputs, {"transA": 1})
        else:
            first = self.new_node(node, "lowrank_a", "MatMul", [x, a_value])
        if bias is None:
            second = self.new_node(node, "lowrank_b", "MatMul", [first.outputs[0], b_value])
        else:
            attributes = {"beta": beta} if beta != 1.0 else {}
            second = self.new_node(
                node, "lowrank_b", "Gemm", [first.outputs[0], b_value, bias], attributes
            )
        return first, second

    def _rank(
        self, singular: np.ndarray, n: int, m: int, rows: int | None, bias_params: int
    ) -> int | str:
        return auto_rank(self.policy, singular, n, m)


def auto_rank(policy: RankPolicy, singular: np.ndarray, n: int, m: int) -> int | str:
    """The rank for an n x m matrix; with "auto" aligned for fast kernels (or why none fits)."""
    if not policy.auto:
        return policy.keep(singular)
    if not policy.auto_only:
        return aligned_rank(policy.keep(singular), len(singular))
    # the largest aligned k whose MACs (and parameters) stay within the auto margin
    k = math.floor(AUTO_MAX_MACS_RATIO * n * m / (n + m))
    if k < AUTO_RANK_MULTIPLE:
        return f"auto: no rank that is a multiple of {AUTO_RANK_MULTIPLE} saves enough MACs"
    return aligned_rank(k, len(singular), down=True)


def _size(value: ir.Value | None) -> int:
    """Elements of a constant input (0 when absent or computed at run time)."""
    if value is None or value.const_value is None:
        return 0
    return math.prod(value.const_value.shape.numpy())
