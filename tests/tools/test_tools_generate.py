"""`slimgraph generate` / `sg.generate`: greedy tokens equal transformers' own greedy generate, on
the exported decode step and on its fused and quantized forms; and every command runs on a decode
step without user data, names kept."""

from __future__ import annotations

import pytest
import torch

import slimgraph as sg
from slimgraph.errors import BadOptionError
from slimgraph.ir import metadata
from tests import models_lm
from tests.kit.asserts import raises_exactly
from tests.kit.files import save_ir, save_proto
from tests.kit.graphs import single_op_model

PROMPTS = [[5, 17, 42, 8, 9], [3, 7, 11]]
NEW = 6


def _transformers_greedy(module, prompts: list[list[int]], new: int) -> list[list[int]]:
    """transformers' `generate(do_sample=False)` on left-padded prompts: the new tokens."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    with torch.no_grad():
        out = module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                              do_sample=False, pad_token_id=0)
    return out[:, longest:].tolist()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The Llama decode step saved without its recorded example sizes (as a file from another
    exporter would be), and transformers' greedy tokens for PROMPTS."""
    module, model = models_lm.exported("llama")
    del model.metadata_props[metadata.EXAMPLE_DIMS]
    path = save_ir(model, tmp_path_factory.mktemp("lm") / "llama.onnx")
    return module, path, _transformers_greedy(module, PROMPTS, NEW)


def test_greedy_tokens_equal_transformers_generate(llama) -> None:
    module, path, want = llama
    result = sg.generate(path, PROMPTS, max_new_tokens=NEW)
    assert result.tokens == want
    assert result.prompt_tokens == [5, 3] and result.decode_steps == NEW - 1
    assert result.prefill_seconds > 0 and result.decode_tokens_per_second > 0
    one = sg.generate(path, PROMPTS[1], max_new_tokens=NEW, batch=3)
    assert one.tokens == [want[1]] * 3  # alone, unpadded, the same tokens


