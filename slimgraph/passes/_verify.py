"""Verification of a pipeline's passes on onnxruntime: each model against the one before it.

`Verifier` runs every version of the model once on fixed feeds: an exact pass must keep every
output within `rtol * |ref| + atol * max(1, max|ref|)` and integer/bool outputs equal; an
approximate one reports fidelity and fails only below a `min_cosine`. onnxruntime
(`slimgraph.runtime`) is imported when a model runs, not with this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BadDataError, UnsupportedModelError, VerificationError

if TYPE_CHECKING:
    from slimgraph.runtime import Fidelity

__all__ = ["Verifier", "feed_list"]


class Verifier:
    """Runs each version of the model once on fixed feeds and checks it against the previous one.

    Only the latest outputs are kept (the reference of the next pass), plus the very first ones,
    so a pipeline of N passes costs N sessions, not 2N.
    """

    def __init__(
        self, model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], rtol: float, atol: float
    ) -> None:
        self.feeds = feeds
        self.rtol = rtol
        self.atol = atol
        self.original = self._outputs(model, "the input model", is_input=True)
        self.reference = self.original

    def _outputs(
        self, model: ir.Model, who: str, *, is_input: bool = False
    ) -> list[dict[str, np.ndarray]]:
        from slimgraph.runtime import create_session, run

        try:
            session = create_session(model, optimization="disable")
            return [run(session, feed) for feed in self.feeds]
        except BadDataError:
            raise
        except Exception as error:  # onnxruntime reports invalid graphs with many types
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            message = f"{who} does not run on onnxruntime: {type(error).__name__}: {first}"
            if is_input:
                raise UnsupportedModelError(
                    f"{message} (verification needs it; skip with verify=False / --no-verify)"
                ) from error
            raise VerificationError(message) from error

    def check(self, model: ir.Model, name: str, exact: bool, min_cosine: float | None) -> Fidelity:
        outputs = self._outputs(model, f"the model after pass '{name}'")
        if outputs and set(outputs[0]) != set(self.reference[0]):
            raise VerificationError(
                f"pass '{name}' changed the model's output names from "
                f"{sorted(self.reference[0])} to {sorted(outputs[0])}"
            )
        from slimgraph.runtime import compare_outputs

        fidelity = compare_outputs(self.reference, outputs)
        if exact:
            for ref, cand in zip(self.reference, outputs, strict=True):
                for output, expected in ref.items():
                    self._check_close(name, output, expected, cand[output])
        if min_cosine is not None and fidelity.worst_cosine < min_cosine:
            raise VerificationError(
                f"pass '{name}' lowered the output cosine to {fidelity.worst_cosine:.6f}, "
                f"below the required {min_cosine}"
            )
        self.reference = outputs
        return fidelity

    def _check_close(self, name: str, output: str, expected: np.ndarray, got: np.ndarray) -> None:
        if expected.shape != got.shape or expected.dtype != got.dtype:
            raise VerificationError(
                f"exact pass '{name}' changed output '{output}' from {expected.dtype}"
                f"{list(expected.shape)} to {got.dtype}{list(got.shape)}"
            )
        if expected.dtype.kind not in "fc":
            if not np.array_equal(expected, got):
                raise VerificationError(f"exact pass '{name}' changed output '{output}'")
            return
        ref = expected.astype(np.float64)
        cand = got.astype(np.float64)
        finite = np.isfinite(ref)
        scale = float(np.abs(ref[finite]).max()) if finite.any() else 0.0
        atol = self.atol * max(1.0, scale)
        if not np.allclose(cand, ref, rtol=self.rtol, atol=atol, equal_nan=True):
            err = np.abs(cand - ref)
            worst = float(np.nanmax(err)) if err.size else 0.0
            raise VerificationError(
                f"exact pass '{name}' changed output '{output}': max abs error {worst:.3g} "
                f"exceeds rtol {self.rtol:g} / atol {atol:.3g} (output scale {scale:.3g})"
            )


def feed_list(
    model: ir.Model,
    feeds: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]] | None,
) -> list[Mapping[str, np.ndarray]]:
    if feeds is None:
        from slimgraph.runtime import random_feeds

        return [random_feeds(model, seed=0)]
    if isinstance(feeds, Mapping):
        return [feeds]
    listed = list(feeds)
    if not listed:
        raise BadDataError("verification feeds are empty")
    return listed
