"""`slimgraph finetune` end to end, in process: round trip, distillation, QAT, every bad input."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("torch")

import slimgraph as sg  # noqa: E402
from slimgraph.runtime.metrics import evaluate, load_data  # noqa: E402
from tests.kit.data import DIGITS  # noqa: E402

TRAIN = DIGITS.with_name("digits_train.npz")
TEST = DIGITS.with_name("digits_test.npz")
CALIB = DIGITS.with_name("digits_calib.npz")


def _initializers(model: ir.Model) -> dict[str, bytes]:
    return {name: value.const_value.tobytes() for name, value in model.graph.initializers.items()}


def _ops(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The pruned digits CNN, its QDQ int8 form, small data files (with and without labels)."""
    folder = tmp_path_factory.mktemp("finetune")
    model = sg.load(DIGITS)
    paths = {"model": DIGITS, "pruned": folder / "pruned.onnx", "int8": folder / "int8.onnx",
             "qop": folder / "qop.onnx"}  # fmt: skip
    sg.save(sg.prune(model, ratio=0.5), paths["pruned"])
    sg.save(sg.quantize(model, calibration=CALIB), paths["int8"])
    sg.save(sg.quantize(model, calibration=CALIB, fmt="qoperator"), paths["qop"])
    with np.load(TRAIN) as archive:
        image, labels = archive["image"], archive["labels"]
    np.savez(folder / "small.npz", image=image[:256], labels=labels[:256])
    np.savez(folder / "nolabels.npz", image=image[:256])
    np.savez(folder / "badlabels.npz", image=image[:8], labels=np.arange(8) + 5)
    np.savez(folder / "int32.npz", image=(image[:8] * 16).astype(np.int32), labels=labels[:8])
    (folder / "notnpz.npz").write_text("hello")
    for key in ("small", "nolabels", "badlabels", "int32", "notnpz"):
        paths[key] = folder / f"{key}.npz"
    return paths


def test_epochs_0_is_an_exact_round_trip(files, tmp_path, cli) -> None:  # noqa: ANN001
    for key in ("model", "int8"):
        out = tmp_path / f"{key}.onnx"
        result = cli("finetune", files[key], "-o", out, "--data", files["small"], "--epochs", 0)
        assert result.code == 0, result.err
        source, written = sg.load(files[key]), sg.load(out)
        assert _initializers(written) == _initializers(source)
        assert _ops(written) == _ops(source)
        assert [n.name for n in written.graph] == [n.name for n in source.graph]


def test_distilling_the_pruned_model_recovers_accuracy(files, tmp_path, cli) -> None:  # noqa: ANN001
    out, report = tmp_path / "recovered.onnx", tmp_path / "report"
    before = sg.load(files["pruned"])
    result = cli("finetune", files["pruned"], "-o", out, "--data", TRAIN, "--teacher", DIGITS,
                 "--kd", "response,feature", "--epochs", 2, "--lr", 3e-3, "--val", TEST,
                 "--json", "--report", report)  # fmt: skip
    assert result.code == 0, result.err
    data = result.json()
    assert data["scheme"] == "offline" and data["kd"] == ["response", "feature"]
    assert [e["epoch"] for e in data["history"]] == [0, 1, 2]
    assert data["val_before"] < 0.5 and data["val_after"] > 0.95, data
    assert data["teacher_val"] > 0.99
    assert data["features"] == [["relu", "relu"], ["relu_2", "relu_2"], ["relu_3", "relu_3"],
                                ["relu_5", "relu_5"]]  # fmt: skip
    trained = sg.load(out)
    test = load_data(TEST, trained)
    # the written model, on onnxruntime, is what was validated in torch
    assert evaluate(trained, test).accuracy == pytest.approx(data["val_after"], abs=1 / 450)
    assert _ops(trained) == _ops(before)
    assert _initializers(sg.load(files["pruned"])) == _initializers(before)  # input untouched
    page = json.loads((report / "report.json").read_text())
    assert [p["kind"] for p in page["plots"]] == ["line", "line"]
    assert page["plots"][1]["series"][0]["y"][-1] == data["val_after"]
    assert (report / "report.txt").read_text().startswith(f"wrote {out}\n")
    assert page["command"].startswith("slimgraph finetune ")
    assert "<svg" in (report / "report.html").read_text()  # the curves, drawn


