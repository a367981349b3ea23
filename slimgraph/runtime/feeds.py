"""Model inputs: specs from the graph, generated sample feeds, and `.npz` data checked against them.

Data files follow docs/contract.md ("Data files"): an `.npz` whose keys are the model's input
names, each array stacked on axis 0 (one row per sample).
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.errors import (
    BadDataError,
    BadOptionError,
    SlimgraphError,
    UnsupportedModelError,
    first_line,
)
from slimgraph.ir import ModelLike, as_model
from slimgraph.ir._dims import example_dims
from slimgraph.runtime._decoder import decoder_io, decoder_mask, expression_size, mask_positions
from slimgraph.runtime._roles import input_role, role_values
from slimgraph.runtime.session import create_session, run

__all__ = [
    "InputSpec",
    "input_specs",
    "describe_inputs",
    "random_feeds",
    "example_dims",
    "driving_feeds",
    "DRIVING_SIZES",
    "calibrated_ranges",
    "load_npz",
    "read_npz",
    "cast_floats",
    "check_batch",
    "check_feeds",
    "sample_count",
    "iter_batches",
    "iter_feeds",
]

Dim = int | str | None

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype and shape (ints, symbolic names, or None if unknown).

    `container` is "tensor", "sequence" (a list of tensors of `dtype`), "optional" (a tensor
    that may be absent) or "optional sequence"; `shape` is None for the last three.
    """

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None
    container: str = "tensor"

    def describe(self) -> str:
        if self.shape is None:
            dims = "?"
        else:
            dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        text = f"{self.dtype.name}[{dims}]"
        if self.container != "tensor":
            text = f"{self.container}({self.dtype.name})"
        return f"{self.name}: {text}"


def _container(type_: ir.TypeProtocol | None) -> str:
    if isinstance(type_, ir.SequenceType):
        return "sequence"
    if isinstance(type_, ir.OptionalType):
        inner = _container(type_.elem_type)
        return "optional sequence" if inner == "sequence" else "optional"
    return "tensor"


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs by old exporters are left out)."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer() or value.name is None:
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        container = _container(value.type)
        shape = None
        if value.shape is not None and container == "tensor":
            shape = tuple(d if isinstance(d, int) else (d.value or None) for d in value.shape)
        specs.append(InputSpec(value.name, np.dtype(dtype), shape, container))
    return specs


def describe_inputs(specs: Iterable[InputSpec]) -> str:
    return "; ".join(spec.describe() for spec in specs)


# Largest sample input `random_feeds` makes (elements; 1 GiB of float32).
MAX_SAMPLE_ELEMENTS = 1 << 28


