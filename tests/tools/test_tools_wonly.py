"""`slimgraph quantize --mode weight-only --method ...`, `--bits auto` and `compare` on LMs, through
the command line's entry point: messages, exit codes, nothing written on bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from slimgraph import ir as sg_ir
from slimgraph.runtime import create_session, run
from tests.kit.files import folder_state, save_ir, save_proto
from tests.kit.graphs import single_op_model
from tests.kit.lm import toy_lm


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The toy LM's file and a token file (input_ids [24, 12])."""
    folder = tmp_path_factory.mktemp("toy_lm")
    model = save_ir(toy_lm(), folder / "lm.onnx")
    ids = np.random.default_rng(0).integers(0, 32, (24, 12)).astype(np.int64)
    tokens = folder / "tokens.npz"
    np.savez(tokens, input_ids=ids)
    return model, tokens


def _refused(cli, tmp_path: Path, *args: object) -> str:  # noqa: ANN001 - the cli fixture
    """Run a command that must fail: exit 2, one line on stderr, nothing written."""
    before = folder_state(tmp_path)
    result = cli(*args)
    assert result.code == 2, result.err
    assert folder_state(tmp_path) == before
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    return lines[0]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_data_methods_without_calib_are_refused(cli, tmp_path: Path, lm_files, method) -> None:
    model, _ = lm_files
    line = _refused(cli, tmp_path, "quantize", model, "-o", tmp_path / "q.onnx", "--mode",
                    "weight-only", "--method", method)
    assert line == (f"slimgraph quantize: error: --method {method} needs calibration data "
                    "(--calib DATA.npz)")


def test_block_size_dividing_no_k_is_refused(cli, tmp_path: Path) -> None:
    model = save_ir(toy_lm(width=48), tmp_path / "lm48.onnx")
    line = _refused(cli, tmp_path, "quantize", model, "-o", tmp_path / "q.onnx", "--mode",
                    "weight-only", "--block-size", "32")
    assert line == ("slimgraph quantize: error: --block-size 32 does not divide K of any MatMul "
                    "(K = 48): choose a block size that divides K")


def test_a_model_without_matmul_is_refused(cli, tmp_path: Path) -> None:
    conv = save_proto(single_op_model("Conv", [1, 3, 8, 8], [4, 3, 3, 3]), tmp_path / "c.onnx")
    line = _refused(cli, tmp_path, "quantize", conv, "-o", tmp_path / "q.onnx", "--mode",
                    "weight-only", "--method", "hqq")
    assert line == ("slimgraph quantize: error: nothing to quantize weight-only: no MatMul with a "
                    "constant float weight (0 MatMul node(s): no MatMul nodes)")


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "rtn", "--calib", "CALIB"],
     "weight-only --method rtn uses no calibration data: leave out --calib (gptq and awq use "
     "it)"),
    (["--mode", "dynamic", "--method", "gptq"],
     "--method gptq is a weight-only method: not for --mode dynamic"),
    (["--mode", "weight-only", "--method", "entropy"],
     "--method entropy is a static calibrator; weight-only methods: rtn, hqq, gptq, awq"),
])
def test_method_options_that_do_not_fit_are_refused(cli, tmp_path: Path, lm_files, args,
                                                    message) -> None:
    model, tokens = lm_files
    args = [tokens if a == "CALIB" else a for a in args]
    line = _refused(cli, tmp_path, "quantize", model, "-o", tmp_path / "q.onnx", *args)
    assert line == f"slimgraph quantize: error: {message}"