@pytest.mark.parametrize("learn_scales", [False, True])
def test_qat_trains_the_qdq_graph_and_keeps_its_op_multiset(files, tmp_path, cli,
                                                            learn_scales) -> None:  # noqa: ANN001
    out = tmp_path / "qat.onnx"
    result = cli("finetune", files["int8"], "-o", out, "--data", files["small"], "--teacher",
                 DIGITS, "--epochs", 1, "--lr", 1e-3, "--json",
                 *(["--learn-scales"] if learn_scales else []))  # fmt: skip
    assert result.code == 0, result.err
    assert result.json()["qat"] is True and result.json()["learn_scales"] is learn_scales
    source, trained = sg.load(files["int8"]), sg.load(out)
    assert _ops(trained) == _ops(source)
    before, after = _initializers(source), _initializers(trained)
    assert before.keys() == after.keys()
    moved = [name for name in before if before[name] != after[name]]
    int_weights = [name for name, v in trained.graph.initializers.items()
                   if v.dtype == ir.DataType.INT8 and v.const_value.numpy().ndim == 4]  # fmt: skip
    assert int_weights and set(int_weights) & set(moved)  # integer conv weights re-quantized
    for name, value in trained.graph.initializers.items():
        original = source.graph.initializers[name]
        assert value.dtype == original.dtype and value.shape == original.shape


