"""The ONNX backend test cases, generated from the installed `onnx` package, as test data.

The onnx wheel ships no `node/` folder any more, but it ships the code that wrote it: each
operator's `export*` functions in `onnx.backend.test.case.node` build the case's model and its
inputs and expected outputs (`onnx.backend.test.loader.load_node_model_tests()`). The `simple`,
`pytorch-converted` and `pytorch-operator` cases still ship as folders (`model.onnx` and
`test_data_set_*/{input,output}_*.pb`). A case is *valid* when onnxruntime runs it and matches its
expected outputs within the case's tolerances, as the onnx backend runner judges it; `frozen`
turns a case's inputs into initializers (weights), which lets constant folding run over the op.

Values are numpy arrays, lists of arrays (sequences) or None (an empty optional), as onnxruntime
takes and returns them.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = [
    "BackendCase",
    "DATA_KINDS",
    "node_cases",
    "data_cases",
    "all_cases",
    "frozen",
    "with_frozen",
    "Tally",
    "optimize_verifier_off",
    "optimize_default",
    "dynamic_int8",
    "run_ort",
    "same_values",
    "valid_cases",
]

DATA_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
DATA_KINDS = ("simple", "pytorch-converted", "pytorch-operator")


@dataclass(frozen=True)
class BackendCase:
    """One case: its model, one data set (inputs by graph input name, expected outputs in graph
    output order) and the tolerances of the onnx backend runner."""

    name: str
    kind: str
    model: onnx.ModelProto
    inputs: dict[str, Any]
    expected: tuple[Any, ...]
    rtol: float
    atol: float

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


def _as_value(value: Any) -> Any:
    """numpy (or list / None) for onnxruntime: TensorProtos converted, scalars as arrays."""
    if value is None:
        return None
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list):
        return [_as_value(v) for v in value]
    return np.asarray(value)


@functools.cache
def _node_protos() -> tuple[tuple[str, bytes, tuple[Any, ...], tuple[Any, ...]], ...]:
    from onnx.backend.test.loader import load_node_model_tests

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        np_err = np.seterr(all="ignore")
        try:
            cases = load_node_model_tests()
        finally:
            np.seterr(**np_err)
    out = []
    for case in cases:
        assert case.model is not None and case.data_sets
        inputs, outputs = case.data_sets[0]
        out.append((case.name, case.model.SerializeToString(), tuple(inputs), tuple(outputs)))
    return tuple(out)


def node_cases() -> list[BackendCase]:
    """Every node case the installed onnx package generates (its first data set)."""
    cases = []
    for name, data, inputs, outputs in _node_protos():
        model = onnx.load_from_string(data)
        present = [i for i in model.graph.input if i.name]
        feeds = {spec.name: _as_value(v) for spec, v in zip(present, inputs, strict=False)}
        expected = tuple(_as_value(v) for v in outputs)
        cases.append(BackendCase(name, "node", model, feeds, expected, 1e-3, 1e-7))
    return cases


def _read_value(path: str, type_proto: onnx.TypeProto) -> Any:
    with open(path, "rb") as handle:
        data = handle.read()
    which = type_proto.WhichOneof("value")
    if which == "sequence_type":
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return _as_value(numpy_helper.to_list(seq))
    if which == "optional_type":
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return _as_value(numpy_helper.to_optional(opt))
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return numpy_helper.to_array(tensor)


def data_cases(kinds: Sequence[str] = DATA_KINDS) -> list[BackendCase]:
    """The cases shipped as folders (`simple`, `pytorch-converted`, `pytorch-operator`)."""
    cases = []
    for kind in kinds:
        for folder in sorted(glob.glob(os.path.join(DATA_DIR, kind, "test_*"))):
            path = os.path.join(folder, "model.onnx")
            sets = sorted(glob.glob(os.path.join(folder, "test_data_set_*")))
            if not os.path.exists(path) or not sets:
                continue
            model = onnx.load(path)
            inits = {t.name for t in model.graph.initializer}
            specs = [i for i in model.graph.input if i.name not in inits]
            feeds = {}
            for index, spec in enumerate(specs):
                file = os.path.join(sets[0], f"input_{index}.pb")
                if os.path.exists(file):
                    feeds[spec.name] = _read_value(file, spec.type)
            expected = tuple(
                _read_value(os.path.join(sets[0], f"output_{index}.pb"), spec.type)
                for index, spec in enumerate(model.graph.output)
                if os.path.exists(os.path.join(sets[0], f"output_{index}.pb"))
            )
            name = os.path.basename(folder)
            cases.append(BackendCase(name, kind, model, feeds, expected, 1e-3, 1e-7))
    return cases


def all_cases() -> list[BackendCase]:
    return node_cases() + data_cases()


def with_frozen(cases: Sequence[BackendCase]) -> list[BackendCase]:
    """Each case, then its variants with all tensor inputs but the first, and all of them,
    frozen into weights (`frozen`)."""
    out = []
    for case in cases:
        out.append(case)
        for keep_first in (True, False):
            variant = frozen(case, keep_first)
            if variant is not None:
                out.append(variant)
    return out


def frozen(case: BackendCase, keep_first: bool) -> BackendCase | None:
    """The case with its tensor inputs stored as initializers (all of them, or all but the
    first); None when nothing would be frozen (sequence/optional inputs stay inputs)."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    names = list(case.inputs)
    chosen = [
        n for n in (names[1:] if keep_first else names)
        if isinstance(case.inputs[n], np.ndarray)
    ]  # fmt: skip
    if not chosen:
        return None
    kept = [i for i in model.graph.input if i.name not in chosen]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    for name in chosen:
        model.graph.initializer.append(numpy_helper.from_array(case.inputs[name], name))
    model.ir_version = max(model.ir_version, 4)
    feeds = {n: v for n, v in case.inputs.items() if n not in chosen}
    suffix = "_frozen_rest" if keep_first else "_frozen"
    return replace(case, name=case.name + suffix, model=model, inputs=feeds)


