"""Messages in command-line terms and no silent no-ops (issue 11, items 2, 5 and 6).

Each test is one example a new user hit, with the exact message or figure expected.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import slimgraph as sg
from slimgraph.tools.cli import main
from tests.kit.data import DIGITS, DIGITS_CALIB
from tests.kit.files import folder_state


def test_bad_number_is_one_line_exit_2(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["prune", str(DIGITS), "-o", str(tmp_path / "p.onnx"), "--ratio", "abc"])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "slimgraph prune: error: argument --ratio: invalid float value: 'abc' "
        "(see slimgraph prune --help)\n"
    )


def test_factorize_without_a_rank_rule_names_the_flags(cli, tmp_path: Path) -> None:
    result = cli("factorize", DIGITS, "-o", tmp_path / "f.onnx")
    assert (result.code, result.out) == (2, "")
    assert result.err == (
        "slimgraph factorize: error: give a rank rule: --rank-ratio R, --energy E, "
        "--error-budget B or --rank auto|K\n"
    )


def test_dynamic_quantize_json_reports_the_written_format(cli, tmp_path: Path) -> None:
    target = tmp_path / "dq.onnx"
    data = cli("quantize", DIGITS, "-o", target, "--mode", "dynamic", "--json").json()
    ops = [node.op_type for node in sg.load(target).graph]
    assert "MatMulInteger" in ops and "QuantizeLinear" not in ops
    assert (data["mode"], data["format"]) == ("dynamic", "dynamic")
    assert data["quantized_ops"]["MatMulInteger"] == sum(op == "MatMulInteger" for op in ops)


def test_float64_data_is_cast_with_a_note(cli, tmp_path: Path, caplog) -> None:
    with np.load(DIGITS_CALIB) as archive:
        images = archive["image"]
    as64 = tmp_path / "digits64.npz"
    np.savez(as64, image=images.astype(np.float64))  # scikit-learn's default dtype
    as32 = tmp_path / "digits32.npz"
    np.savez(as32, image=images)
    with caplog.at_level(logging.WARNING, logger="slimgraph.runtime.feeds"):
        result = cli("compare", DIGITS, DIGITS, "--data", as64, "--json")
    assert result.code == 0
    assert f"note: {as64}: 'image' is float64; cast to float32, the model's input type" in (
        caplog.messages
    )
    reference = cli("compare", DIGITS, DIGITS, "--data", as32, "--json").json()
    assert result.json()["outputs"] == reference["outputs"]


def test_nan_message_names_the_row(cli, tmp_path: Path) -> None:
    with np.load(DIGITS_CALIB) as archive:
        images = archive["image"].copy()
    images[17, 0, 3, 3] = np.nan
    images[42, 0, 0, 0] = np.inf
    data = tmp_path / "nan.npz"
    np.savez(data, image=images)
    result = cli("compare", DIGITS, DIGITS, "--data", data)
    assert result.code == 2
    assert result.err == (
        f"slimgraph compare: error: {data}: 'image' contains NaN or Inf in row 17 "
        "(2 of 200 rows, stacked on axis 0); the model expects image: float32[batch, 1, 8, 8]\n"
    )


@pytest.fixture(scope="module")
def fixed_batch_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    path = tmp_path_factory.mktemp("fixed") / "fixed.onnx"
    sg.save(sg.from_torch(module, (torch.randn(1, 1, 8, 8),), dynamic_batch=False), path)
    return path


@pytest.mark.parametrize("command", ["bench", "compare"])
def test_batch_on_a_fixed_batch_model_is_an_error(cli, fixed_batch_model: Path,
                                                   command: str) -> None:  # fmt: skip
    models = [fixed_batch_model] * (2 if command == "compare" else 1)
    before = folder_state(fixed_batch_model.parent)
    result = cli(command, *models, "--batch", "64")
    assert (result.code, result.out) == (2, "")
    name = sg.load(fixed_batch_model).graph.inputs[0].name
    assert result.err == (
        f"slimgraph {command}: error: --batch 64: {fixed_batch_model} has a fixed batch of 1 "
        f"(input '{name}' is [1, 1, 8, 8]), so it cannot run 64 rows; export it with a symbolic "
        "batch (slimgraph.from_torch does by default) or leave out --batch\n"
    )
    assert folder_state(fixed_batch_model.parent) == before


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quantize_batch_on_a_fixed_batch_model_is_an_error(cli, fixed_batch_model: Path,
                                                           mode: str) -> None:  # fmt: skip
    """quantize's --batch is its calibration rows per run too: left unused, it was accepted."""
    before = folder_state(fixed_batch_model.parent)
    out = fixed_batch_model.parent / "out.onnx"
    result = cli("quantize", fixed_batch_model, "-o", out, "--mode", mode, "--batch", "64",
                 "--no-speed-check")  # fmt: skip
    name = sg.load(fixed_batch_model).graph.inputs[0].name
    assert (result.code, result.out) == (2, "")
    assert result.err == (
        f"slimgraph quantize: error: --batch 64: {fixed_batch_model} has a fixed batch of 1 "
        f"(input '{name}' is [1, 1, 8, 8]), so it cannot run 64 rows; export it with a symbolic "
        "batch (slimgraph.from_torch does by default) or leave out --batch\n"
    )
    assert folder_state(fixed_batch_model.parent) == before


