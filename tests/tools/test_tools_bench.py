"""`slimgraph bench`: one entry per model, ratios to the first, per-model feeds, options."""

from __future__ import annotations

import numpy as np
import pytest

from tests.kit.data import DIGITS, zoo
from tests.kit.files import save_proto
from tests.kit.graphs import single_op_model

QUICK = ("--rounds", "3", "--warmup", "1", "--threads", "1")


def test_bench_json_two_models(cli) -> None:
    result = cli("bench", DIGITS, DIGITS, "--batch", "4", "--json", *QUICK)
    assert result.code == 0 and result.err == ""
    data = result.json()
    assert data["rounds"] == 3 and data["threads"] == 1 and data["batch"] == 4
    assert data["optimization"] == "all"
    first, second = data["models"]
    assert first["ratio"] == 1.0
    assert second["ratio"] == pytest.approx(second["median_ms"] / first["median_ms"])
    assert [m["label"] for m in data["models"]] == [str(DIGITS), f"{DIGITS}#2"]
    for entry in data["models"]:
        assert entry["path"] == str(DIGITS)
        assert 0 < entry["median_ms"] <= entry["p90_ms"]
        assert entry["inputs"] == "image[4, 1, 8, 8]"  # symbolic batch took --batch


def test_bench_models_with_different_inputs(cli, tmp_path) -> None:
    """Each model gets random inputs fit to its own spec; a fixed batch stays fixed, and an
    explicit --batch that a fixed-batch model cannot run is an error that says why (issue 11)."""
    matmul = save_proto(single_op_model("MatMul", [2, 16], [16, 4]), tmp_path / "mm.onnx")
    refused = cli("bench", DIGITS, matmul, "--batch", "3", *QUICK)
    assert (refused.code, refused.out) == (2, "")
    assert refused.err == (
        f"slimgraph bench: error: --batch 3: {matmul} has a fixed batch of 2 (input 'x' is "
        "[2, 16]), so it cannot run 3 rows; export it with a symbolic batch (slimgraph.from_torch "
        "does by default) or leave out --batch\n"
    )
    data = cli("bench", DIGITS, matmul, zoo("squeezenet"), "--json", *QUICK).json()
    assert [m["inputs"] for m in data["models"]] == [
        "image[1, 1, 8, 8]",
        "x[2, 16]",
        "data_0[1, 3, 224, 224]",
    ]
    medians = [m["median_ms"] for m in data["models"]]
    assert [m["ratio"] for m in data["models"]] == pytest.approx([x / medians[0] for x in medians])
    assert data["models"][2]["ratio"] > 1  # squeezenet at 224x224 is slower than an 8x8 CNN
    data = cli("bench", DIGITS, "--batch", "3", "--json", *QUICK).json()
    assert [m["inputs"] for m in data["models"]] == ["image[3, 1, 8, 8]"]


def test_bench_text_table(cli) -> None:
    result = cli("bench", DIGITS, zoo("squeezenet"), "--opt-level", "basic", *QUICK)
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split() == ["model", "median", "ms", "p90", "ms", "ratio", "90%", "interval",
                                "inputs"]
    first = next(line for line in lines if line.startswith(str(DIGITS)))
    assert first.split()[3] == "1.00x"
    assert any(line.startswith(str(zoo("squeezenet"))) for line in lines)
    footer = "3 interleaved rounds, 1 intra-op thread(s), onnxruntime optimization 'basic'"
    assert footer in result.out


@pytest.mark.parametrize("level", ["disable", "extended"])
def test_bench_opt_levels(cli, level) -> None:
    data = cli("bench", DIGITS, "--opt-level", level, "--json", *QUICK).json()
    assert data["optimization"] == level and len(data["models"]) == 1


@pytest.mark.slow
def test_bench_zoo_pair(cli) -> None:
    data = cli("bench", zoo("squeezenet"), zoo("resnet50"), "--json", "--rounds", "5").json()
    squeeze, resnet = data["models"]
    assert squeeze["ratio"] == 1.0
    # ResNet-50 does about 12x the MACs of SqueezeNet: it cannot be faster.
    assert resnet["ratio"] > 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--rounds", "0"), "argument --rounds: 0 must be at least 1"),
        (("--batch", "x"), "argument --batch: 'x' is not an integer"),
        (("--opt-level", "max"), "argument --opt-level: invalid choice: 'max'"),
    ],
)
def test_bench_bad_options(cli, capsys, args, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli("bench", DIGITS, *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_negative_warmup(cli) -> None:
    result = cli("bench", DIGITS, "--warmup", "-1")
    assert result.code == 2 and result.out == ""
    assert result.err == "slimgraph bench: error: --warmup must be 0 or more, got -1\n"


def test_bench_reports_noise(cli) -> None:
    """Each ratio carries its bootstrap interval; pairs whose interval holds 1 are called out."""
    data = cli("bench", DIGITS, DIGITS, "--json", "--rounds", "8", "--warmup", "1").json()
    first, second = data["models"]
    assert first["ratio_low"] == first["ratio_high"] == 1.0
    assert second["ratio_low"] <= second["ratio"] <= second["ratio_high"]
    assert second["within_noise_of_first"] == (second["ratio_low"] <= 1 <= second["ratio_high"])
    (pair,) = data["comparisons"]
    assert (pair["a"], pair["b"]) == (str(DIGITS), f"{DIGITS}#2")
    assert pair["within_noise"] == (pair["low"] <= 1 <= pair["high"])
    text = cli("bench", DIGITS, DIGITS, "--rounds", "8", "--warmup", "1").out
    assert "interval: 90% paired bootstrap over the rounds" in text
    assert ("within noise: " in text) != ("no two models are within noise" in text)


def test_bootstrap_interval_separates_real_differences() -> None:
    from slimgraph.runtime.bench import _bootstrap_medians, bootstrap_ratio

    rng = np.random.default_rng(0)
    base = 10 + rng.normal(0, 1, 30)  # shared round-to-round drift
    same = base * (1 + rng.normal(0, 0.05, 30))
    fast = base * 0.5 * (1 + rng.normal(0, 0.05, 30))
    boot = _bootstrap_medians([base, same, fast], seed=0)
    low, high = bootstrap_ratio(boot[1], boot[0])
    assert low <= 1.0 <= high and high - low < 0.2
    low, high = bootstrap_ratio(boot[2], boot[0])
    assert 0.4 < low <= high < 0.6