def _session(model: onnx.ModelProto | bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run_ort(model: onnx.ModelProto | bytes, feeds: dict[str, Any]) -> list[Any]:
    """Outputs in graph order, on a fresh single-threaded session without graph optimizations
    (so what runs is the file as written)."""
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    given = {k: v for k, v in feeds.items() if v is not None}
    return session.run(names, given)


# A few units in the last place of each float type: what an exact rewrite may move a value.
_ULPS = 4


def _tolerance(dtype: np.dtype) -> tuple[float, float]:
    if dtype.kind == "f" or dtype.name == "bfloat16":
        eps = float(np.finfo(np.float32).eps) if dtype.itemsize >= 4 else _eps(dtype)
        return max(1e-4, _ULPS * eps), max(1e-5, _ULPS * eps)
    return 0.0, 0.0


def _eps(dtype: np.dtype) -> float:
    try:
        return float(np.finfo(dtype).eps)
    except (TypeError, ValueError):  # ml_dtypes (bfloat16, float8): their own finfo
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).eps)


def same_values(expected: Any, got: Any, rtol: float | None = None) -> str | None:
    """None when `got` equals `expected` within the exact tolerance of its dtype (rtol 1e-4 /
    atol 1e-5 of the output's scale for float32, a few ulps for narrower floats, equality for
    the rest), else what differs. Lists compare element-wise, None only equals None."""
    if expected is None or got is None:
        return None if expected is None and got is None else f"{expected!r} vs {got!r}"
    if isinstance(expected, list) or isinstance(got, list):
        if not isinstance(expected, list) or not isinstance(got, list):
            return "sequence vs tensor"
        if len(expected) != len(got):
            return f"sequence of {len(expected)} vs {len(got)}"
        for a, b in zip(expected, got, strict=True):
            if (why := same_values(a, b, rtol)) is not None:
                return why
        return None
    a, b = np.asarray(expected), np.asarray(got)
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    if a.dtype.kind in "OSU":
        return None if np.array_equal(a, b) else "strings differ"
    step_rtol, step_atol = _tolerance(a.dtype)
    if step_rtol == 0.0:
        return None if np.array_equal(a, b) else "integers differ"
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    finite = np.isfinite(a64)
    scale = float(np.abs(a64[finite]).max()) if finite.any() else 0.0
    tol_r = step_rtol if rtol is None else rtol
    if np.allclose(b64, a64, rtol=tol_r, atol=step_atol * max(1.0, scale), equal_nan=True):
        return None
    err = np.abs(b64 - a64)
    return f"max abs error {float(np.nanmax(err)):.3g} (scale {scale:.3g})"


def matches_expected(case: BackendCase, got: Sequence[Any]) -> bool:
    """As the onnx backend runner judges: every output within the case's rtol/atol."""
    if len(got) != len(case.expected):
        return False
    return all(_close(e, g, case.rtol, case.atol) for e, g in zip(case.expected, got, strict=True))


def _close(expected: Any, got: Any, rtol: float, atol: float) -> bool:
    if expected is None or got is None:
        return expected is None and got is None
    if isinstance(expected, list) or isinstance(got, list):
        return (
            isinstance(expected, list) and isinstance(got, list) and len(expected) == len(got)
            and all(_close(e, g, rtol, atol) for e, g in zip(expected, got, strict=True))
        )  # fmt: skip
    a, b = np.asarray(expected), np.asarray(got)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "OSU" or b.dtype.kind in "OSU":
        return bool(np.array_equal(a.astype(str), b.astype(str)))
    try:
        return bool(np.allclose(b.astype(np.float64), a.astype(np.float64), rtol=rtol,
                                atol=atol, equal_nan=True))
    except (TypeError, ValueError):
        return False


def valid_cases(cases: Sequence[BackendCase]) -> Iterator[tuple[BackendCase, list[Any]]]:
    """The cases onnxruntime runs correctly (twice the same, and as expected), with its outputs."""
    for case in cases:
        try:
            first = run_ort(case.model, case.inputs)
            second = run_ort(case.model, case.inputs)
        except Exception:  # noqa: BLE001 - onnxruntime refuses many cases: not valid ones
            continue
        if not matches_expected(case, first):
            continue
        if any(same_values(a, b) is not None for a, b in zip(first, second, strict=True)):
            continue  # not deterministic (random ops, uninitialised memory)
        yield case, first