def test_compare_without_batch_uses_the_fixed_batch(cli, fixed_batch_model: Path) -> None:
    result = cli("compare", fixed_batch_model, fixed_batch_model)
    assert result.code == 0
    assert "data       random inputs (4 batches of 1, seed 0)" in result.out


def test_list_passes_shows_options_presets_and_commands(cli) -> None:
    result = cli("optimize", "--list-passes")
    assert result.code == 0
    lines = result.out.splitlines()
    prune = lines.index(
        "  prune (approximate): Structured channel pruning (or unstructured magnitude pruning) "
        "on a copy of the model."
    )
    assert lines[prune + 1] == (
        "      options: ratio=required, criterion='l1', scope='local', round-to=None, pad=False, "
        "exclude=(), exclude-ops=(), unstructured=False, prune-output=(), seed=0, "
        "layer-ratios=None"
    )
    assert "  lossless: cleanup, fuse-pad, sum-to-add, fuse-batchnorm, fold-affine, " \
        "matmul-add-to-gemm, cleanup, mark-units, compact-constants" in lines
    assert "  factorize: lowrank-linear (Gemm/MatMul, SVD) then tucker-conv (Conv, Tucker-2)" in (
        lines
    )


def test_optimize_still_needs_model_and_output(cli) -> None:
    result = cli("optimize", DIGITS)
    assert (result.code, result.err) == (
        2, "slimgraph optimize: error: the following arguments are required: -o/--output\n"
    )


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_recipe_with_command_names_runs(cli, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, (
        "version: 1\n"
        "steps:\n"
        "  - lossless\n"
        "  - name: prune\n"
        "    ratio: 0.5\n"
        "    round-to: 8\n"
        "  - name: factorize\n"
        "    rank-ratio: 0.5\n"
        "  - name: quantize\n"
        "    mode: dynamic\n"
    ))  # fmt: skip
    target = tmp_path / "out.onnx"
    result = cli("optimize", DIGITS, "-o", target, "--recipe", recipe, "--json")
    assert result.code == 0, result.err
    names = [p["name"] for p in result.json()["passes"]]
    assert names[-4:] == ["prune", "lowrank-linear", "tucker-conv", "quantize-dynamic"]
    ops = {node.op_type for node in sg.load(target).graph}
    assert "MatMulInteger" in ops


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps:\n  - name: factorize\n    energi: 0.9\n",
         "recipe step 'factorize': unknown option 'energi' (did you mean 'energy'?); it takes: "
         "rank-ratio, energy, error-budget, rank, include, exclude, op-types, allow-growth, "
         "layer-ratios, fold, pointwise-convs"),
        ("steps:\n  - name: factorize\n",
         "recipe step 'factorize': give a rank rule: rank-ratio, energy, error-budget or rank "
         "(auto or an integer)"),
        ("steps:\n  - name: prune\n    criterion: l1\n",
         "recipe step 'prune': option 'ratio' is required; it takes: ratio, criterion, scope, "
         "round-to, pad, exclude, exclude-ops, unstructured, prune-output, seed, layer-ratios"),
        ("steps:\n  - name: quantize\n    mode: dynamic\n    format: qdq\n",
         "recipe step 'quantize' (pass 'quantize-dynamic'): unknown option 'format'; it takes: "
         "per-channel, exclude, op-types, matmul-kernel, exclude-ops"),
        ("version: 2\nsteps: [lossless]\n",
         "recipe {path}: version 2 is not supported (this slimgraph reads version 1)"),
        ("version: 1\nstep: [lossless]\n",
         "recipe {path}: unknown key 'step' (a recipe has version, description, steps, passes)"),
    ],
)
def test_recipe_mistakes_in_cli_terms(cli, tmp_path: Path, text: str, message: str) -> None:
    recipe = _recipe(tmp_path, text)
    target = tmp_path / "out.onnx"
    result = cli("optimize", DIGITS, "-o", target, "--recipe", recipe)
    assert (result.code, result.out) == (2, "")
    assert result.err == f"slimgraph optimize: error: {message.format(path=recipe)}\n"
    assert not target.exists()


