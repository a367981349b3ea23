"""Property tests (hypothesis) for the fold math: BN into Conv / grouped ConvTranspose / Gemm,
Pad-to-Conv index logic, and transpose composition, each against onnxruntime or numpy."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from slimgraph.passes import fuse
from slimgraph.passes.cleanup import SimplifyShapeChainsPass
from slimgraph.passes.fuse_math import compose_permutations, pad_to_conv_pads
from tests.kit.asserts import assert_same_outputs
from tests.kit.graphs import initializer, make_model, ops

ORT_SETTINGS = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _bn_inits(rng: np.random.Generator, channels: int) -> list:
    return [
        initializer("g", rng.uniform(0.2, 2.0, channels).astype(np.float32)),
        initializer("b", rng.standard_normal(channels).astype(np.float32)),
        initializer("m", rng.standard_normal(channels).astype(np.float32)),
        initializer("v", rng.uniform(0.01, 3.0, channels).astype(np.float32)),
    ]


def _bn(x: str, eps: float):
    return helper.make_node("BatchNormalization", [x, "g", "b", "m", "v"], ["y"], epsilon=eps)


eps_values = st.sampled_from([1e-5, 1e-3, 0.1])


@ORT_SETTINGS
@given(
    seed=st.integers(0, 2**16),
    group=st.sampled_from([1, 2, 3]),
    per_group_in=st.integers(1, 3),
    per_group_out=st.integers(1, 3),
    kernel=st.integers(1, 3),
    bias=st.booleans(),
    eps=eps_values,
)
def test_bn_into_conv_any_shape(
    seed, group, per_group_in, per_group_out, kernel, bias, eps
) -> None:
    rng = np.random.default_rng(seed)
    c_in, c_out = group * per_group_in, group * per_group_out
    weight = rng.standard_normal((c_out, per_group_in, kernel, kernel)).astype(np.float32)
    inits = [initializer("w", weight)]
    inputs = ["x", "w"]
    if bias:
        inits.append(initializer("cb", rng.standard_normal(c_out).astype(np.float32)))
        inputs.append("cb")
    model = make_model(
        [helper.make_node("Conv", inputs, ["c"], group=group), _bn("c", eps)],
        [("x", [2, c_in, 5, 5])],
        ["y"],
        inits + _bn_inits(rng, c_out),
    )
    reference = model.clone()
    fuse.FuseBatchNormPass()(model)
    assert ops(model) == {"Conv": 1}
    assert_same_outputs(reference, model)


@ORT_SETTINGS
@given(
    seed=st.integers(0, 2**16),
    group=st.sampled_from([1, 2, 3]),
    per_group_in=st.integers(1, 3),
    per_group_out=st.integers(1, 3),
    stride=st.integers(1, 2),
    eps=eps_values,
)
def test_bn_into_grouped_conv_transpose(
    seed, group, per_group_in, per_group_out, stride, eps
) -> None:
    rng = np.random.default_rng(seed)
    c_in, c_out = group * per_group_in, group * per_group_out
    weight = rng.standard_normal((c_in, per_group_out, 3, 3)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=group, strides=[stride] * 2),
            _bn("c", eps),
        ],
        [("x", [1, c_in, 4, 4])],
        ["y"],
        [initializer("w", weight)] + _bn_inits(rng, c_out),
    )
    reference = model.clone()
    fuse.FuseBatchNormPass()(model)
    assert ops(model) == {"ConvTranspose": 1}
    assert_same_outputs(reference, model)


@ORT_SETTINGS
@given(
    seed=st.integers(0, 2**16),
    m=st.integers(1, 4),
    k=st.integers(1, 6),
    n=st.integers(1, 6),
    trans_b=st.booleans(),
    bias_shape=st.sampled_from(["none", "n", "1n", "mn"]),
    beta=st.sampled_from([1.0, 0.5]),
    eps=eps_values,
)
def test_bn_into_gemm(seed, m, k, n, trans_b, bias_shape, beta, eps) -> None:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [initializer("w", weight)]
    inputs = ["x", "w"]
    shapes = {"n": (n,), "1n": (1, n), "mn": (m, n)}
    if bias_shape != "none":
        inits.append(initializer("gb", rng.standard_normal(shapes[bias_shape]).astype(np.float32)))
        inputs.append("gb")
    model = make_model(
        [helper.make_node("Gemm", inputs, ["c"], transB=int(trans_b), beta=beta), _bn("c", eps)],
        [("x", [m, k])],
        ["y"],
        inits + _bn_inits(rng, n),
    )
    reference = model.clone()
    fuse.FuseBatchNormPass()(model)
    assert ops(model) == {"Gemm": 1}
    assert_same_outputs(reference, model)


@st.composite
def pads_case(draw):
    rank = draw(st.integers(3, 5))
    spatial = rank - 2
    begins = draw(st.lists(st.integers(0, 3), min_size=spatial, max_size=spatial))
    ends = draw(st.lists(st.integers(0, 3), min_size=spatial, max_size=spatial))
    listed = draw(st.permutations(range(2, rank)))
    negative = draw(st.booleans())
    return rank, begins, ends, listed, negative


@settings(max_examples=200, deadline=None)
@given(pads_case())
def test_pad_to_conv_pads_index_logic(case) -> None:
    rank, begins, ends, listed, negative = case
    full = [0, 0, *begins, 0, 0, *ends]
    assert pad_to_conv_pads(full, None, rank) == begins + ends
    # the same pads given for a permuted list of axes (possibly as negative axis numbers)
    axes = [a - rank if negative else a for a in listed]
    pads = [begins[a - 2] for a in listed] + [ends[a - 2] for a in listed]
    assert pad_to_conv_pads(pads, axes, rank) == begins + ends
    # padding the channel axis, or cropping, can never go into a Conv
    assert pad_to_conv_pads([0, 1, *begins, 0, 0, *ends], None, rank) is None
    if any(begins):
        crop = [0, 0, *[-b for b in begins], 0, 0, *ends]
        assert pad_to_conv_pads(crop, None, rank) is None
    assert pad_to_conv_pads(full[:-1], None, rank) is None


@ORT_SETTINGS
@given(
    seed=st.integers(0, 2**16),
    pads=st.lists(st.integers(0, 2), min_size=4, max_size=4),
    conv_pads=st.lists(st.integers(0, 1), min_size=4, max_size=4),
    opset=st.sampled_from([9, 13, 18]),
)
def test_pad_folding_on_onnxruntime(seed, pads, conv_pads, opset) -> None:
    rng = np.random.default_rng(seed)
    full = [0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]]
    if opset < 11:
        pad = helper.make_node("Pad", ["x"], ["p"], pads=full)
        inits = []
    else:
        pad = helper.make_node("Pad", ["x", "pads"], ["p"])
        inits = [initializer("pads", np.array(full, np.int64))]
    model = make_model(
        [pad, helper.make_node("Conv", ["p", "w"], ["y"], pads=conv_pads)],
        [("x", [1, 2, 5, 6])],
        ["y"],
        [initializer("w", rng.standard_normal((3, 2, 3, 3)).astype(np.float32)), *inits],
        opset=opset,
    )
    reference = model.clone()
    assert fuse.FusePadPass()(model).modified
    assert ops(model) == {"Conv": 1}
    assert_same_outputs(reference, model)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5).flatmap(lambda r: st.tuples(*[st.permutations(range(r))] * 2)))
def test_transpose_composition(perms) -> None:
    first, second = perms
    x = np.arange(int(np.prod([2 + i for i in range(len(first))]))).reshape(
        [2 + i for i in range(len(first))]
    )
    expected = np.transpose(np.transpose(x, first), second)
    np.testing.assert_array_equal(np.transpose(x, compose_permutations(first, second)), expected)


@ORT_SETTINGS
@given(st.integers(2, 4).flatmap(lambda r: st.tuples(*[st.permutations(range(r))] * 2)))
def test_transpose_chain_rewrite_on_onnxruntime(perms) -> None:
    first, second = perms
    rank = len(first)
    model = make_model(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=list(first)),
            helper.make_node("Transpose", ["t"], ["y"], perm=list(second)),
        ],
        [("x", [2 + i for i in range(rank)])],
        ["y"],
    )
    reference = model.clone()
    SimplifyShapeChainsPass()(model)
    composed = compose_permutations(first, second)
    if composed == list(range(rank)):
        assert ops(model) == {"Identity": 1}  # x is a graph input: an Identity keeps y's name
    else:
        assert ops(model) == {"Transpose": 1}
        assert list(next(iter(model.graph)).attributes.get_ints("perm")) == composed
    assert_same_outputs(reference, model)


@ORT_SETTINGS
@given(
    seed=st.integers(0, 2**16),
    layer=st.sampled_from(["Conv", "ConvTranspose", "Gemm"]),
    group=st.sampled_from([1, 2]),
    op=st.sampled_from(["Mul", "Add", "Sub"]),
    const_shape=st.sampled_from(["scalar", "1", "C", "1C11", "C11", "C1", "11HW", "CHW"]),
    const_left=st.booleans(),
)
def test_fold_affine_broadcast_logic(seed, layer, group, op, const_shape, const_left) -> None:
    """Whatever the constant's shape, the pass either folds exactly or leaves the graph alone;
    it folds exactly when the constant is per-channel (or scalar) and on the right of a Sub."""
    rng = np.random.default_rng(seed)
    # spatial size = rows = channels, so every constant shape below broadcasts validly and
    # a vector of C values may sit on a non-channel axis
    c_in, channels = 2 * group, 2 * group
    size = channels
    if layer == "Gemm":
        group = 1
        weight = rng.standard_normal((c_in, channels)).astype(np.float32)
        x_shape, out_rank = [channels, c_in], 2
        node = helper.make_node("Gemm", ["x", "w"], ["l"])
    elif layer == "Conv":
        weight = rng.standard_normal((channels, c_in // group, 1, 1)).astype(np.float32)
        x_shape, out_rank = [1, c_in, size, size], 4
        node = helper.make_node("Conv", ["x", "w"], ["l"], group=group)
    else:
        weight = rng.standard_normal((c_in, channels // group, 1, 1)).astype(np.float32)
        x_shape, out_rank = [1, c_in, size, size], 4
        node = helper.make_node("ConvTranspose", ["x", "w"], ["l"], group=group)
    shapes = {
        "scalar": (),
        "1": (1,),
        "C": (channels,),
        "1C11": (1, channels, 1, 1),
        "C11": (channels, 1, 1),
        "C1": (channels, 1),
        "11HW": (1, 1, size, size),
        "CHW": (channels, size, size),
    }
    shape = shapes[const_shape]
    const = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    inputs = ["k", "l"] if const_left else ["l", "k"]
    model = make_model(
        [node, helper.make_node(op, inputs, ["y"])],
        [("x", x_shape)],
        ["y"],
        [initializer("w", weight), initializer("k", const)],
    )
    padded = (1,) * (out_rank - len(shape)) + shape if len(shape) <= out_rank else None
    per_channel = padded is not None and all(
        d == 1 or (axis == 1 and d == channels) for axis, d in enumerate(padded)
    )
    reference = model.clone()
    result = fuse.FoldAffinePass()(model)
    assert result.modified == (per_channel and not (op == "Sub" and const_left))
    if result.modified:
        assert ops(model) == {layer: 1}
    assert_same_outputs(reference, model)


_FACTORIZATIONS_24 = [
    [24], [2, 12], [4, 6], [6, 4], [2, 3, 4], [3, 2, 4], [1, 24], [2, 2, 6], [4, 3, 2]
]


@ORT_SETTINGS
@given(
    middle=st.sampled_from(_FACTORIZATIONS_24),
    final=st.sampled_from(_FACTORIZATIONS_24),
    zeros=st.lists(st.booleans(), min_size=3, max_size=3),
    infer=st.integers(-1, 2),
    dynamic_batch=st.booleans(),
)
def test_reshape_chain_rewrite_with_zero_and_minus_one(
    middle, final, zeros, infer, dynamic_batch
) -> None:
    """Reshape(Reshape(x, a), b) == Reshape(x, b') for targets using 0 (copy) and -1 (infer)."""
    spec = list(final)
    for i in range(len(spec)):
        if i < len(middle) and zeros[i] and middle[i] == final[i]:
            spec[i] = 0
    if 0 <= infer < len(spec) and spec[infer] != 0 and 0 not in spec:
        spec[infer] = -1
    model = make_model(
        [
            helper.make_node("Reshape", ["x", "a"], ["m"]),
            helper.make_node("Reshape", ["m", "b"], ["y"]),
        ],
        [("x", ["n" if dynamic_batch else 2, 3, 4])],
        ["y"],
        [initializer("a", np.array(middle, np.int64)), initializer("b", np.array(spec, np.int64))],
    )
    reference = model.clone()
    SimplifyShapeChainsPass()(model)
    assert ops(model) == {"Reshape": 1}
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)}
    assert_same_outputs(reference, model, feeds)
