"""The README stands alone (issue 11, item 7): its Python quick start runs as written on the bundled
model, its recipe and pass list match the code, and it points at nothing a clone does not have."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from slimgraph.passes import registry
from slimgraph.passes.pipeline import build_pipeline, load_recipe
from slimgraph.passes.registry import PASSES, ensure_registered

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block(text: str, after: str, lang: str) -> str:
    start = text.index(f"```{lang}\n", text.index(after)) + len(f"```{lang}\n")
    return text[start : text.index("```", start)]


def test_readme_starts_with_the_two_set_up_commands() -> None:
    commands = re.findall(r"```\n(python -m pip install[^\n]*)\n```", README)
    assert commands == [
        "python -m pip install -e . && slimgraph demo",
        "python -m pip install -e '.[test]' && python -m pytest",
    ]
    assert README.index(commands[1]) < README.index("## Python")


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
    assert out[1].split()[:2] == ["output", "shape"]
    row = out[3].split()
    assert row[:3] == ["linear", "[450,", "10]"] and float(row[6]) > 30  # SQNR dB
    assert [line.split()[0] for line in out[8:11]] == ["fp32", "int8", "pruned"]
    assert (tmp_path / "digits.int8.onnx").is_file()


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