def random_feeds(
    model: ModelLike,
    *,
    batch: int = 1,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    ranges: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """Random inputs that fit the model's input spec and drive it.

    Symbolic dimensions take their value from `dims` (by name); the first one of each input, if
    not named there, is the batch; other unknown dimensions take the size the export's example
    gave them (`example_dims`, recorded by `from_torch`), else 1. Floats are standard normal,
    or uniform in `ranges[name]` (low, high) when given (see `calibrated_ranges`); integers are
    0 or 1 (valid indices of anything); inputs whose name contains "mask" are 1 with the
    last positions of every row but the first set to 0 (padded rows); booleans are True. An
    input that feeds a slot with rules of its own gets values that slot accepts
    (`runtime._roles`): token ids (Gather indices) over the whole embedding table, integer
    divisors away from zero, a Reshape/Expand target read from the shape the model declares,
    axes that exist, a Split that adds up, `training_mode` false.
    Sequence inputs are lists of two 1-D tensors.

    Args:
        model: an `onnx_ir.Model` or the path of an `.onnx` file.
        batch: the value of each input's leading symbolic dimension.
        dims: values of other symbolic dimensions, by name.
        seed: numpy seed.

    Returns:
        One value per graph input, by input name: an array, or a list of arrays for a sequence.

    Raises:
        BadDataError: an input declares more than `MAX_SAMPLE_ELEMENTS` elements.
        BadOptionError: `model` is neither a model nor a path.
        ModelLoadError: `model` is a path that cannot be loaded.
    """
    model = as_model(model)
    return _sample_feeds(model, batch, dims or {}, 1, seed, ranges or {})


def _sample_feeds(
    model: ir.Model,
    batch: int,
    dims: Mapping[str, int],
    default: int,
    seed: int,
    ranges: Mapping[str, tuple[float, float]],
) -> dict[str, Any]:
    """`random_feeds` with `default` for symbolic dimensions neither named in `dims` nor
    recorded at export."""
    rng = np.random.default_rng(seed)
    recorded = example_dims(model)
    specs = input_specs(model)
    decoder = decoder_io(model)
    resolved: dict[str, int] = {}
    plain = {d for spec in specs if spec.shape for d in spec.shape
             if isinstance(d, str) and d.isidentifier()}  # symbols an expression may name

    def size(dim: str, axis: int) -> int:
        """A symbolic dimension's size: given, the batch, past + new for a decoder's mask, an
        expression of other sizes, recorded at export, else the default."""
        if dim not in resolved:
            resolved[dim] = default  # a cycle falls back to the default
            if dim in dims:
                found = dims[dim]
            elif axis == 0:
                found = batch
            elif decoder is not None and dim == decoder.total_dim and (
                    decoder.past_dim and decoder.seq_dim):
                found = size(decoder.past_dim, 2) + size(decoder.seq_dim, 1)
            elif (value := expression_size(
                    dim, lambda name: size(name, 1) if name in plain else None)) is not None and (
                    value > 0):
                found = value
            else:
                found = recorded.get(dim, default)
            resolved[dim] = found
        return resolved[dim]

    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.container != "tensor":
            continue
        shape = []
        for axis, dim in enumerate(spec.shape if spec.shape is not None else (batch,)):
            if isinstance(dim, int):
                shape.append(dim)
            elif isinstance(dim, str):
                shape.append(size(dim, axis))
            elif axis == 0:
                shape.append(batch)
            else:
                shape.append(default)
        elements = math.prod(shape)
        if elements > MAX_SAMPLE_ELEMENTS:
            raise BadDataError(
                f"input '{spec.name}' declares shape {shape} ({elements:,} elements): too large "
                "to make sample inputs for; give real data or skip verification (--no-verify)"
            )
        shapes[spec.name] = tuple(shape)
    values = {v.name: v for v in model.graph.inputs if v.name is not None}
    feeds: dict[str, Any] = {}
    for spec in specs:
        if spec.container != "tensor":
            element = _tensor_values(spec, (default,), rng, ranges)
            if "sequence" in spec.container:
                feeds[spec.name] = [element, _tensor_values(spec, (default,), rng, ranges)]
            else:
                feeds[spec.name] = element
            continue
        dims_of = shapes[spec.name]
        role = input_role(values[spec.name])
        drawn = None if role is None else role_values(role, dims_of, spec.dtype, rng, shapes)
        feeds[spec.name] = (
            drawn if drawn is not None else _tensor_values(spec, dims_of, rng, ranges)
        )
    if decoder is not None:
        _decoder_values(decoder, feeds, shapes)
    return feeds


def _decoder_values(decoder: Any, feeds: dict[str, Any], shapes: dict[str, tuple[int, ...]]
                    ) -> None:
    """A decode step's mask and positions as generation makes them: the mask over past and new
    tokens padded in one row (`_decoder.decoder_mask`), positions counting the kept tokens."""
    mask_shape = shapes.get(decoder.mask) if decoder.mask else None
    new = shapes[decoder.ids][1] if decoder.ids in shapes and len(shapes[decoder.ids]) == 2 \
        else None
    if mask_shape is None or len(mask_shape) != 2 or new is None or mask_shape[1] < new:
        return
    mask = decoder_mask(mask_shape[0], mask_shape[1] - new, new, feeds[decoder.mask].dtype)
    feeds[decoder.mask] = mask
    if decoder.positions in feeds and shapes[decoder.positions] == (mask_shape[0], new):
        feeds[decoder.positions] = mask_positions(mask, new).astype(
            feeds[decoder.positions].dtype)


def _tensor_values(
    spec: InputSpec,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    ranges: Mapping[str, tuple[float, float]],
) -> np.ndarray:
    if spec.dtype.kind == "f" and spec.name in ranges:
        low, high = ranges[spec.name]
        return rng.uniform(low, high, size=shape).astype(spec.dtype)
    if spec.dtype.kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype.kind == "b":
        return np.ones(shape, dtype=spec.dtype)
    if spec.dtype.kind in "OSU":
        return np.array(rng.choice(["a", "bc"], size=shape), dtype=object)
    if "mask" in spec.name.lower():
        return _padded_mask(shape, spec.dtype)
    return rng.integers(0, 2, size=shape).astype(spec.dtype)


def _padded_mask(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Ones, with the last positions of each row after the first zeroed (a padded batch): row
    b of B keeps the first T - floor(T * b / 2B) positions, never fewer than one."""
    mask = np.ones(shape, dtype=dtype)
    if len(shape) < 2 or shape[-1] < 2:
        return mask
    rows, length = shape[0], shape[-1]
    for row in range(1, rows):
        padded = min(length - 1, (length * row) // (2 * rows))
        if padded:
            mask[row, ..., length - padded :] = 0
    return mask


# Sizes tried, in order, for the symbolic dimensions that are not the batch, when inputs are
# generated for verification (`driving_feeds`): a text model at sequence 8, then longer until a
# convolutional front end (audio: Wav2Vec2 needs 400 samples) takes them.
DRIVING_SIZES = (8, 32, 128, 512, 2048, 16384)
# Largest generated input `driving_feeds` tries (elements).
_DRIVING_ELEMENTS = 1 << 22


def driving_feeds(
    model: ir.Model, *, seed: int = 0, who: str = "the input model"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Generated inputs that the model runs on, at realistic sizes, and its outputs on them.

    Candidates are tried in order until onnxruntime runs the model: the export's example sizes
    (`example_dims`), then batch 2 (padded mask rows) with every other symbolic dimension at 8,
    batch 1 at 8, then batch 2 at each larger size of `DRIVING_SIZES`, then every symbolic
    dimension 1. Values follow `random_feeds` (slots with rules of their own get values they
    accept).

    Args:
        model: the model to drive.
        seed: numpy seed of the values.
        who: how messages name the model.

    Returns:
        `(feeds, outputs)`: the inputs by name and the model's outputs on them (session without
        graph optimizations).

    Raises:
        BadDataError: an input declares more than `MAX_SAMPLE_ELEMENTS` elements even with every
            symbolic dimension 1.
        UnsupportedModelError: onnxruntime cannot load the model, or runs it on none of the
            candidates; the message says what was tried, what onnxruntime said, and how to pass
            real inputs or skip verification.
    """
    _sample_feeds(model, 1, {}, 1, seed, {})  # BadDataError: inputs too large at any size
    try:
        session = create_session(model, optimization="disable")
    except SlimgraphError:
        raise
    except Exception as error:  # onnxruntime reports invalid graphs with many types
        raise UnsupportedModelError(
            f"{who} does not run on onnxruntime: {first_line(error, named=True)} (verification "
            "needs it; skip with verify=False / --no-verify)"
        ) from error
    failures: list[str] = []
    for batch, dims, default in _candidates(model):
        try:
            feeds = _sample_feeds(model, batch, dims, default, seed, {})
        except BadDataError:
            continue
        if any(
            isinstance(v, np.ndarray) and v.size > _DRIVING_ELEMENTS for v in feeds.values()
        ):
            continue
        try:
            return feeds, run(session, feeds)
        except (BadDataError, UnsupportedModelError) as error:
            failures.append(f"{_describe(feeds)}: {error}")
    said = failures[0] if failures else "no candidate inputs could be built"
    raise UnsupportedModelError(
        f"cannot build sample inputs {who} runs on, to verify it: tried {len(failures)} "
        f"sets of generated inputs, the first {said}; give real inputs (feeds= in Python, "
        "--data DATA.npz on the command line) or skip verification (verify=False / --no-verify)"
    )


def _candidates(model: ir.Model) -> Iterator[tuple[int, dict[str, int], int]]:
    """(batch, sizes by dimension name, size of other symbolic dimensions) to try, in order,
    without repeats."""
    recorded = example_dims(model)
    leading = {
        str(spec.shape[0]) for spec in input_specs(model)
        if spec.shape and not isinstance(spec.shape[0], int)
    }  # fmt: skip
    symbolic = any(
        spec.shape is None or any(not isinstance(d, int) for d in spec.shape[1:])
        for spec in input_specs(model) if spec.container == "tensor"
    ) or any(spec.container != "tensor" for spec in input_specs(model))  # fmt: skip
    batches = (2, 1) if leading else (1,)
    ordered: list[tuple[int, dict[str, int], int]] = []
    if recorded:
        given = [recorded[name] for name in leading if name in recorded]
        ordered.append((given[0] if given else batches[0], recorded, DRIVING_SIZES[0]))
    ordered += [(batch, {}, DRIVING_SIZES[0]) for batch in batches]
    if symbolic:
        ordered += [(batches[0], {}, size) for size in DRIVING_SIZES[1:]]
    ordered.append((1, {}, 1))
    tried: set[tuple[int, tuple[tuple[str, int], ...], int]] = set()
    for batch, dims, default in ordered:
        key = (batch, tuple(sorted(dims.items())), default if symbolic else 0)
        if key not in tried:
            tried.add(key)
            yield batch, dims, default


def _describe(feeds: Mapping[str, Any]) -> str:
    shapes = ", ".join(
        f"{name}{list(np.shape(value))}" if not isinstance(value, list) else f"{name}[seq]"
        for name, value in feeds.items()
    )
    return f"inputs {shapes or '(none)'}"


def calibrated_ranges(model: ir.Model) -> dict[str, tuple[float, float]]:
    """The calibrated range of each float input a quantized model carries, by input name.

    A static (QDQ or QOperator) model quantizes its float inputs with a QuantizeLinear whose
    constant scale s and zero point z were calibrated: the range it represents without clipping is
    ((qmin - z) * s, (qmax - z) * s). Inputs without such a consumer are left out.
    """
    ranges: dict[str, tuple[float, float]] = {}
    for value in model.graph.inputs:
        if value.is_initializer() or value.name is None:
            continue
        for node in value.consumers():
            if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
                continue
            found = _quantize_range(node)
            if found is not None:
                ranges[value.name] = found
                break
    return ranges


def _quantize_range(node: ir.Node) -> tuple[float, float] | None:
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    if scale is None or scale.const_value is None:
        return None
    scales = np.asarray(scale.const_value.numpy(), dtype=np.float64)
    if scales.size != 1:
        return None
    qmin, qmax, point = 0, 255, 0.0  # no zero point: uint8, zero point 0
    if zero is not None:
        if zero.const_value is None:
            return None
        zeros = zero.const_value.numpy()
        if zeros.size != 1 or zeros.dtype not in (np.uint8, np.int8):
            return None
        info = np.iinfo(zeros.dtype)
        qmin, qmax, point = int(info.min), int(info.max), float(zeros.ravel()[0])
    step = float(scales.ravel()[0])
    return (qmin - point) * step, (qmax - point) * step
def check_batch(model: ir.Model, batch: int, *, label: str = "the model") -> None:
    """Check that `model` can run `batch` rows: every input's axis 0 is symbolic or `batch`.

    Raises:
        BadOptionError: an input has a fixed leading dimension other than `batch` (a model
            exported with a fixed batch); the message says which input and how to fix it.
    """
    for spec in input_specs(model):
        if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] != batch:
            raise BadOptionError(
                f"--batch {batch}: {label} has a fixed batch of {spec.shape[0]} (input "
                f"'{spec.name}' is {list(spec.shape)}), so it cannot run {batch} rows; export it "
                "with a symbolic batch (slimgraph.from_torch does by default) or leave out --batch"
            )


def load_npz(path: str | os.PathLike[str], model: ir.Model) -> dict[str, np.ndarray]:
    """Read sample data from an `.npz` and check it against the model's inputs.

    Raises:
        BadDataError: unreadable file, pickled objects, names, dtypes or shapes that do not fit
            (the message lists what the model expects), or no samples.
    """
    data = cast_floats(model, read_npz(path, model), source=str(path))
    check_feeds(model, data, source=str(path))
    return data


def read_npz(path: str | os.PathLike[str], model: ir.Model) -> dict[str, np.ndarray]:
    """Read every array of an `.npz` (not checked; `load_npz` and `metrics.load_data` check).

    Raises:
        BadDataError: a missing or unreadable file, or pickled objects (never loaded).
    """
    file = Path(path)
    expected = f"the model expects {describe_inputs(input_specs(model))}"
    try:
        archive = np.load(file, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("a single array (.npy), not an archive of named arrays")
        with archive:
            data = {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise BadDataError(f"{file}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        if "allow_pickle" in str(error) and _is_zip(file):  # an object array inside the .npz
            raise BadDataError(
                f"{file}: holds pickled Python objects, which slimgraph never loads; save plain "
                f"numeric arrays; {expected}"
            ) from None
        if not _is_zip(file) and "allow_pickle" in str(error):  # neither .npz nor .npy
            raise BadDataError(f"{file}: not a readable .npz file (not the zip archive of named "
                               f"arrays that np.savez writes); {expected}") from None
        raise BadDataError(f"{file}: not a readable .npz file ({error}); {expected}") from None
    return data


def cast_floats(
    model: ir.Model, data: Mapping[str, np.ndarray], *, source: str = "data"
) -> dict[str, np.ndarray]:
    """`data` with float arrays of another width cast to the float type the model's input takes.

    numpy and scikit-learn make float64 by default; a float32 model input takes them cast, with a
    logged note (float64 to float32 loses nothing a float32 model could use). Other dtypes are left
    for `check_feeds` to judge.
    """
    out = dict(data)
    for spec in input_specs(model):
        array = out.get(spec.name)
        if array is None:
            continue
        array = np.asarray(array)
        if array.dtype.kind == "f" and spec.dtype.kind == "f" and array.dtype != spec.dtype:
            logger.warning(
                "note: %s: '%s' is %s; cast to %s, the model's input type",
                source, spec.name, array.dtype.name, spec.dtype.name,
            )  # fmt: skip
            out[spec.name] = array.astype(spec.dtype)
    return out


def _is_zip(file: Path) -> bool:
    try:
        with open(file, "rb") as handle:
            return handle.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def check_feeds(
    model: ir.Model,
    data: Mapping[str, np.ndarray],
    *,
    source: str = "data",
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Check names, dtypes, ranks, fixed dimensions and finiteness of stacked sample data.

    `shapes`: the whole arrays' shapes when `data` holds only their first rows (a streamed
    `.npz`), so that a message reports the array the user saved, not the slice checked.
    """
    specs = input_specs(model)
    expected = f"the model expects {describe_inputs(specs)}"
    names = {spec.name for spec in specs}
    missing = sorted(names - data.keys())
    extra = sorted(data.keys() - names)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"not inputs of the model: {', '.join(extra)}")
        raise BadDataError(
            f"{source}: its keys ({', '.join(sorted(data)) or 'none'}) do not match the model's "
            f"input names ({'; '.join(parts)}); {expected}"
        )
    counts: dict[str, int] = {}
    for spec in specs:
        array = np.asarray(data[spec.name])
        shape = list((shapes or {}).get(spec.name, array.shape))
        if array.dtype != spec.dtype:
            raise BadDataError(
                f"{source}: '{spec.name}' is {array.dtype.name}, but {expected}"
            )
        if spec.shape is not None:
            wrong = array.ndim != len(spec.shape) or any(
                axis > 0 and isinstance(want, int) and got != want
                for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True))
            )
            if wrong:
                rows = "[" + ", ".join(["N", *map(_dim_text, spec.shape[1:])]) + "]"
                raise BadDataError(
                    f"{source}: '{spec.name}' has shape {shape}, but the model takes "
                    f"{rows if spec.shape else 'a scalar'} for it (samples stacked on axis 0); "
                    f"{expected}"
                )
        if array.ndim == 0 or array.shape[0] == 0:
            raise BadDataError(
                f"{source}: '{spec.name}' holds no samples (axis 0 stacks them); {expected}"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad_rows = np.flatnonzero(~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1))
            raise BadDataError(
                f"{source}: '{spec.name}' contains NaN or Inf in row {int(bad_rows[0])} "
                f"({len(bad_rows)} of {array.shape[0]} rows, stacked on axis 0); {expected}"
            )
        counts[spec.name] = array.shape[0]
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise BadDataError(
            f"{source}: inputs hold different numbers of samples ({listed}); {expected}"
        )


def _dim_text(dim: Dim) -> str:
    return "?" if dim is None else str(dim)


def sample_count(data: Mapping[str, np.ndarray]) -> int:
    return next(iter(data.values())).shape[0] if data else 0


def iter_batches(
    data: Mapping[str, np.ndarray], batch_size: int, model: ir.Model | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Slices of stacked data along axis 0, `batch_size` rows at a time.

    When `model` fixes an input's first dimension, batches have exactly that many rows.
    """
    if batch_size < 1:
        raise BadDataError(f"batch size must be at least 1, got {batch_size}")
    fixed: set[int] = set()
    if model is not None:
        fixed = {s.shape[0] for s in input_specs(model) if s.shape and isinstance(s.shape[0], int)}
    if fixed:
        batch_size = min(fixed)
    total = sample_count(data)
    for start in range(0, total, batch_size):
        batch = {name: array[start : start + batch_size] for name, array in data.items()}
        if fixed and sample_count(batch) != batch_size:
            # a model with a fixed batch cannot take the ragged tail
            logger.warning(
                "the model takes batches of exactly %d: the last %d samples are left out",
                batch_size,
                sample_count(batch),
            )
            return
        yield batch


def iter_feeds(
    feeds: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]],
) -> Iterator[Mapping[str, np.ndarray]]:
    """One feed dict, or an iterable of them, as a stream of feed dicts (never copied whole)."""
    if isinstance(feeds, Mapping):
        yield feeds
    else:
        yield from feeds