@pytest.mark.parametrize("name", ["gpt2", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_greedy_tokens_of_the_fused_step_equal_transformers(name: str) -> None:
    module, model = models_lm.exported(name)
    fused = sg.optimize(model, preset="transformer")
    want = _transformers_greedy(module, PROMPTS, NEW)
    assert sg.generate(model, PROMPTS, max_new_tokens=NEW).tokens == want
    assert sg.generate(fused, PROMPTS, max_new_tokens=NEW).tokens == want


def test_every_command_runs_on_a_decode_step_without_data(cli, llama, tmp_path) -> None:
    """optimize (the transformer preset), dynamic int8 and weight-only int4 verify on generated
    decode-step inputs; names kept; the fused model generates transformers' tokens."""
    _, path, want = llama
    source = sg.load(path)
    names = ([v.name for v in source.graph.inputs], [v.name for v in source.graph.outputs])
    commands = {
        "fused": ["optimize", path, "--preset", "transformer"],
        "dynamic": ["quantize", path, "--mode", "dynamic"],
        "int4": ["quantize", path, "--mode", "weight-only"],
    }
    for label, command in commands.items():
        out = tmp_path / f"{label}.onnx"
        result = cli(*command, "-o", out)
        assert result.code == 0, (label, result.err)
        model = sg.load(out)
        assert ([v.name for v in model.graph.inputs],
                [v.name for v in model.graph.outputs]) == names, label
        ops = {n.op_type for n in model.graph}
        assert "GroupQueryAttention" in ops, label  # weight-only fuses first, as dynamic
    fused = cli("generate", tmp_path / "fused.onnx", "--prompt-ids", "5,17,42,8,9",
                "--prompt-ids", "3,7,11", "--max-new-tokens", NEW)
    assert fused.code == 0 and fused.err == ""
    lines = fused.out.splitlines()
    assert lines[:2] == [f"row {i}: {' '.join(map(str, row))}" for i, row in enumerate(want)]
    assert lines[2].split() == ["phase", "tokens", "ms", "tokens/s"]
    assert lines[4].split()[:2] == ["prefill", "8"] and lines[5].split()[:2] == ["decode", "10"]
    for label in ("dynamic", "int4"):
        data = cli("generate", tmp_path / f"{label}.onnx", "--prompt-ids", "1,2,3",
                   "--max-new-tokens", "3", "--json").json()
        assert len(data["tokens"]) == 1 and len(data["tokens"][0]) == 3
        assert all(0 <= t < models_lm.VOCAB for t in data["tokens"][0])
    # the vocabulary of a block-quantized embedding table (GatherBlockQuantized) is checked too
    outside = cli("generate", tmp_path / "int4.onnx", "--prompt-ids", f"1,{models_lm.VOCAB}")
    assert (outside.code, outside.out) == (2, "")
    assert outside.err == (f"slimgraph generate: error: prompt id {models_lm.VOCAB} is outside "
                           f"the model's vocabulary (0..{models_lm.VOCAB - 1})\n")


def test_generate_refuses_what_it_cannot_run(cli, llama, tmp_path, capsys) -> None:
    _, path, _ = llama
    plain = save_proto(single_op_model("MatMul", ["batch", 4], [4, 3]), tmp_path / "mm.onnx")
    result = cli("generate", plain, "--prompt-ids", "1,2")
    assert (result.code, result.out) == (2, "")
    assert result.err == (
        "slimgraph generate: error: not a decode-step graph: generation needs past key/value "
        "inputs [batch, kv_heads, past, head_size] that the graph concatenates with the new "
        "tokens' (export one with slimgraph.from_torch_causal_lm)\n")
    with pytest.raises(SystemExit) as stop:
        cli("generate", path, "--prompt-ids", "1,a")
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "slimgraph generate: error: argument --prompt-ids: '1,a' is not a comma-separated list "
        "of token ids (see slimgraph generate --help)\n")
    both = cli("generate", path, "--prompt-ids", "1,2", "--prompt-ids", "3", "--batch", "2")
    assert both.code == 2 and both.err == (
        "slimgraph generate: error: --batch repeats one prompt; 2 prompts were given\n")
    with raises_exactly(BadOptionError, "an empty prompt: every prompt needs at least one "
                                        "token id"):
        sg.generate(path, [[1, 2], []])
    # ids outside the embedding table were onnxruntime's "indices element out of data bounds"
    last = models_lm.VOCAB - 1
    outside = cli("generate", path, "--prompt-ids", f"1,2,{models_lm.VOCAB + 200}")
    assert (outside.code, outside.out) == (2, "")
    assert outside.err == (f"slimgraph generate: error: prompt id {models_lm.VOCAB + 200} is "
                           f"outside the model's vocabulary (0..{last})\n")
    with raises_exactly(BadOptionError, f"prompt id -1 is outside the model's vocabulary "
                                        f"(0..{last})"):
        sg.generate(path, [[1, 2], [-1]])
    with raises_exactly(BadOptionError, f"pad={models_lm.VOCAB} is outside the model's "
                                        f"vocabulary (0..{last})"):
        sg.generate(path, [[1, 2], [3]], pad=models_lm.VOCAB)


def test_a_decode_step_nothing_can_be_fused_in_is_refused(cli, tmp_path) -> None:
    """The transformer preset on a Llama step whose mask is not causal: GroupQueryAttention
    cannot take it (and grouped keys need it), so nothing is fused: one line, exit 2, no file."""
    _, model = models_lm.exported("llama")
    models_lm.edit_causal_comparison(model, swap=True)
    path = save_ir(model, tmp_path / "noncausal.onnx")
    out = tmp_path / "fused.onnx"
    result = cli("optimize", path, "--preset", "transformer", "-o", out)
    assert (result.code, result.out) == (2, "")
    assert result.err == (
        "slimgraph optimize: error: fuse-attention: none of the 2 attention blocks can be fused; "
        "model.layers.0.self_attn: grouped-query attention over a key/value cache needs "
        "GroupQueryAttention, and the mask is not evidently causal (that op masks causally)\n")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["noncausal.onnx"]
