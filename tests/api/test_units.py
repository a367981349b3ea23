"""A compression family written outside slimgraph gets sensitivity tables and the budget search
by implementing `api.budget.Units` on its own transformation (here: magnitude pruning of one
layer at a time, through `sg.prune(..., unstructured=True)`)."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.api.budget import (
    BudgetSearch,
    SensitivityTable,
    Unit,
    Units,
    search_units,
    table_of,
)
from slimgraph.ir import layer_name
from slimgraph.ir.select import exact_pattern
from slimgraph.runtime.budget import Budget, BudgetJudge, Evaluator
from slimgraph.runtime.metrics import load_data
from tests.kit.data import DIGITS, DIGITS_TEST


class MagnitudeUnits:
    """Zero 90% of the weights of any subset of the Conv/Gemm layers."""

    method = "magnitude"
    setting = "90% of the weights zeroed"

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self._units = [Unit(node.name, layer_name(node), node.op_type) for node in model.graph
                       if node.op_type in ("Conv", "Gemm")]

    def units(self) -> list[Unit]:
        return list(self._units)

    def build(self, skip: Sequence[str] = ()) -> ir.Model:
        if len(skip) >= len(self._units):
            return self.model
        return sg.prune(self.model, ratio=0.9, unstructured=True,
                        exclude=[exact_pattern(node) for node in skip])

    def only(self, unit: Unit) -> tuple[ir.Model, int | None]:
        others = [u.node for u in self._units if u.node != unit.node]
        return self.build(others), None


@pytest.fixture(scope="module")
def setup() -> tuple[ir.Model, Units, object]:
    model = sg.load(DIGITS)
    units: Units = MagnitudeUnits(model)  # the protocol, structurally
    return model, units, load_data(DIGITS_TEST, model)


@pytest.fixture(scope="module")
def table(setup) -> SensitivityTable:  # noqa: ANN001
    model, units, data = setup
    return table_of(units, Evaluator(model, data))


def test_a_family_outside_the_package_is_a_units(setup, table) -> None:  # noqa: ANN001
    _, units, _ = setup
    assert sorted(r.node for r in table.rows) == sorted(u.node for u in units.units())
    assert [r.change for r in table.rows] == sorted(r.change for r in table.rows)
    assert table.method == "magnitude" and "90%" in str(table)


def test_the_search_keeps_the_most_sensitive_units_of_any_family(setup, table) -> None:  # noqa: ANN001
    model, units, data = setup
    everything = Evaluator(model, data)(units.build()).cosine
    # the least sensitive layer alone compressed: a mix that holds, found by the search
    least = Evaluator(model, data)(units.build(table.most_sensitive(len(table.rows) - 1))).cosine
    assert everything is not None and least is not None and everything < least
    budget = Budget(min_cosine=least)
    judge = BudgetJudge(model, data, budget)
    search = BudgetSearch("magnitude pruning", budget.describe())
    kept = search_units(units, judge, search)
    assert kept and search.table is not None and search.tried
    assert kept == search.table.most_sensitive(len(kept))
    assert search.evaluation is not None and judge.holds(search.evaluation)
    assert search.evaluation.cosine >= least
