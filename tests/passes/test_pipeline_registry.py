"""The pass registry: traits declared at registration, upstream passes as they are, the runner on
onnx_ir's PassManager, and pass modules that import no onnxruntime."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import pytest
from onnx import helper

from slimgraph.passes import registry
from slimgraph.passes.base import SlimgraphPass
from slimgraph.passes.pipeline import run_pipeline
from slimgraph.passes.registry import PASSES, REQUIRED, PassTable, ensure_registered, register_pass
from tests.kit.graphs import initializer, make_model

ROOT = Path(__file__).resolve().parents[2]
PASSES_DIR = ROOT / "slimgraph" / "passes"

# Modules of `slimgraph.passes` that may import onnxruntime / `slimgraph.runtime` at module level,
# by family prefix: they calibrate, evaluate under a budget, verify or train. Every other module
# (the registry, the pipeline, the exact rewrites) imports the runtime only inside the functions
# that run a model.
RUNTIME_USERS = (
    "slimgraph.passes.finetune",  # trains through slimgraph.runtime.finetune
    "slimgraph.passes.prune",  # prune_with_budget (MAC targets measured on data)
    "slimgraph.passes.quantize",  # calibration
    "slimgraph.passes.lowrank",  # factorize_with_report measures fidelity
)

# Imported in a fresh interpreter, with `slimgraph/__init__.py` (the public facade, which imports
# everything) left out: none of these may bring in onnxruntime or slimgraph.runtime.
PURE_MODULES = (
    "slimgraph.passes",
    "slimgraph.passes.registry",
    "slimgraph.passes.base",
    "slimgraph.passes.recipe",
    "slimgraph.passes.pipeline",
    "slimgraph.passes.cleanup",
    "slimgraph.passes.fuse",
    "slimgraph.passes.fuse_math",
    "slimgraph.passes.fuse_attention",
    "slimgraph.passes.opset",
    "slimgraph.passes.prune_heads",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: Path) -> list[str]:
    """Modules imported at module level (not inside functions or `if TYPE_CHECKING:`)."""
    names: list[str] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.append(node.module)
                names.extend(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    return names


def _imports_runtime(name: str) -> bool:
    return name.split(".")[0] == "onnxruntime" or name.startswith("slimgraph.runtime")


@pytest.mark.parametrize(
    "path", sorted(PASSES_DIR.rglob("*.py")), ids=lambda p: str(p.relative_to(PASSES_DIR))
)
def test_pass_modules_import_no_runtime_at_module_level(path: Path) -> None:
    module = _module_name(path)
    runtime = [name for name in _module_level_imports(path) if _imports_runtime(name)]
    if module.startswith(RUNTIME_USERS):
        return
    assert runtime == [], f"{module} imports {runtime} at module level"


def test_pure_pass_modules_load_without_onnxruntime() -> None:
    script = (
        "import importlib, sys, types\n"
        "package = types.ModuleType('slimgraph')\n"
        f"package.__path__ = [{str(ROOT / 'slimgraph')!r}]\n"
        "sys.modules['slimgraph'] = package\n"
        f"for name in {PURE_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'torch')\n"
        "                or m.startswith('slimgraph.runtime'))\n"
        "print(loaded)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_registered_traits_are_the_declared_ones() -> None:
    ensure_registered()
    assert PASSES.info("fuse-batchnorm").exact is True
    assert PASSES.info("quantize").exact is False and PASSES.info("prune").exact is False
    mark = PASSES.info("mark-units")
    assert mark.exact and mark.metadata_only
    assert not any(info.metadata_only for info in PASSES.infos() if info.name != "mark-units")
    finetune = PASSES.info("finetune").options or {}
    # from finetune_with_report (lr None: measured by a range test)
    assert finetune["epochs"] == 10 and finetune["lr"] is None
    assert PASSES.info("convert-opset").options == {"opset": REQUIRED}


def test_upstream_passes_are_registered_as_they_are_and_never_shadowed() -> None:
    ensure_registered()
    assert PASSES["topological-sort"] is common.TopologicalSortPass
    assert PASSES["inline-functions"] is common.InlinePass
    assert PASSES.info("topological-sort").options is None  # takes **kwargs: not checked
    upstream = {name for name in dir(common) if name.endswith("Pass")}
    for info in PASSES.infos():
        if info.cls.__module__.startswith("slimgraph."):
            assert info.cls.__name__ not in upstream, info.name
    guarded = PASSES["cse"]
    assert guarded.__name__ == "GuardedCommonSubexpressionEliminationPass"
    assert issubclass(guarded, SlimgraphPass)


class _Undeclared(SlimgraphPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)


class _SaysExact(_Undeclared):
    exact: ClassVar[bool] = True


def test_register_pass_needs_a_declared_and_consistent_exact() -> None:
    table_before = PASSES.infos()
    with pytest.raises(TypeError, match="must declare exact"):
        register_pass("test-undeclared")(_Undeclared)
    with pytest.raises(TypeError, match="says exact=True, registered with exact=False"):
        register_pass("test-contradiction", exact=False)(_SaysExact)
    with pytest.raises(ValueError, match="'cleanup' is already registered"):
        register_pass("cleanup", exact=True)(_Undeclared)
    assert PASSES.infos() == table_before
    try:
        assert register_pass("test-declared", exact=False)(_Undeclared) is _Undeclared
        assert PASSES.info("test-declared").exact is False
        PASSES["test-legacy"] = _SaysExact  # the mapping spelling: traits from the class
        assert PASSES.info("test-legacy").exact is True
    finally:
        PASSES.pop("test-declared", None)
        PASSES.pop("test-legacy", None)
    assert PASSES.infos() == table_before


def test_a_table_of_a_subset_describes_only_it(monkeypatch: pytest.MonkeyPatch) -> None:
    ensure_registered()
    monkeypatch.setattr(registry, "PASSES", PassTable([PASSES.info("fuse-pad")]))
    text = registry.describe_passes()
    assert "  fuse-pad (exact): " in text and "cleanup (exact)" not in text


def _conv_model() -> ir.Model:
    rng = np.random.default_rng(0)
    return make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("Identity", ["c"], ["y"]),
        ],
        [("x", [1, 2, 4, 4])],
        ["y"],
        [initializer("w", rng.standard_normal((3, 2, 1, 1)).astype(np.float32))],
    )


def test_the_runner_runs_every_step_through_one_pass_manager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    managers: list[list[str]] = []
    call = ir.passes.PassManager.call

    def spy(self: ir.passes.PassManager, model: ir.Model) -> ir.passes.PassResult:
        managers.append([str(p) for p in self.passes])
        return call(self, model)

    monkeypatch.setattr(ir.passes.PassManager, "call", spy)
    result = run_pipeline(_conv_model(), ["cleanup", "topological-sort"], verify=True)
    assert managers == [["cleanup", "topological-sort"]]
    assert [r.name for r in result.records] == ["cleanup", "topological-sort"]
    assert result.records[0].modified and result.records[0].fidelity is not None
    assert not result.records[1].modified


class _Boom(SlimgraphPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise KeyError("boom")


def test_a_failing_step_raises_its_own_error_not_the_managers_wrapping() -> None:
    register_pass("test-boom", exact=True)(_Boom)
    try:
        with pytest.raises(ir.passes.PassError, match="^pass 'test-boom' failed: KeyError") as info:
            run_pipeline(_conv_model(), ["cleanup", "test-boom"])
        assert isinstance(info.value.__cause__, KeyError)
    finally:
        del PASSES["test-boom"]
