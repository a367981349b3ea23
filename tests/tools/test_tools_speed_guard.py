"""The speed guard on the command line: every compressing command times its output against its
input before writing; a slower one is refused (exit 1, nothing written) unless `--allow-slower`,
and the figures are printed, in `--json` and in `--report DIR`.

The slower model is one a compressing command really writes: dynamic int8 of a chain of eight
16-wide MatMuls, where quantizing each tiny activation on every run costs more than the float
MatMul it replaces (1.55x, 90% interval 1.54-1.55, at batch 1 on a loaded 2-core machine).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import slimgraph as sg
from slimgraph.runtime.speed_guard import ENV_SKIP
from tests.kit.data import DIGITS
from tests.runtime.test_speed_guard import chain


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("guard") / "mlp.onnx"
    sg.save(chain(8, width=16), path)
    return path


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("guard") / "wide.onnx"
    sg.save(chain(2, width=256), path)
    return path


@pytest.fixture(autouse=True)
def guard_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite turns the guard off (tests/conftest.py); these tests turn it back on."""
    monkeypatch.delenv(ENV_SKIP, raising=False)


SLOW = ("--mode", "dynamic", "--batch", "1")


def test_a_slower_result_is_refused_with_its_figures(cli, mlp: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = cli("quantize", mlp, "-o", out, *SLOW)
    assert result.code == 1, result.err
    assert not out.exists()
    assert result.err.startswith("slimgraph quantize: error: latency of the output / the input "
                                 "on onnxruntime, batch 1: ")
    assert "slower beyond noise at batch 1; nothing written (--allow-slower writes it anyway, " \
           "--no-speed-check skips the check)" in result.err
    assert result.err.count("\n") == 1  # one line


def test_allow_slower_writes_and_says_so(cli, mlp: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "q.onnx", tmp_path / "report"
    result = cli("quantize", mlp, "-o", out, *SLOW, "--allow-slower", "--json", "--report",
                 report)  # fmt: skip
    assert result.code == 0, result.err
    assert out.exists()
    speed = result.json()["speed_check"]
    assert speed["slower"] and speed["allowed_slower"]
    assert [b["batch"] for b in speed["batches"]] == [1]
    assert speed["batches"][0]["low"] > 1.10
    saved = json.loads((report / "report.json").read_text())
    assert saved["result"]["speed_check"] == speed
    assert any(t["title"].startswith("Speed check") for t in saved["tables"])
    assert "written anyway (--allow-slower)" in (report / "report.txt").read_text()


def test_a_faster_result_is_written_with_its_figures(cli, wide: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.onnx"
    result = cli("prune", wide, "-o", out, "--ratio", "0.5", "--batch", "8")
    assert result.code == 0, result.err
    assert out.exists()
    last = result.out.strip().splitlines()[-1]
    assert last.startswith("latency of the output / the input on onnxruntime, batch 8: ")
    assert last.endswith(": not slower beyond noise")


def test_no_speed_check_skips_it(cli, mlp: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = cli("quantize", mlp, "-o", out, *SLOW, "--no-speed-check", "--json")
    assert result.code == 0, result.err
    assert out.exists() and "speed_check" not in result.json()


@pytest.mark.parametrize("command", [("factorize", "--rank-ratio", "0.5"), ("optimize",)])
def test_every_compressing_command_takes_the_options(cli, mlp: Path, tmp_path: Path,
                                                     command: tuple[str, ...]) -> None:
    result = cli(command[0], mlp, "-o", tmp_path / "x.onnx", *command[1:], "--batch", "0")
    assert result.code == 2
    assert "batch sizes must be at least 1, got [0]" in result.err


def test_compressions_are_judged_against_the_optimized_input_optimize_against_its_own(
    cli, tmp_path: Path
) -> None:
    # the digits CNN as exported runs about 2x slower than its lossless form
    optimized = cli("optimize", DIGITS, "-o", tmp_path / "o.onnx", "--batch", "8", "--json")
    assert optimized.code == 0, optimized.err
    speed = optimized.json()["speed_check"]
    assert speed["baseline"] == "input" and not speed["slower"]
    factorized = cli("factorize", DIGITS, "-o", tmp_path / "f.onnx", "--rank-ratio", "0.5",
                     "--batch", "8")  # fmt: skip
    assert factorized.code == 0, factorized.err
    last = factorized.out.strip().splitlines()[-1]
    assert last.startswith("latency of the output / the lossless-optimized input on "
                           "onnxruntime, batch 8: ")
    assert "of the input as given]" in last or "the input as given not timed" in last
