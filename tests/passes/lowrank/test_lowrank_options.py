"""FactorizeOptions: one options dataclass behind `factorize` and `factorize_with_report`."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import slimgraph as sg
from slimgraph.api._options import BudgetOptions
from slimgraph.api.factorize import FactorizeOptions

# The public keyword signature, as it was written out by hand before the options dataclass.
_KEYWORDS = [
    ("rank_ratio", None), ("energy", None), ("rank", None), ("error_budget", None),
    ("include", None), ("exclude", None), ("op_types", ("Gemm", "MatMul", "Conv")),
    ("feeds", None), ("pointwise_convs", False), ("allow_growth", False), ("fold", True),
    ("method", "tucker"), ("layer_ratios", None), ("target_macs", None),
    ("data", None), ("budget", None), ("max_drop", None), ("min_cosine", None), ("metric", None),
]


@pytest.mark.parametrize("function", [sg.factorize, sg.factorize_with_report])
def test_public_signature_is_the_options_fields(function) -> None:
    params = list(inspect.signature(function).parameters.values())
    assert params[0].name == "model"
    assert params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert [(p.name, p.default) for p in params[1:]] == [*_KEYWORDS, ("options", None)]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])
    assert [f.name for f in dataclasses.fields(FactorizeOptions)] == [
        "data", "budget", "max_drop", "min_cosine", "metric", *(k for k, _ in _KEYWORDS[:14]),
    ]


def test_signature_return_annotations_and_docs_stay() -> None:
    assert inspect.signature(sg.factorize).return_annotation == "ir.Model"
    assert inspect.signature(sg.factorize_with_report).return_annotation == (
        "tuple[ir.Model, FactorizeReport]"
    )
    assert sg.factorize.__doc__.startswith("Low-rank factorization")
    assert sg.factorize.__name__ == "factorize"


def test_bad_calls_are_worded_as_python_words_them() -> None:
    with pytest.raises(TypeError, match=r"^factorize\(\) got an unexpected keyword argument 'x'$"):
        sg.factorize("m.onnx", x=1)
    with pytest.raises(
        TypeError, match=r"^factorize_with_report\(\) takes 1 positional argument but 2 were"
    ):
        sg.factorize_with_report("m.onnx", 0.5)
    with pytest.raises(
        TypeError, match=r"^factorize\(\) missing 1 required positional argument: 'model'$"
    ):
        sg.factorize(rank_ratio=0.5)


def test_options_rule_and_without_budget() -> None:
    options = FactorizeOptions(rank_ratio=0.5, exclude="fc*", feeds={}, max_drop=0.01, fold=False)
    assert options.rule() == {
        "rank_ratio": 0.5, "energy": None, "rank": None, "error_budget": None, "include": None,
        "exclude": "fc*", "op_types": ("Gemm", "MatMul", "Conv"), "pointwise_convs": False,
        "allow_growth": False, "fold": False, "method": "tucker", "layer_ratios": None,
    }
    plain = options.without_budget()
    assert isinstance(plain, FactorizeOptions) and plain.max_drop is None
    assert plain.rule() == options.rule() and plain.feeds == {}
    assert all(
        getattr(plain, f.name) is None for f in dataclasses.fields(BudgetOptions)
    )
    assert BudgetOptions().judge(None) is None  # type: ignore[arg-type]  # no limit: no judge