def _nothing_written(folder: Path, before: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}", "--data", "{small}"], "{missing}: no such file"),
        (["{pruned}", "--data", "{missing}"], "{missing}: no such file"),
        (["{pruned}", "--data", "{notnpz}"], "{notnpz}: not a readable .npz file"),
        (["{pruned}", "--data", "{int32}"], "{int32}: 'image' is int32, but the model "
                                              "expects image: float32[batch, 1, 8, 8]"),
        (["{pruned}", "--data", "{nolabels}"], "nothing to learn from: {nolabels} has no labels "
                                               "('labels') and there is no teacher"),
        (["{pruned}", "--data", "{small}", "--labels", "y"],
         "{small}: no labels key 'y' (its keys: image, labels), and 'labels' is not an input "
         "of the model: if it holds the labels, pass --labels labels; the model expects image: "
         "float32[batch, 1, 8, 8]"),
        (["{pruned}", "--data", "{badlabels}"], "{badlabels}: labels range over 5..12, but the "
                                                "model outputs 10 class scores"),
        (["{pruned}", "--data", "{small}", "--kd", "response,dark"],
         "unknown knowledge kind 'dark' (choose from response, feature, relation)"),
        (["{pruned}", "--data", "{small}", "--kd", "feature"],
         "kd 'feature' needs a teacher (give one, or use scheme 'self')"),
        (["{pruned}", "--data", "{small}", "--scheme", "online"],
         "scheme 'online' trains a teacher alongside: give a teacher model"),
        (["{pruned}", "--data", "{nolabels}", "--scheme", "self"],
         "nothing to learn from: scheme 'self' needs labels (its teacher, the model's own moving "
         "average, starts equal to the model and only steadies what labels teach), and "
         "{nolabels} has no labels ('labels'): add them (--labels KEY names their key) or give "
         "a teacher (--teacher MODEL) with scheme 'offline' or 'online'"),
        (["{pruned}", "--data", "{small}", "--scheme", "self", "--teacher", "{model}"],
         "scheme 'self' distils from the model's own moving average: give no teacher"),
        (["{pruned}", "--data", "{small}", "--teacher", "{model}", "--kd", "feature",
          "--feature-layers", "block9"],
         "model: no value or torch layer named 'block9' (top-level layers: block1, block2, down, "
         "fc, stem; graph outputs: linear)"),
        (["{pruned}", "--data", "{small}", "--epochs", "-1"], "epochs must be >= 0, got -1"),
        (["{pruned}", "--data", "{small}", "--batch-size", "0"], "batch size must be >= 1, got 0"),
        (["{pruned}", "--data", "{small}", "--lr", "0"], "learning rate must be > 0, got 0.0"),
        (["{pruned}", "--data", "{small}", "--alpha", "2"], "alpha must be in [0, 1], got 2.0"),
        (["{pruned}", "--data", "{small}", "--val", "{int32}"],
         "{int32}: 'image' is int32, but the model expects image: float32[batch, 1, 8, 8]"),
        (["{pruned}", "--data", "{small}", "--lr", "1e30"],
         "training diverged: the loss is nan at epoch 1, step 2; nothing was written (try a "
         "lower learning rate than 1e+30)"),
        (["{qop}", "--data", "{small}"], "QOperator model"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(files, tmp_path, cli, args,
                                                            message) -> None:  # noqa: ANN001
    names = {**{k: str(v) for k, v in files.items()}, "missing": str(tmp_path / "missing.npz")}
    args = [a.format(**names) for a in args]
    message = message.format(**names)
    out, report = tmp_path / "out.onnx", tmp_path / "report"
    before = {p.name for p in tmp_path.iterdir()}
    result = cli("finetune", *args, "-o", out, "--report", report)
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    error_lines = [line for line in lines if line.startswith("slimgraph finetune: error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], result.err
    assert not [line for line in lines if "Traceback" in line]
    assert result.out == ""
    _nothing_written(tmp_path, before)


def test_bad_output_paths_exit_2_before_training(files, tmp_path, cli) -> None:  # noqa: ANN001
    cases = [
        (files["pruned"], f"{files['pruned']}: refusing to write over the input model"),
        (DIGITS, f"{DIGITS}: refusing to write over the teacher"),
        (tmp_path / "nowhere" / "out.onnx", "the folder"),
    ]
    for out, message in cases:
        result = cli("finetune", files["pruned"], "-o", out, "--data", files["small"],
                     "--teacher", DIGITS)  # fmt: skip
        assert result.code == 2 and message in result.err, result.err
        assert len(result.err.strip().splitlines()) == 1
    (tmp_path / "file").write_text("x")
    result = cli("finetune", files["pruned"], "-o", tmp_path / "o.onnx", "--data", files["small"],
                 "--report", tmp_path / "file")  # fmt: skip
    assert result.code == 2 and "--report" in result.err
    assert not (tmp_path / "o.onnx").exists()


def test_same_seed_same_bytes(files, tmp_path, cli) -> None:  # noqa: ANN001
    outs = []
    for i, seed in enumerate((5, 5, 6)):
        out = tmp_path / f"s{i}.onnx"
        result = cli("finetune", files["pruned"], "-o", out, "--data", files["small"],
                     "--epochs", 1, "--seed", seed, "--teacher", DIGITS, "--kd",
                     "response,feature")  # fmt: skip
        assert result.code == 0, result.err
        assert result.err.startswith("epoch 1/1  loss ")  # one line per epoch on stderr
        assert result.out.startswith(f"wrote {out}\nfine-tuning: scheme offline, knowledge "
                                     "response, feature, 1 epochs on 256 samples")  # fmt: skip
        outs.append(_initializers(sg.load(out)))
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_a_budget_missed_on_val_exits_1_and_writes_nothing(cli, files, tmp_path) -> None:
    out = tmp_path / "out.onnx"
    result = cli("finetune", files["pruned"], "-o", out, "--data", files["small"], "--teacher",
                 DIGITS, "--epochs", "1", "--lr", "1e-5", "--val", TEST, "--max-drop", "0.01",
                 "--no-progress", "--report", tmp_path / "report")  # fmt: skip
    assert result.code == 1 and not out.exists() and not (tmp_path / "report").exists()
    message = result.err.strip().splitlines()[-1]
    assert message.startswith(
        f"slimgraph finetune: error: the fine-tuned model misses the accuracy budget on {TEST} "
        "(450 samples): accuracy "
    )
    assert message.endswith("> --max-drop 0.01; nothing written")


def test_a_budget_held_is_reported_and_the_model_written(cli, tmp_path) -> None:
    out = tmp_path / "out.onnx"
    result = cli("finetune", DIGITS, "-o", out, "--data", TRAIN, "--teacher", DIGITS, "--epochs",
                 "0", "--val", TEST, "--max-drop", "0.01", "--no-progress")  # fmt: skip
    assert result.code == 0, result.err
    assert out.exists()
    assert "budget held (drop <= 0.01)" in result.out and "drop +0.0000" in result.out


def test_a_budget_needs_val(cli, files, tmp_path) -> None:
    out = tmp_path / "out.onnx"
    result = cli("finetune", files["pruned"], "-o", out, "--data", files["small"], "--max-drop",
                 "0.01")  # fmt: skip
    assert result.code == 2 and not out.exists()
    assert result.err.strip() == (
        "slimgraph finetune: error: an accuracy budget (--max-drop/--min-cosine) is measured on "
        "--val VAL.npz: give it"
    )
