"""Decoder LLMs on the CPU: int4 weights by method and `bits="auto"`, beside onnxruntime's tools.

Part 1, quality (`--part quality`): the small Llama-style LM trained on the machine's license texts
(`tests/kit/lm.py`: byte vocabulary, hidden 128, 3 layers, grouped-query attention; trained once
and cached), its fp32 export cleaned by `optimize --preset lossless` (weights folded to
initializers: the one fp32 file every tool below reads). Each int4 model (blocks of 128) is
scored by perplexity on the whole held-out license (`eval.npz`, input_ids [201, 128]):

- slimgraph with its defaults (MatMuls int4, the LM head and the embedding 8-bit, zero points,
  accuracy level 4): rtn, gptq (act order), awq, hqq (gptq and awq calibrated on `calib.npz`, 64
  rows of training text); also gptq with its rows in order and rtn at accuracy level 0;
- the same methods with onnxruntime's scope (every MatMul int4, the LM head too; the embedding
  left float), to compare with onnxruntime's `MatMulNBitsQuantizer` on equal terms: its default
  RTN (asymmetric, block 128, accuracy level 0), its RTN at accuracy level 4 (slimgraph's
  default level) and `HQQWeightOnlyQuantConfig(block_size=128)` on the same file.

"gap closed" = (ppl(rtn) - ppl(method)) / (ppl(rtn) - ppl(fp32)) within the same scope. The
gap is small on this model (under 1% of perplexity) and the figures are one held-out text:
read differences of a few 1e-3 in perplexity as noise. Quantize times are wall-clock
(slimgraph's include its verification runs and, on a model with attention, the transformer
fusions it applies first).

Part 2, speed (`--part speed`): a Llama-style model with random weights (hidden 1024, 4 layers,
16 heads, 4 KV heads, SwiGLU 2816, vocab 32000; `transformers.LlamaConfig`), exported without a
KV cache with batch and sequence symbolic (a one-token step on it reads every weight once, as a
decode step does, without the cache), cleaned the same way. Timed side by side
(`slimgraph.runtime.benchmark`: interleaved shuffled rounds, medians, 2 threads, no spinning) on
onnxruntime at level "all":

- decode (batch 1, sequence 1): fp32, dynamic int8 (`mode="dynamic"`), slimgraph int4 (rtn,
  block 128, defaults), onnxruntime's MatMulNBitsQuantizer RTN int4 (block 128; its default
  accuracy level, and level 4), slimgraph int4 at level 0, `bits="auto"` timed at batch 1 x 1;
- prefill (batch 1, sequence 128): fp32, dynamic int8, slimgraph int4, `bits="auto"` timed at
  batch 1 x 128.

Part 3, the KV-cache decode step (`--part kv`): the same Llama exported by
`sg.from_torch_causal_lm` (past keys/values in, present out), timed at batch 1, one new token
after a past of 127: fp32, dynamic int8, slimgraph int4 (both fuse the attention into
GroupQueryAttention first), onnxruntime's RTN int4 of the same fp32 step (its default level,
and level 4).

Targets (PASS/FAIL): int4 decode <= 0.9x dynamic int8; auto at prefill <= 1.0x dynamic int8
(within the 90% bootstrap interval); slimgraph int4 <= 1.0x onnxruntime's RTN int4 at decode and
its perplexity <= onnxruntime's on the trained LM (its default file, and at level 4 in
onnxruntime's scope). The accuracy level trades the two: level 4 (slimgraph's default) quantizes
each MatMul's input to int8 per block and runs the VNNI kernel, level 0 (onnxruntime's default)
computes in float, so the like-for-like checks also compare slimgraph's RTN at level 0 with
onnxruntime's default file, in speed and perplexity. GPTQ closes >= 50% of RTN's gap, AWQ >= 40%,
HQQ's perplexity <= onnxruntime HQQ's; quantizing the trained LM < 120 s.

Usage:
    python benchmarks/decoder.py [--part quality|speed|kv|all] [--rounds 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path[0] = str(Path(__file__).resolve().parents[1])  # not this folder: its transformers.py
# would shadow the package

import logging  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import slimgraph as sg  # noqa: E402
from slimgraph._tables import render_table  # noqa: E402
from slimgraph.ir import metadata  # noqa: E402
from slimgraph.runtime import benchmark  # noqa: E402
from slimgraph.runtime.perplexity import perplexity  # noqa: E402

BLOCK = 128
METHODS = ("rtn", "gptq", "awq", "hqq")


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def cleaned(source: Path, target: Path) -> Path:
    """The fp32 file every tool reads: the export after `optimize --preset lossless`."""
    sg.save(sg.optimize(sg.load(source), preset="lossless"), target)
    return target


def ort_rtn(source: Path, target: Path, accuracy_level: int | None = None) -> float:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _quiet()

    def run() -> None:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), block_size=BLOCK,
                                         is_symmetric=False, accuracy_level=accuracy_level)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=False)

    return timed(run)[1]


def ort_hqq(source: Path, target: Path) -> float:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    _quiet()

    def run() -> None:
        config = HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=4)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=False)

    return timed(run)[1]


def _quiet() -> None:
    """onnxruntime's quantizer module sets the root logger to INFO when imported (a line per
    node); only warnings from here on."""
    logging.getLogger().setLevel(logging.WARNING)


def ours(source: Path, target: Path, method: str, calib: Path | None, **options: object
         ) -> float:
    def run() -> None:
        model = sg.quantize(sg.load(source), mode="weight-only", method=method, block_size=BLOCK,
                            calibration=calib if method in ("gptq", "awq") else None,
                            **options)  # type: ignore[arg-type]
        sg.save(model, target)

    return timed(run)[1]


def quality(folder: Path) -> tuple[str, list[str]]:
    from tests.kit.lm import trained_lm

    lm = trained_lm()
    fp32 = cleaned(lm.model, folder / "lm.fp32.onnx")
    evaluation = lm.eval_tokens
    rows: list[list[object]] = []
    ppl: dict[str, float] = {"fp32": perplexity(fp32, evaluation)}
    seconds: dict[str, float] = {}
    scopes = {
        "default": {},  # head and embedding 8-bit
        "ort scope": {"head_bits": 4, "embedding_bits": None, "exclude_ops": ["Gather"]},
    }
    for scope, options in scopes.items():
        for method in METHODS:
            key = f"{method} ({scope})"
            path = folder / f"lm.{method}.{scope.replace(' ', '_')}.onnx"
            seconds[key] = ours(fp32, path, method, lm.calib_tokens, **options)
            ppl[key] = perplexity(path, evaluation)
    seconds["ort rtn"] = ort_rtn(fp32, folder / "lm.ort_rtn.onnx")
    ppl["ort rtn"] = perplexity(folder / "lm.ort_rtn.onnx", evaluation)
    seconds["ort rtn level 4"] = ort_rtn(fp32, folder / "lm.ort_rtn4.onnx", accuracy_level=4)
    ppl["ort rtn level 4"] = perplexity(folder / "lm.ort_rtn4.onnx", evaluation)
    seconds["ort hqq"] = ort_hqq(fp32, folder / "lm.ort_hqq.onnx")
    ppl["ort hqq"] = perplexity(folder / "lm.ort_hqq.onnx", evaluation)
    seconds["gptq in order (default)"] = ours(fp32, folder / "lm.gptq_in_order.onnx", "gptq",
                                              lm.calib_tokens, act_order=False)
    ppl["gptq in order (default)"] = perplexity(folder / "lm.gptq_in_order.onnx", evaluation)
    seconds["rtn level 0 (default)"] = ours(fp32, folder / "lm.rtn0.onnx", "rtn", None,
                                            accuracy_level=0)
    ppl["rtn level 0 (default)"] = perplexity(folder / "lm.rtn0.onnx", evaluation)

    def closed(key: str, scope: str) -> str:
        rtn = ppl[f"rtn ({scope})"]
        gap = rtn - ppl["fp32"]
        return f"{(rtn - ppl[key]) / gap:.0%}" if gap > 0 else "-"

    rows.append(["fp32", f"{ppl['fp32']:.4f}", "-", "-"])
    for scope in scopes:
        for method in METHODS:
            key = f"{method} ({scope})"
            rows.append([key, f"{ppl[key]:.4f}", closed(key, scope), f"{seconds[key]:.1f}"])
    for key in ("ort rtn", "ort rtn level 4", "ort hqq"):
        rows.append([f"onnxruntime {key[4:]} (ort scope)", f"{ppl[key]:.4f}",
                     closed(key, "ort scope"), f"{seconds[key]:.1f}"])
    rows.append(["gptq, rows in order (default)", f"{ppl['gptq in order (default)']:.4f}",
                 closed("gptq in order (default)", "default"),
                 f"{seconds['gptq in order (default)']:.1f}"])
    rows.append(["rtn, accuracy level 0", f"{ppl['rtn level 0 (default)']:.4f}", "-",
                 f"{seconds['rtn level 0 (default)']:.1f}"])
    table = render_table(["trained LM, int4 blocks of 128", "perplexity", "gap closed",
                          "quantize s"], rows, align="lrrr")
    header = (f"trained LM: {lm.model} (train loss {lm.train_loss:.3f} nats/byte, trained in "
              f"{lm.train_seconds:.0f} s); eval {evaluation}")
    gap = lambda method, scope: ((ppl[f"rtn ({scope})"] - ppl[f"{method} ({scope})"])  # noqa: E731
                                 / (ppl[f"rtn ({scope})"] - ppl["fp32"]))
    checks = [
        _check("GPTQ closes >= 50% of RTN's gap (default scope)", gap("gptq", "default") >= 0.5),
        _check("AWQ closes >= 40% of RTN's gap (default scope)", gap("awq", "default") >= 0.4),
        _check("HQQ perplexity <= onnxruntime HQQ's (ort scope)",
               ppl["hqq (ort scope)"] <= ppl["ort hqq"]),
        _check("slimgraph int4 (rtn, defaults) perplexity <= onnxruntime RTN's",
               ppl["rtn (default)"] <= ppl["ort rtn"]),
        _check("at onnxruntime's accuracy level (0): slimgraph int4 (rtn) perplexity <= "
               "onnxruntime RTN's", ppl["rtn level 0 (default)"] <= ppl["ort rtn"]),
        _check("slimgraph int4 (rtn, ort scope) perplexity <= onnxruntime RTN's at level 4",
               ppl["rtn (ort scope)"] <= ppl["ort rtn level 4"]),
        _check("quantizing the LM < 120 s (every method)",
               max(v for k, v in seconds.items() if not k.startswith("ort")) < 120),
    ]
    return header + "\n\n" + table, checks


def _check(what: str, ok: bool) -> str:
    return f"{'PASS' if ok else 'FAIL'}: {what}"


def export_llama(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.kit.lm import logits_module

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    # batch 2 in the example: a batch of 1 is specialized by the exporter
    exported = sg.from_torch(logits_module(model), (torch.zeros((2, 16), dtype=torch.int64),),
                             dynamic_shapes=({0: "batch", 1: "seq"},), input_names=["input_ids"],
                             output_names=["logits"])
    raw = folder / "llama.export.onnx"
    sg.save(exported, raw)
    return cleaned(raw, folder / "llama.fp32.onnx")


def speed(folder: Path, rounds: int, threads: int) -> tuple[str, list[str]]:
    fp32 = export_llama(folder)
    model = sg.load(fp32)
    paths: dict[str, Path] = {"fp32": fp32}
    made: dict[str, float] = {}

    def make(name: str, fn: Callable[[], object]) -> None:
        path = folder / f"llama.{name.replace(' ', '_')}.onnx"
        result, seconds = timed(fn)
        if result is not None:
            sg.save(result, path)  # type: ignore[arg-type]
        paths[name], made[name] = path, seconds

    make("dynamic int8", lambda: sg.quantize(model, mode="dynamic"))
    make("int4 (slimgraph)", lambda: sg.quantize(model, mode="weight-only", block_size=BLOCK))
    make("int4 (slimgraph, level 0)", lambda: sg.quantize(model, mode="weight-only",
                                                          block_size=BLOCK, accuracy_level=0))
    paths["int4 (onnxruntime)"] = folder / "llama.ort_rtn.onnx"
    made["int4 (onnxruntime)"] = ort_rtn(fp32, paths["int4 (onnxruntime)"])
    paths["int4 (onnxruntime, level 4)"] = folder / "llama.ort_rtn4.onnx"
    made["int4 (onnxruntime, level 4)"] = ort_rtn(fp32, paths["int4 (onnxruntime, level 4)"],
                                                  accuracy_level=4)
    autos, auto_summaries = {}, {}
    for name, seq in (("auto @decode", 1), ("auto @prefill", 128)):
        auto = sg.quantize(model, mode="weight-only", bits="auto", block_size=BLOCK,
                           auto_batch=1, auto_seq=seq)
        auto_summaries[name] = auto.meta[metadata.AUTO_BITS].summary()
        make(name, lambda auto=auto: auto)
        autos[name] = sg.load(paths[name])
    rng = np.random.default_rng(0)
    decode = {"input_ids": rng.integers(0, 32000, (1, 1)).astype(np.int64)}
    prefill = {"input_ids": rng.integers(0, 32000, (1, 128)).astype(np.int64)}
    decode_names = ["dynamic int8", "fp32", "int4 (slimgraph)", "int4 (onnxruntime)",
                    "int4 (onnxruntime, level 4)", "int4 (slimgraph, level 0)", "auto @decode"]
    prefill_names = ["dynamic int8", "fp32", "int4 (slimgraph)", "auto @prefill"]
    results = {}
    for label, names, feed in (("decode", decode_names, decode),
                               ("prefill", prefill_names, prefill)):
        results[label] = benchmark([str(paths[n]) for n in names], feed, labels=names,
                                   rounds=rounds, threads=threads)
    lines = []
    for label, result in results.items():
        shape = "batch 1, sequence 1 (no KV cache)" if label == "decode" else \
            "batch 1, sequence 128"
        lines.append(f"{label} ({shape}); ratios to dynamic int8")
        lines.append(result.table())
        lines.append("")
    sizes = [[name, f"{path.stat().st_size / 2**20:.1f}", f"{made.get(name, 0):.1f}"]
             for name, path in paths.items()]
    lines.append(render_table(["model", "file MB", "made in s"], sizes, align="lrr"))
    for name, auto in autos.items():
        ops = [n.op_type for n in auto.graph]
        lines.append(f"{name}: {ops.count('MatMulNBits')} MatMulNBits, "
                     f"{ops.count('MatMulInteger') + ops.count('DynamicQuantizeMatMul')} int8 "
                     f"MatMul, {ops.count('MatMul')} float MatMul (weights or attention)")
    for name, summary in auto_summaries.items():
        lines.append(f"{name}: {summary}")

    def ratio(label: str, a: str, b: str) -> tuple[float, float, float]:
        result = results[label]
        comparison = next(c for c in result.comparisons if {c.a, c.b} == {a, b})
        if comparison.a == a:
            return comparison.ratio, comparison.low, comparison.high
        return 1 / comparison.ratio, 1 / comparison.high, 1 / comparison.low

    int4_decode = ratio("decode", "int4 (slimgraph)", "dynamic int8")
    auto_prefill = ratio("prefill", "auto @prefill", "dynamic int8")
    vs_ort = ratio("decode", "int4 (slimgraph)", "int4 (onnxruntime)")
    level0 = ratio("decode", "int4 (slimgraph, level 0)", "int4 (onnxruntime)")
    lines.append("")
    lines.append(f"int4/int8 at decode {int4_decode[0]:.3f} (90% {int4_decode[1]:.3f}-"
                 f"{int4_decode[2]:.3f}); auto/int8 at prefill {auto_prefill[0]:.3f} "
                 f"({auto_prefill[1]:.3f}-{auto_prefill[2]:.3f}); slimgraph/onnxruntime int4 at "
                 f"decode {vs_ort[0]:.3f} ({vs_ort[1]:.3f}-{vs_ort[2]:.3f})")
    checks = [
        _check("int4 decode step <= 0.9x dynamic int8", int4_decode[0] <= 0.9),
        _check("bits auto at prefill never slower than dynamic int8 (<= 1.0x or within noise)",
               auto_prefill[1] <= 1.0),
        _check("slimgraph int4 <= 1.0x onnxruntime RTN int4 at decode (or within noise)",
               vs_ort[1] <= 1.0),
        _check("at onnxruntime's accuracy level (0): slimgraph int4 <= 1.0x its RTN int4 at "
               f"decode (or within noise): {level0[0]:.3f} ({level0[1]:.3f}-{level0[2]:.3f})",
               level0[1] <= 1.0),
    ]
    return "\n".join(lines), checks


def kv_step(folder: Path, rounds: int, threads: int) -> tuple[str, list[str]]:
    """The same Llama as a KV-cache decode step (`from_torch_causal_lm`), timed at batch 1, one
    new token after a past of 127: dynamic int8 and slimgraph int4 (both fuse the attention into
    GroupQueryAttention first) against onnxruntime's RTN int4 of the same fp32 step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=False)
    step = sg.from_torch_causal_lm(LlamaForCausalLM(config).eval())
    fp32 = cleaned_model(step, folder / "step.fp32.onnx")
    model = sg.load(fp32)
    paths = {"fp32": fp32}
    for name, make in (("dynamic int8", lambda: sg.quantize(model, mode="dynamic")),
                       ("int4 (slimgraph)", lambda: sg.quantize(model, mode="weight-only",
                                                                block_size=BLOCK))):
        paths[name] = folder / f"step.{len(paths)}.onnx"
        sg.save(make(), paths[name])
    paths["int4 (onnxruntime)"] = folder / "step.ort.onnx"
    ort_rtn(fp32, paths["int4 (onnxruntime)"])
    paths["int4 (onnxruntime, level 4)"] = folder / "step.ort4.onnx"
    ort_rtn(fp32, paths["int4 (onnxruntime, level 4)"], accuracy_level=4)
    feed = sg.random_feeds(model, batch=1, dims={"sequence": 1, "past_sequence": 127})
    names = ["dynamic int8", "fp32", "int4 (slimgraph)", "int4 (onnxruntime)",
             "int4 (onnxruntime, level 4)"]
    result = benchmark([str(paths[n]) for n in names], feed, labels=names, rounds=rounds,
                       threads=threads)
    fused = {n: sum(node.op_type == "GroupQueryAttention" for node in sg.load(paths[n]).graph)
             for n in names}
    lines = ["KV-cache decode step (batch 1, 1 new token, past 127); ratios to dynamic int8",
             result.table(), f"GroupQueryAttention nodes: {fused}"]
    int4 = _ratio(result, "int4 (slimgraph)", "dynamic int8")
    vs_ort = _ratio(result, "int4 (slimgraph)", "int4 (onnxruntime)")
    lines.append(f"int4/int8 {int4:.3f}; slimgraph/onnxruntime int4 {vs_ort:.3f}")
    return "\n".join(lines), [
        _check("KV-cache decode step: int4 <= 0.9x dynamic int8", int4 <= 0.9),
        _check("KV-cache decode step: slimgraph int4 <= 1.0x onnxruntime RTN int4",
               vs_ort <= 1.0)]


def _ratio(result: object, a: str, b: str) -> float:
    """Median latency of `a` over `b` in a benchmark result."""
    comparison = next(c for c in result.comparisons  # type: ignore[attr-defined]
                      if {c.a, c.b} == {a, b})
    return comparison.ratio if comparison.a == a else 1 / comparison.ratio


def cleaned_model(model: object, target: Path) -> Path:
    """`cleaned` for a model in memory."""
    sg.save(sg.optimize(model, preset="lossless"), target)  # type: ignore[arg-type]
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("quality", "speed", "kv", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    checks: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.part in ("quality", "all"):
            text, more = quality(folder)
            print(text, "\n", flush=True)
            checks += more
        if args.part in ("speed", "all"):
            text, more = speed(folder, args.rounds, args.threads)
            print(text, "\n", flush=True)
            checks += more
        if args.part in ("kv", "all"):
            text, more = kv_step(folder, args.rounds, args.threads)
            print(text, "\n", flush=True)
            checks += more
    print("\n".join(checks))


if __name__ == "__main__":
    main()
