"""int4 methods on a causal LM trained on real text (tests/kit/lm.py): perplexity, not proxies.

Slow: the first run on a machine trains the LM (a few minutes on two cores; cached after).
"""

from __future__ import annotations

import time
from pathlib import Path

import onnx
import pytest

import slimgraph as sg
from slimgraph.runtime.perplexity import perplexity
from tests.kit.lm import trained_lm

pytestmark = pytest.mark.slow

BLOCK = 128


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(fp32 file with folded weights, calibration tokens, evaluation tokens)."""
    trained = trained_lm()
    fp32 = tmp_path_factory.mktemp("lm") / "lm.fp32.onnx"
    sg.save(sg.optimize(sg.load(trained.model), preset="lossless"), fp32)
    return fp32, trained.calib_tokens, trained.eval_tokens


def _quantized(fp32: Path, calib: Path, method: str, **options: object) -> tuple[Path, float]:
    start = time.perf_counter()
    model = sg.quantize(sg.load(fp32), mode="weight-only", method=method, block_size=BLOCK,
                        calibration=calib if method in ("gptq", "awq") else None,
                        **options)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    path = fp32.with_name(f"{method}{'_'.join(map(str, options.values()))}.onnx")
    sg.save(model, path)
    return path, seconds


def test_gptq_and_awq_close_the_round_to_nearest_gap(lm) -> None:  # noqa: ANN001
    fp32, calib, evaluation = lm
    ppl = {"fp32": perplexity(fp32, evaluation)}
    seconds = {}
    for method in ("rtn", "gptq", "awq"):
        path, seconds[method] = _quantized(fp32, calib, method)
        ppl[method] = perplexity(path, evaluation)
    gap = ppl["rtn"] - ppl["fp32"]
    assert gap > 0, ppl
    assert (ppl["rtn"] - ppl["gptq"]) / gap >= 0.5, ppl
    assert (ppl["rtn"] - ppl["awq"]) / gap >= 0.4, ppl
    assert max(seconds.values()) < 120, seconds


def test_hqq_at_least_as_good_as_onnxruntime_hqq_on_the_same_file(lm) -> None:  # noqa: ANN001
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    fp32, calib, evaluation = lm
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)),
                                     algo_config=HQQWeightOnlyQuantConfig(block_size=BLOCK))
    quantizer.process()
    theirs = fp32.with_name("ort_hqq.onnx")
    quantizer.model.save_model_to_file(str(theirs), use_external_data_format=False)
    # onnxruntime's scope: every MatMul at 4 bits (the LM head too), embeddings left float
    ours, _ = _quantized(fp32, calib, "hqq", head_bits=4, exclude_ops=["Gather"])
    assert perplexity(ours, evaluation) <= perplexity(theirs, evaluation)
