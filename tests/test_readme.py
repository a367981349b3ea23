"""The README stands alone (issue 11, item 7; issue 22, item 7): it says what slimgraph does first,
its set-up commands install what its commands need, its Python quick start and its "your own model"
recipe run as written, its recipe and pass list match the code, and it points at nothing a clone
does not have."""

from __future__ import annotations

import re
import shlex
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest

from slimgraph.passes import registry
from slimgraph.passes.pipeline import build_pipeline, load_recipe
from slimgraph.passes.registry import PASSES, ensure_registered

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block(text: str, after: str, lang: str) -> str:
    start = text.index(f"```{lang}\n", text.index(after)) + len(f"```{lang}\n")
    return text[start : text.index("```", start)]


def test_readme_says_what_it_does_then_the_two_set_up_commands() -> None:
    first = README.split("\n\n")[1]  # the paragraph under the title
    assert first.startswith("slimgraph makes a trained PyTorch model or an ONNX file smaller")
    commands = re.findall(r"```\n(python -m pip install[^\n]*)\n```", README)
    assert commands == [
        "python -m pip install torch==2.13.0 && python -m pip install -e '.[all]' "
        "&& slimgraph demo",
        "python -m pip install torch==2.13.0 && python -m pip install -e '.[all,test]' "
        "&& python -m pytest",
    ]
    assert README.index("## Set up") < README.index(commands[1]) < README.index(
        "## Your own model in three steps") < README.index("## Python")


def test_the_set_up_command_installs_what_report_and_sweep_need() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["all"] == ["slimgraph[torch,report,sweep]"]
    assert any(r.startswith("matplotlib") for r in extras["report"])  # --report's plots
    assert any(r.startswith("dask[distributed]") for r in extras["sweep"])  # slimgraph sweep


def test_readme_points_only_inside_the_repository() -> None:
    assert "../shared" not in README and "DESIGN.md" not in README
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        assert (ROOT / link).is_file(), link
    for doc in ("architecture.md", "contract.md", "recipes.md", "recipe.schema.json"):
        assert (ROOT / "docs" / doc).is_file()
        assert "../shared" not in (ROOT / "docs" / doc).read_text()


def test_readme_quick_start_runs_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    code = _block(README, "On the bundled model", "python")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "2673280 -> 673088 MACs"
    assert out[1].split()[0] == "data" and out[1].endswith("digits_test.npz (450 samples)")
    assert out[3].split()[:2] == ["output", "shape"]
    row = out[5].split()
    assert row[:3] == ["linear", "[450,", "10]"] and float(row[6]) > 30  # SQNR dB
    assert out[8].startswith("top-1 accuracy ('labels', 450 samples): reference 99.56%")
    assert [line.split()[0] for line in out[11:14]] == ["fp32", "int8", "pruned"]
    assert (tmp_path / "digits.int8.onnx").is_file()
    assert "`round_to=8` (`--round-to 8`) rounds the channels each pruned group keeps" in README


def _recipe_blocks() -> list[tuple[str, str]]:
    """The fenced blocks of "Your own model in three steps", in order: (language, code)."""
    section = README[README.index("## Your own model in three steps"):README.index("## Python")]
    found = re.findall(r"\n( *)```(\w*)\n(.*?)\n\1```", section, re.S)
    return [(lang or "shell", textwrap.dedent(code)) for _, lang, code in found]


def _trained_digits_cnn() -> tuple[object, dict[str, np.ndarray]]:
    """A user's own model and data: a small CNN (not the bundled one) trained briefly on
    scikit-learn's digits, and the arrays the recipe names."""
    torch = pytest.importorskip("torch")
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = (digits.images / 16.0)[:, None]  # float64 [1797, 1, 8, 8], as scikit-learn gives it
    y = digits.target.astype(np.int64)
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.bn1 = torch.nn.BatchNorm2d(16)
            self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1, stride=2)
            self.fc = torch.nn.Linear(32 * 16, 10)

        def forward(self, x):  # noqa: ANN001, ANN202
            x = torch.relu(self.bn1(self.conv1(x)))
            return self.fc(torch.relu(self.conv2(x)).flatten(1))

    net = Net()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    inputs, targets = torch.as_tensor(x[:1200], dtype=torch.float32), torch.from_numpy(y[:1200])
    for _ in range(40):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(inputs), targets).backward()
        optimizer.step()
    return net, {"x_calib": x[:200], "x_val": x[1200:], "y_val": y[1200:]}


def test_your_own_model_recipe_runs_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    from slimgraph.tools.cli import main

    net, arrays = _trained_digits_cnn()
    blocks = _recipe_blocks()
    assert [lang for lang, _ in blocks] == ["python", "python", "shell", "python"]
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {"__name__": "readme", "net": net, **arrays}
    for step, (lang, code) in enumerate(blocks, 1):
        if lang == "python":
            exec(compile(code, f"README.md (step {step})", "exec"), scope)  # noqa: S102
            continue
        for line in code.splitlines():  # the command lines, run by the entry point
            argv = shlex.split(line)
            assert argv[0] == "slimgraph"
            assert main(argv[1:]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "['x']" in out  # step 1 prints the input names: forward(self, x)
    assert "fidelity on val.npz (597 samples):" in out  # quantize --data prints fidelity...
    accuracy = re.search(r"top-1 accuracy \('labels', 597 samples\): reference (\d+\.\d\d)%", out)
    assert accuracy and float(accuracy.group(1)) > 90  # ...and both models' accuracy
    assert out.count("top-1 accuracy ('labels', 597 samples)") == 2  # the CLI and sg.compare
    assert (tmp_path / "model.int8.onnx").is_file()
    with np.load(tmp_path / "val.npz") as saved:
        assert sorted(saved.files) == ["labels", "x"]



@pytest.mark.parametrize("source", ["README.md", "docs/recipes.md"])
def test_documented_recipe_builds(source: str, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(_block((ROOT / source).read_text(), "## Recipes" if source == "README.md"
                             else "# Recipes", "yaml"))  # fmt: skip
    steps = build_pipeline(load_recipe(recipe))
    assert [s.name for s in steps][-4:] == [
        "prune", "lowrank-linear", "tucker-conv", "quantize-dynamic"
    ]


def _slimgraph_passes() -> registry.PassTable:
    """The registry without passes that tests register for themselves (the sweep's test steps)."""
    ensure_registered()
    return registry.PassTable(
        info for info in PASSES.infos() if not info.cls.__module__.startswith("tests.")
    )


def test_readme_pass_table_lists_every_registered_pass() -> None:
    table = README[README.index("| step | kind |") : README.index("| presets |")]
    names = re.findall(r"`([a-z0-9-]+)`", table)
    assert set(names) == set(_slimgraph_passes()), "the README's pass table and the registry differ"


def test_recipes_doc_lists_the_passes_as_the_cli_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "PASSES", _slimgraph_passes())
    doc = (ROOT / "docs" / "recipes.md").read_text()
    block = f"```\n{registry.describe_passes()}\n```"
    assert block in doc, "regenerate it with slimgraph optimize --list-passes"
