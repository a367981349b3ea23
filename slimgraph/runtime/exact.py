"""The exact check: is an output unchanged within what an exact rewrite may move it?

The one home of that tolerance (the pipeline's verifier, quantization's preparation check and
opset upgrades all call `exact_difference`). A float32 output must stay within
`rtol * |ref| + atol * max(1, max|ref|)` (rtol 1e-4, atol 1e-5; docs/architecture.md, "Passes");
a narrower float type cannot hold that: fp16 has 11 significant bits, so a rewrite that rounds
once more (a folded constant, a reordered sum) moves a value by an ulp of 2^-11 relative, five
times the float32 rtol. Its bound is `ULPS` units in the last place of its own type instead,
relative and at the output's scale. Integers, booleans and strings must be equal. Sequences
(lists) compare element by element, optional values (None when empty) only equal None.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DEFAULT_RTOL", "DEFAULT_ATOL", "ULPS", "dtype_tolerance", "exact_difference"]

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5  # relative to max(1, max |reference output|)

# Units in the last place of a float type an exact rewrite may move an output by, at the output's
# scale: what the fp16 expansions of the onnx backend suite's attention cases differ by when
# folded (1 to 2 ulps), with room for one more rounding.
ULPS = 4


def _epsilon(dtype: np.dtype) -> float | None:
    """Machine epsilon of a float dtype (numpy's or ml_dtypes' bfloat16/float8), else None."""
    if dtype.kind == "f":
        return float(np.finfo(dtype).eps)
    if dtype.kind == "V" or dtype.name.startswith(("bfloat16", "float8")):
        try:
            import ml_dtypes  # onnx's dependency: numpy types for bfloat16 and float8

            return float(ml_dtypes.finfo(dtype).eps)
        except (ImportError, TypeError, ValueError):
            return None
    return None


def dtype_tolerance(dtype: np.dtype, rtol: float, atol: float) -> tuple[float, float] | None:
    """`(rtol, atol)` for outputs of `dtype`: the given ones for float32 and wider, at least
    `ULPS` ulps of the type for narrower floats (fp16, bf16, float8); None for types compared
    for equality (integers, bool, strings)."""
    dtype = np.dtype(dtype)
    eps = _epsilon(dtype)
    if eps is None:
        return None
    if dtype.itemsize >= 4:  # float32 and wider hold the given tolerance
        return rtol, atol
    floor = ULPS * eps
    return max(rtol, floor), max(atol, floor)


def exact_difference(
    expected: Any, got: Any, *, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL
) -> str | None:
    """What differs between two values of one output beyond the exact tolerance, or None.

    Args:
        expected: the reference value: an array, a list of values (a sequence) or None (an
            empty optional).
        got: the candidate's value of the same output.
        rtol, atol: the float32 tolerance (`atol` relative to max(1, max|expected|)); narrower
            floats get `dtype_tolerance`'s.

    Returns:
        None when equal within tolerance; else a phrase such as "max abs error 0.3 exceeds
        rtol 0.0001 / atol 1e-05 (output scale 2)" or "float32[2, 3] became float32[3]".
    """
    if expected is None or got is None:
        if expected is None and got is None:
            return None
        return "an empty optional value became a value" if expected is None else (
            "a value became an empty optional"
        )
    if isinstance(expected, (list, tuple)) or isinstance(got, (list, tuple)):
        if not isinstance(expected, (list, tuple)) or not isinstance(got, (list, tuple)):
            return "a sequence became a tensor" if isinstance(expected, (list, tuple)) else (
                "a tensor became a sequence"
            )
        if len(expected) != len(got):
            return f"a sequence of {len(expected)} became one of {len(got)}"
        for position, (a, b) in enumerate(zip(expected, got, strict=True)):
            if (why := exact_difference(a, b, rtol=rtol, atol=atol)) is not None:
                return f"element {position}: {why}"
        return None
    ref, cand = np.asarray(expected), np.asarray(got)
    if ref.shape != cand.shape or ref.dtype != cand.dtype:
        return (
            f"{ref.dtype}{list(ref.shape)} became {cand.dtype}{list(cand.shape)}"
        )
    tolerance = dtype_tolerance(ref.dtype, rtol, atol)
    if tolerance is None:
        return None if np.array_equal(ref, cand) else "values differ (compared for equality)"
    step_rtol, step_atol = tolerance
    ref64 = ref.astype(np.float64)
    cand64 = cand.astype(np.float64)
    finite = np.isfinite(ref64)
    scale = float(np.abs(ref64[finite]).max()) if finite.any() else 0.0
    bound = step_atol * max(1.0, scale)
    if np.allclose(cand64, ref64, rtol=step_rtol, atol=bound, equal_nan=True):
        return None
    with np.errstate(invalid="ignore"):
        err = np.abs(cand64 - ref64)
    worst = float(np.nanmax(err)) if err.size and not np.isnan(err).all() else float("nan")
    return (
        f"max abs error {worst:.3g} exceeds rtol {step_rtol:g} / atol {bound:.3g} "
        f"(output scale {scale:.3g})"
    )
