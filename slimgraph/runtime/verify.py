"""Verification of a pipeline's passes on onnxruntime: each model against the one before it.

`Verifier` runs every version of the model once on fixed feeds: an exact pass must keep every
output unchanged within the exact tolerance of its dtype (`runtime.exact.exact_difference`:
`rtol * |ref| + atol * max(1, max|ref|)` for float32, a few ulps for fp16/bf16, equality for
integers, booleans and strings; sequences element by element, empty optionals only equal to
empty ones); an approximate one reports fidelity and fails only below a `min_cosine`. Without
feeds of the user's, the inputs are generated to drive the model (`runtime.feeds.driving_feeds`:
the export's example sizes, padded mask rows, divisors away from zero, shapes the model accepts).
`drop_judge` measures the metric behind a pipeline's `max_drop` limits. The pure pipeline
(`slimgraph.passes.pipeline`) imports this module only when it verifies or judges.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.errors import (
    BadDataError,
    BadOptionError,
    UnsupportedModelError,
    VerificationError,
    first_line,
)
from slimgraph.runtime.budget import Evaluator
from slimgraph.runtime.compare import Fidelity, compare_outputs
from slimgraph.runtime.exact import exact_difference
from slimgraph.runtime.feeds import driving_feeds
from slimgraph.runtime.metrics import LabelledData
from slimgraph.runtime.session import create_session, run

__all__ = ["Verifier", "feed_list", "drop_judge"]

Feeds = Mapping[str, Any]


class Verifier:
    """Runs each version of the model once on fixed feeds and checks it against the previous one.

    Only the latest outputs are kept (the reference of the next pass), plus the very first ones,
    so a pipeline of N passes costs N sessions, not 2N.

    Args:
        model: the pipeline's input model.
        feeds: the user's feed dicts, or None to generate inputs that drive the model.
        tolerance: `(rtol, atol)`, the float32 tolerance of exact passes (atol relative to the
            output scale); None for `runtime.exact`'s defaults.

    Raises:
        BadDataError: the user's feeds do not fit the input model.
        UnsupportedModelError: the input model does not run on onnxruntime, or no generated
            inputs run it (the message says how to pass real ones).
    """

    def __init__(
        self,
        model: ir.Model,
        feeds: Sequence[Feeds] | None,
        tolerance: tuple[float, float] | None = None,
    ) -> None:
        self.tolerance: dict[str, float] = {}
        if tolerance is not None:
            self.tolerance = {"rtol": tolerance[0], "atol": tolerance[1]}
        if feeds is None:
            generated, outputs = driving_feeds(model)
            self.feeds: Sequence[Feeds] = [generated]
            self.original = [outputs]
        else:
            self.feeds = feeds
            self.original = self._input_outputs(model)
        self.reference = self.original

    def _input_outputs(self, model: ir.Model) -> list[dict[str, Any]]:
        try:
            session = create_session(model, optimization="disable")
        except Exception as error:  # onnxruntime reports invalid graphs with many types
            raise UnsupportedModelError(
                f"the input model does not run on onnxruntime: {first_line(error, named=True)} "
                "(verification needs it; skip with verify=False / --no-verify)"
            ) from error
        return [run(session, feed) for feed in self.feeds]  # BadDataError: the user's feeds

    def _outputs(self, model: ir.Model, name: str) -> list[dict[str, Any]]:
        """The outputs of the model after pass `name`; any failure is the pass's."""
        try:
            session = create_session(model, optimization="disable")
            return [run(session, feed) for feed in self.feeds]
        except Exception as error:  # not the inputs' fault: they ran the model before the pass
            text = str(error) if isinstance(error, (BadDataError, UnsupportedModelError)) else (
                first_line(error, named=True)
            )
            raise VerificationError(
                f"the model after pass '{name}' does not run on the inputs the model before it "
                f"ran on: {text}"
            ) from error

    def check(self, model: ir.Model, name: str, exact: bool, min_cosine: float | None) -> Fidelity:
        outputs = self._outputs(model, name)
        if outputs and set(outputs[0]) != set(self.reference[0]):
            raise VerificationError(
                f"pass '{name}' changed the model's output names from "
                f"{sorted(self.reference[0])} to {sorted(outputs[0])}"
            )
        if exact:
            for ref, cand in zip(self.reference, outputs, strict=True):
                for output, expected in ref.items():
                    why = exact_difference(expected, cand[output], **self.tolerance)
                    if why is not None:
                        raise VerificationError(
                            f"exact pass '{name}' changed output '{output}': {why}"
                        )
        try:
            fidelity = compare_outputs(self.reference, outputs)
        except BadDataError as error:  # outputs of another shape: the pass's doing
            raise VerificationError(f"pass '{name}' changed the model's outputs: {error}") from None
        if min_cosine is not None and fidelity.worst_cosine < min_cosine:
            raise VerificationError(
                f"pass '{name}' lowered the output cosine to {fidelity.worst_cosine:.6f}, "
                f"below the required {min_cosine}"
            )
        self.reference = outputs
        return fidelity

    def overall(self) -> Fidelity:
        """The last model's outputs against the input model's."""
        return compare_outputs(self.original, self.reference)


def feed_list(
    feeds: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]] | None,
) -> list[Mapping[str, np.ndarray]] | None:
    """The user's verification feeds as a list of feed dicts (None: generate them).

    Raises:
        BadDataError: an empty iterable.
    """
    if feeds is None:
        return None
    if isinstance(feeds, Mapping):
        return [feeds]
    listed = list(feeds)
    if not listed:
        raise BadDataError("verification feeds are empty")
    return listed


def drop_judge(model: ir.Model, data: LabelledData | None) -> Evaluator:
    """The evaluator of a pipeline's `max_drop` limits against `model` on `data`.

    Raises:
        BadOptionError: no data, or data without labels.
    """
    if data is None or data.labels is None:
        raise BadOptionError.worded("max_drop needs labelled validation data ({data})",
                                    data=("data= with a labels key",
                                          "--data VAL.npz with a labels key"))
    return Evaluator(model, data)
