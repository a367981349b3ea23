"""tools/_common (the shared run of the commands) and the one keyword list of `sg.finetune`."""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
from pathlib import Path

import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.errors import BadOptionError, OutputPathError
from slimgraph.passes.finetune import FinetunePass
from slimgraph.passes.registry import pass_options
from slimgraph.runtime.finetune import FinetuneOptions
from slimgraph.runtime.torch_backend._options import TrainOptions
from slimgraph.tools._common import output_paths, print_result
from slimgraph.tools.compare_cmd import checked_batch
from tests.kit.data import DIGITS

# The keywords of finetune/finetune_with_report, in their order (the fields of FinetuneOptions).
FINETUNE_KEYWORDS = [
    "labels", "teacher", "kd", "scheme", "epochs", "batch_size", "lr", "optimizer",
    "weight_decay", "schedule", "temperature", "alpha", "feature_layers", "feature_weight",
    "feature_loss", "unfold_batchnorm", "relation_layer", "relation_weights", "ema_decay", "val",
    "seed", "learn_scales", "progress", "on_epoch",
]


def test_output_paths_refuse_the_input_and_the_teacher(tmp_path: Path) -> None:
    model = shutil.copy(DIGITS, tmp_path / "m.onnx")
    teacher = shutil.copy(DIGITS, tmp_path / "t.onnx")
    args = argparse.Namespace(model=str(model), output=str(tmp_path / "out.onnx"))
    assert output_paths(args) == (Path(model), tmp_path / "out.onnx")
    with pytest.raises(OutputPathError, match=r"m\.onnx: refusing to write over the input model$"):
        output_paths(argparse.Namespace(model=str(model), output=str(tmp_path / "." / "m.onnx")))
    args.output = str(teacher)
    with pytest.raises(OutputPathError, match=r"t\.onnx: refusing to write over the teacher$"):
        output_paths(args, [(str(teacher), "the teacher")])
    assert output_paths(args, [(None, "the teacher")])[1] == Path(teacher)


def test_print_result_prints_json_or_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert print_result(argparse.Namespace(json=True), {"a": 1}, "text") == 0
    assert json.loads(capsys.readouterr().out) == {"a": 1}
    assert print_result(argparse.Namespace(json=False), {"a": 1}, "text") == 0
    assert capsys.readouterr().out == "text\n"


def test_checked_batch_defaults_and_checks_fixed_batches() -> None:
    model = sg.load(DIGITS)  # input image: [batch, 1, 8, 8], batch symbolic
    assert checked_batch(None, [(model, "m")], lambda: 7) == 7
    assert checked_batch(3, [(model, "m")], lambda: 7) == 3
    fixed = sg.load(DIGITS)
    fixed.graph.inputs[0].shape = ir.Shape([2, 1, 8, 8])
    with pytest.raises(BadOptionError, match=r"^--batch 3: fixed\.onnx has a fixed batch of 2 "):
        checked_batch(3, [(model, "m"), (fixed, "fixed.onnx")], lambda: 7)
    assert checked_batch(2, [(fixed, "fixed.onnx")], lambda: 7) == 2


@pytest.mark.parametrize("function", [sg.finetune, sg.finetune_with_report])
def test_finetune_signature_is_the_options_dataclass(function) -> None:  # noqa: ANN001
    parameters = inspect.signature(function).parameters
    assert list(parameters)[:2] == ["model", "data"]
    keywords = {k: p.default for k, p in parameters.items() if p.kind == p.KEYWORD_ONLY}
    assert keywords.pop("options") is None  # `options=` a FinetuneOptions, last
    assert list(keywords) == FINETUNE_KEYWORDS
    assert keywords == {k: getattr(FinetuneOptions(), k) for k in FINETUNE_KEYWORDS}
    assert (keywords["epochs"], keywords["lr"], keywords["kd"]) == (10, None, ("response",))


def test_finetune_training_defaults_come_from_train_options() -> None:
    options = FinetuneOptions()
    for name in ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "schedule", "seed",
                 "temperature", "alpha", "feature_weight", "relation_weights", "ema_decay",
                 "progress"):  # fmt: skip
        assert getattr(options, name) == getattr(TrainOptions(), name), name


def test_finetune_rejects_an_unknown_keyword_like_python() -> None:
    with pytest.raises(TypeError, match=r"^finetune\(\) got an unexpected keyword argument "
                                        r"'epoch'$"):
        sg.finetune(DIGITS, "train.npz", epoch=3)
    with pytest.raises(TypeError, match=r"^finetune_with_report\(\) got an unexpected keyword "
                                        r"argument 'teachr'$"):
        sg.finetune_with_report(DIGITS, "train.npz", teachr=None)


def test_recipes_see_the_finetune_keywords() -> None:
    options = pass_options(FinetunePass)
    assert options is not None
    assert {k: options[k] for k in ("epochs", "lr", "val", "learn_scales")} == {
        "epochs": 10, "lr": None, "val": None, "learn_scales": False}
    assert set(FINETUNE_KEYWORDS) <= set(options)