def test_gptq_writes_matmulnbits_and_prints_perplexity_on_data(cli, tmp_path: Path,
                                                              lm_files) -> None:
    model, tokens = lm_files
    out = tmp_path / "q.onnx"
    result = cli("quantize", model, "-o", out, "--method", "gptq", "--calib", tokens,
                 "--block-size", "32", "--data", tokens, "--json")
    assert result.code == 0, result.err
    data = result.json()
    assert data["mode"] == "weight-only" and data["format"] == "matmulnbits"
    assert data["quantized_ops"] == {"GatherBlockQuantized": 1, "MatMulNBits": 2}
    lm = data["fidelity"]["language_model"]
    assert lm["tokens"] == 24 * 11 and 0 <= lm["next_token_agreement"] <= 1
    quantized = sg_ir.load(out)
    bits = {n.name: n.attributes.get_int("bits") for n in quantized.graph
            if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert sorted(bits.values()) == [4, 8, 8]  # the hidden MatMul int4; head and table 8-bit
    text = cli("quantize", model, "-o", tmp_path / "h.onnx", "--method", "hqq", "--data", tokens)
    assert text.code == 0, text.err
    assert "perplexity (264 next tokens): reference" in text.out


def test_bits_auto_times_and_reports_the_choice(cli, tmp_path: Path, lm_files) -> None:
    model, _ = lm_files
    result = cli("quantize", model, "-o", tmp_path / "a.onnx", "--bits", "auto", "--batch", "1",
                 "--seq", "4", "--json")
    assert result.code == 0, result.err
    data = result.json()
    auto = data["auto_bits"]
    assert (auto["batch"], auto["seq"]) == (1, 4)
    assert set(auto["forms"]) == {"fc", "lm_head"}
    assert {t["m"] for t in auto["timings"]} == {4}
    for timing in auto["timings"]:
        times, faster = timing["median_ms"], timing["faster_than_int8"]
        # int8 unless another form is faster beyond noise; then the lowest median of those
        allowed = ["int8", *(form for form in times if faster.get(form))]
        assert timing["choice"] == min(allowed, key=times.get)
    written = sg_ir.load(tmp_path / "a.onnx")
    ops = [n.op_type for n in written.graph]
    expected = {"int4": "MatMulNBits", "int8": "MatMulInteger", "fp32": "MatMul"}
    for form in auto["forms"].values():
        assert expected[form] in ops


def test_compare_reports_perplexity_checked_against_numpy(cli, tmp_path: Path, lm_files) -> None:
    model, tokens = lm_files
    candidate = tmp_path / "q.onnx"
    assert cli("quantize", model, "-o", candidate, "--mode", "weight-only").code == 0
    result = cli("compare", model, candidate, "--data", tokens, "--json")
    assert result.code == 0, result.err
    lm = result.json()["language_model"]
    ids = np.load(tokens)["input_ids"]
    for key, path in (("reference", model), ("candidate", candidate)):
        logits = run(create_session(sg_ir.load(path)), {"input_ids": ids})["logits"]
        logits = logits[:, :-1].astype(np.float64)
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll = log_z - np.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0]
        assert math.isclose(lm[f"{key}_perplexity"], math.exp(nll.mean()), rel_tol=1e-9)
    text = cli("compare", model, candidate, "--data", tokens)
    assert "next-token agreement" in text.out
    assert "perplexity" not in cli("compare", model, candidate, "--data", tokens,
                                   "--no-lm").out


def test_compare_lm_on_a_model_that_is_not_one_is_refused(cli, tmp_path: Path) -> None:
    mm = single_op_model("MatMul", ["batch", 8], [8, 4], ["batch", 4])
    path = save_proto(mm, tmp_path / "m.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((2, 8), np.float32))
    line = _refused(cli, tmp_path, "compare", path, path, "--data", data, "--lm")
    assert line.startswith("slimgraph compare: error: perplexity needs two causal language "
                           "models")


def test_awq_without_data_measures_fidelity_on_its_calibration_rows(cli, tmp_path: Path,
                                                                    lm_files) -> None:
    model, tokens = lm_files
    result = cli("quantize", model, "-o", tmp_path / "q.onnx", "--method", "awq", "--calib",
                 tokens, "--block-size", "32", "--json")
    assert result.code == 0, result.err
    fidelity = result.json()["fidelity"]
    assert fidelity["data"] == f"{tokens} (24 samples)"  # not random token ids
    assert fidelity["language_model"]["tokens"] == 24 * 11
