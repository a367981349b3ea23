"""`slimgraph generate MODEL --prompt-ids 1,2,3 [--max-new-tokens N] [--batch N] [--json]`.

Greedy decoding with a decode-step graph (past keys/values in, present out; exported by
`slimgraph.from_torch_causal_lm`) on onnxruntime (`slimgraph.runtime.generate`): prints the new
tokens of each row and the prefill and decode speed in tokens per second. A check that a fused or
quantized causal LM still generates, and how fast.
"""

from __future__ import annotations

import argparse

import slimgraph.ir as sg_ir
from slimgraph.runtime.generate import generate
from slimgraph.tools._common import add_json_option, add_model_arguments, print_result
from slimgraph.tools.compare_cmd import positive_int

__all__ = ["register"]


def _token_ids(text: str) -> list[int]:
    """argparse type: comma-separated token ids (`1,2,3`)."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a comma-separated list of token ids") from None
    if not ids or any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of token ids (0 or more)")
    return ids


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="greedy generation with a decode-step (KV-cache) graph, tokens per second",
        description="Run a causal LM's decode-step graph (from slimgraph.from_torch_causal_lm) "
        "on onnxruntime: the prompt once (prefill), then one token at a time (decode), "
        "greedy. Prints the new tokens and the prefill and decode speed.",
    )
    add_model_arguments(parser, "the decode-step .onnx file", output=False)
    parser.add_argument(
        "--prompt-ids", type=_token_ids, action="append", required=True, metavar="IDS",
        help="prompt token ids, comma-separated (1,2,3); repeat for a batch of prompts "
        "(left-padded to the longest)")
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=16,
        help="tokens to generate per prompt (default 16)")
    parser.add_argument(
        "--batch", type=positive_int, default=None,
        help="run one prompt as a batch of this many rows (to time a batch)")
    parser.add_argument("--eos", type=int, default=None,
                        help="stop once every row has produced this token id")
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="intra-op threads (default: all cores)")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    model = sg_ir.load(args.model)
    prompts = args.prompt_ids
    result = generate(model, prompts if len(prompts) > 1 else prompts[0],
                      max_new_tokens=args.max_new_tokens, batch=args.batch, eos=args.eos,
                      threads=args.threads)
    return print_result(args, result.to_dict(), str(result))