def test_recipe_schema_is_json_and_matches_the_reader(tmp_path: Path) -> None:
    from slimgraph.passes.pipeline import RECIPE_SCHEMA, RECIPE_VERSION

    schema = json.loads((Path(__file__).parents[2] / "docs" / "recipe.schema.json").read_text())
    assert schema == json.loads(json.dumps(RECIPE_SCHEMA))
    assert schema["oneOf"][1]["properties"]["version"] == {"const": RECIPE_VERSION}


def test_a_misspelt_option_is_named_with_the_closest_one(cli, tmp_path) -> None:
    out = tmp_path / "p.onnx"
    result = cli("prune", str(DIGITS), "-o", str(out), "--ratio", "0.5", "--round-too", "8")
    assert result.code == 2 and not out.exists()
    assert result.err.strip() == (
        "slimgraph prune: error: unrecognized arguments: --round-too 8 (--round-too: did you "
        "mean --round-to?) (see slimgraph prune --help)"
    )


def test_options_are_never_abbreviated(cli, tmp_path) -> None:
    out = tmp_path / "p.onnx"
    result = cli("prune", str(DIGITS), "-o", str(out), "--rat", "0.5")
    assert result.code == 2 and not out.exists()
    assert result.err.strip() == (
        "slimgraph prune: error: unrecognized arguments: --rat 0.5 (--rat: did you mean "
        "--ratio?) (see slimgraph prune --help)"
    )


def test_float64_calibration_file_is_cast_like_float32(cli, tmp_path) -> None:
    with np.load(DIGITS_CALIB) as archive:
        images = archive["image"]
    np.savez(tmp_path / "c64.npz", image=images.astype(np.float64))
    np.savez(tmp_path / "c32.npz", image=images)
    for name in ("c64", "c32"):
        result = cli("quantize", str(DIGITS), "-o", str(tmp_path / f"{name}.onnx"), "--calib",
                     str(tmp_path / f"{name}.npz"))  # fmt: skip
        assert result.code == 0, result.err
    assert (tmp_path / "c64.onnx").read_bytes() == (tmp_path / "c32.onnx").read_bytes()


def test_optimize_that_changes_nothing_says_so_and_writes_nothing(cli, tmp_path: Path) -> None:
    once = tmp_path / "once.onnx"
    assert cli("optimize", DIGITS, "-o", once, "--no-speed-check").code == 0
    before = folder_state(tmp_path)
    result = cli("optimize", once, "-o", tmp_path / "twice.onnx", "--no-speed-check")
    nodes = len(list(sg.load(once).graph))
    assert (result.code, result.out) == (2, "")
    assert result.err == (f"slimgraph optimize: error: nothing to optimize: no pass of --preset "
                          f"lossless changes the model ({nodes} nodes; it is already in that "
                          "form)\n")
    assert folder_state(tmp_path) == before
