"""Packaging (issue 12, item 7): torch is an extra, `import slimgraph` is light, CI gates on
ruff and mypy.

The no-torch tests run slimgraph in a subprocess whose import system refuses `torch` exactly as an
environment without it does (`ModuleNotFoundError`, name "torch"), so they hold on a machine that
has torch installed.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph._optional import TORCH_MISSING, require, require_torch
from slimgraph.errors import BadInputError, MissingExtraError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "slimgraph" / "data"
DIGITS = DATA / "digits_cnn.onnx"

# Prepended to a subprocess's code: torch (and every torch.* module) cannot be imported.
_NO_TORCH = """
import sys


class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTorch())
"""
_CLI = "from slimgraph.tools.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def _python(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd,
        timeout=300,
    )  # fmt: skip


def _without_torch(
    code: str, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return _python(_NO_TORCH + code, *args, cwd=cwd)


# -- import slimgraph is light --------------------------------------------------------------------


def test_import_slimgraph_imports_neither_torch_nor_onnxruntime() -> None:
    result = _python(
        "import sys\nimport slimgraph\n"
        "assert 'torch' not in sys.modules, 'torch'\n"
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime'\n"
        "import slimgraph.runtime, slimgraph.runtime.feeds\n"
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime after slimgraph.runtime'\n"
        "print('ok')\n"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"


def test_onnxruntime_is_imported_with_the_first_session() -> None:
    result = _python(
        "import sys\nimport slimgraph as sg\n"
        f"model = sg.load({str(DIGITS)!r})\n"
        "assert 'onnxruntime' not in sys.modules\n"
        "from slimgraph.runtime.session import create_session, is_session\n"
        "assert not is_session(model) and 'onnxruntime' not in sys.modules\n"
        "session = create_session(model)\n"
        "print(is_session(session), 'onnxruntime' in sys.modules, 'torch' in sys.modules)\n"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "True True False\n"


def test_every_public_name_resolves_and_dir_lists_it() -> None:
    for module in (sg, sg.runtime):
        assert set(module.__all__) <= set(dir(module)), module.__name__
        for name in module.__all__:
            assert getattr(module, name) is not None, (module.__name__, name)
    assert sg.load is sg.ir.load and sg.quantize.__module__.startswith("slimgraph.api.quantize")
    assert sg.runtime.calibrated_ranges.__name__ == "calibrated_ranges"
    with pytest.raises(AttributeError, match="module 'slimgraph' has no attribute 'nope'"):
        sg.nope  # noqa: B018
    with pytest.raises(AttributeError, match="module 'slimgraph.runtime' has no attribute 'x'"):
        sg.runtime.x  # noqa: B018


def test_runtime_compare_is_the_function_after_its_module_is_imported() -> None:
    importlib.import_module("slimgraph.runtime.compare")
    compare_module = sys.modules["slimgraph.runtime.compare"]
    assert callable(sg.runtime.compare) and sg.runtime.compare is compare_module.compare
    assert sg.compare is compare_module.compare
    from slimgraph.runtime import compare

    assert compare is compare_module.compare


# -- the one torch check --------------------------------------------------------------------------


def test_require_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # what `import torch` sees when it is absent
    with pytest.raises(MissingExtraError) as error:
        require_torch()
    assert str(error.value) == "torch is not installed: pip install 'slimgraph[torch]'"
    assert str(error.value) == TORCH_MISSING
    assert error.value.extra == "torch"
    assert isinstance(error.value, BadInputError) and error.value.exit_code == 2


def test_require_reraises_a_broken_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed module whose own import fails is not reported as 'not installed'."""
    (tmp_path / "sg_broken_extra").mkdir()
    (tmp_path / "sg_broken_extra" / "__init__.py").write_text("import sg_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as error:
        require("sg_broken_extra", "demo")
    assert error.value.name == "sg_no_such_dependency"
    assert require("json", "none") is json


# -- the core without torch -----------------------------------------------------------------------


def test_quantize_and_inspect_work_without_torch(tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = _without_torch(
        _CLI, "quantize", str(DIGITS), "-o", str(out), "--mode", "dynamic", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    quantized = ir.load(out)
    ops = {node.op_type for node in quantized.graph.all_nodes()}
    assert {"DynamicQuantizeLinear", "ConvInteger"} <= ops or "MatMulInteger" in ops, ops
    result = _without_torch(_CLI, "inspect", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["inputs"][0]["name"] == "image" and summary["nodes"] == len(
        list(quantized.graph.all_nodes())
    )


def test_python_core_works_without_torch_and_torch_paths_name_the_extra() -> None:
    result = _without_torch(
        "import numpy as np\nimport slimgraph as sg\n"
        f"model = sg.load({str(DIGITS)!r})\n"
        "q = sg.quantize(model, mode='dynamic')\n"
        "p = sg.prune(model, ratio=0.5)\n"
        "feeds = sg.random_feeds(model, batch=4)\n"
        "print(sg.compare(model, q, feeds).worst_cosine > 0.99)\n"
        "for call in (lambda: sg.from_torch(object(), ()),\n"
        f"             lambda: sg.finetune(p, {str(DATA / 'digits_train.npz')!r}, epochs=1)):\n"
        "    try:\n"
        "        call()\n"
        "    except sg.SlimgraphError as error:\n"
        "        print(type(error).__name__, error.exit_code, error)\n"
        "print('torch' in sys.modules)\n"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    missing = f"MissingExtraError 2 {TORCH_MISSING}"
    assert result.stdout.splitlines() == ["True", missing, missing, "False"]


@pytest.mark.parametrize(
    "args",
    [
        ["finetune", str(DIGITS), "-o", "out.onnx", "--data", str(DATA / "digits_train.npz"),
         "--epochs", "1"],
        ["quantize", str(DIGITS), "-o", "out.onnx", "--zero-shot"],
        ["demo"],
    ],
    ids=["finetune", "quantize-zero-shot", "demo"],
)  # fmt: skip
def test_torch_commands_exit_2_naming_the_extra(args: list[str], tmp_path: Path) -> None:
    result = _without_torch(_CLI, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"slimgraph {args[0]}: error: {TORCH_MISSING}\n"
    assert result.stdout == ""
    assert not (tmp_path / "out.onnx").exists()


# -- what installs what, and what CI gates on -----------------------------------------------------


def test_torch_is_an_extra_with_a_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.split(">")[0].split("=")[0] == "torch"]
    extras = project["optional-dependencies"]
    assert extras["torch"] == ["torch>=2.6"]
    assert "slimgraph[torch]" in extras["bench"]  # torch-pruning's own torch>=2.0 is looser
    assert any(d.startswith("mypy") for d in extras["test"])
    assert any(d.startswith("ruff") for d in extras["test"])


def test_mypy_config_is_honest() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert "ignore_errors" not in config and "ignore_missing_imports" not in config
    for override in config.get("overrides", []):
        assert set(override) <= {"module", "ignore_missing_imports"}, override
        assert not any(m.startswith("slimgraph") for m in override["module"]), override


def test_ci_installs_the_local_torch_first_and_gates_on_ruff_and_mypy() -> None:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip().startswith("python -m ")]  # fmt: skip
    steps = [" ".join(line.split()[:4]) for line in lines]
    assert steps == [
        "python -m pip install", "python -m pip install", "python -m ruff check",
        "python -m mypy slimgraph", "python -m pytest",
    ]  # fmt: skip
    assert lines[0].endswith(" torch==2.13.0")
    assert lines[1].endswith(" -e '.[torch,test]'")
    assert lines[2] == "python -m ruff check slimgraph tests"