# ---------------------------------------------------------------- the differential runs


@dataclass
class Tally:
    """Outcomes of one differential run: a count per outcome and the first examples of each.

    Outcomes: "ok" (written, runs, same outputs), "refused" (a one-line `BadInputError`, e.g.
    NaN weights or nothing to quantize), "unverified" (the default call refused), "crash" (any
    other exception), "invalid" (onnxruntime cannot run the written model), "mismatch" (it runs
    with other outputs than the input model's), "verification" (the verifier refused an exact
    pass on the case's own inputs).
    """

    counts: dict[str, int]
    examples: dict[str, list[str]]

    @classmethod
    def new(cls) -> Tally:
        return cls({}, {})

    def add(self, outcome: str, case: BackendCase, detail: str = "") -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        shown = self.examples.setdefault(outcome, [])
        if len(shown) < 20:
            shown.append(f"{case}: {detail}"[:400])

    def __getitem__(self, outcome: str) -> int:
        return self.counts.get(outcome, 0)

    def failures(self) -> list[str]:
        return [
            line for outcome in ("crash", "invalid", "mismatch", "verification")
            for line in self.examples.get(outcome, [])
        ]  # fmt: skip


def _written(case: BackendCase, expected: Sequence[Any], model: Any, tally: Tally) -> None:
    """Run the written model on the case's inputs and compare with the input model's outputs."""
    from slimgraph.runtime.session import model_bytes

    try:
        got = run_ort(model_bytes(model), case.inputs)
    except Exception as error:  # noqa: BLE001 - onnxruntime's many error types
        tally.add("invalid", case, str(error).splitlines()[0] if str(error) else "")
        return
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        if (why := same_values(want, have)) is not None:
            tally.add("mismatch", case, f"output {index}: {why}")
            return
    tally.add("ok", case)


def optimize_verifier_off(pairs: Sequence[tuple[BackendCase, list[Any]]]) -> Tally:
    """`optimize` (lossless) with `verify=False` on each case; the written model checked."""
    import onnx_ir as ir

    import slimgraph as sg

    tally = Tally.new()
    for case, expected in pairs:
        try:
            out = sg.optimize(ir.from_proto(case.model), verify=False)
        except sg.BadInputError as error:
            tally.add("refused", case, str(error))
            continue
        except Exception as error:  # noqa: BLE001 - every other error is a crash to report
            tally.add("crash", case, f"{type(error).__name__}: {error}")
            continue
        _written(case, expected, out, tally)
    return tally


def optimize_default(pairs: Sequence[tuple[BackendCase, list[Any]]]) -> Tally:
    """The default call (`optimize(model)`: verified on generated inputs) on each case; when it
    cannot verify without inputs, the call with the case's inputs (the user's data). Counts
    "verified" (the default call succeeded) besides the outcomes of the written model."""
    import onnx_ir as ir

    import slimgraph as sg

    tally = Tally.new()
    for case, expected in pairs:
        model = ir.from_proto(case.model)
        try:
            out = sg.optimize(model)
            tally.add("verified", case)
        except sg.SlimgraphError as error:
            tally.add("unverified", case, f"{type(error).__name__}: {error}")
            try:
                out = sg.optimize(model, feeds=dict(case.inputs))
            except sg.VerificationError as inner:  # an exact pass changed the outputs
                tally.add("verification", case, str(inner))
                continue
            except sg.BadInputError as inner:
                tally.add("refused", case, str(inner))
                continue
            except Exception as inner:  # noqa: BLE001
                tally.add("crash", case, f"{type(inner).__name__}: {inner}")
                continue
        except Exception as error:  # noqa: BLE001
            tally.add("crash", case, f"{type(error).__name__}: {error}")
            continue
        _written(case, expected, out, tally)
    return tally


# Op types dynamic quantization rewrites (`quantize.dynamic.DEFAULT_OP_TYPES`).
_DYNAMIC_OPS = {"MatMul", "Gemm", "Gather", "LSTM", "GRU", "RNN"}


def dynamic_int8(pairs: Sequence[tuple[BackendCase, list[Any]]]) -> Tally:
    """`quantize(mode="dynamic", verify=False)` on the cases with an op it rewrites; the
    written model must run (its outputs are approximate: not compared)."""
    import onnx_ir as ir

    import slimgraph as sg
    from slimgraph.runtime.session import model_bytes

    tally = Tally.new()
    for case, _ in pairs:
        if not _DYNAMIC_OPS & {n.op_type for n in case.model.graph.node}:
            continue
        try:
            out = sg.quantize(ir.from_proto(case.model), mode="dynamic", verify=False)
        except sg.BadInputError as error:
            tally.add("refused", case, str(error))
            continue
        except Exception as error:  # noqa: BLE001
            tally.add("crash", case, f"{type(error).__name__}: {error}")
            continue
        try:
            run_ort(model_bytes(out), case.inputs)
        except Exception as error:  # noqa: BLE001
            tally.add("invalid", case, str(error).splitlines()[0] if str(error) else "")
            continue
        tally.add("ok", case)
    return tally
