"""`slimgraph prune --ratio 0.3` on Hugging Face architectures from tiny configs, one table.

Every model of `tests/passes/prune/hf_models.py` (2 layers, hidden 32, FFN 64, random seeded
weights, exported with `sg.from_torch`; "gpt2-dynamic" with a symbolic sequence too,
"distilbert-torchscript" by torch's TorchScript exporter) is written to a temporary folder and
pruned with the command line, no user inputs. Columns: parameters of the input and output files
as `inspect --json` counts them and as the prune report counts them (on the prepared copy:
constant subgraphs folded), the prune report's MACs before and after next to `inspect`'s on the two
files, the FFN widths before -> after, and whether
onnxruntime runs the pruned file at batch 3 with the original's output shapes.

Run: python benchmarks/prune_transformers.py [NAME ...]
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not this folder: its transformers.py would shadow the package

import slimgraph as sg  # noqa: E402
from slimgraph import runtime  # noqa: E402
from slimgraph.tools.cli import main as cli  # noqa: E402
from tests.passes.prune.hf_models import FFN, HF_MODELS, hf_feeds, hf_model  # noqa: E402


def _json(*argv: str) -> dict[str, object]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(list(argv))
    if code != 0:
        raise SystemExit(f"slimgraph {' '.join(argv)} exited {code}")
    return json.loads(out.getvalue())


def main() -> int:
    logging.basicConfig(level=logging.ERROR)
    names = sys.argv[1:] or list(HF_MODELS)
    header = (f"{'model':23} {'params (inspect)':>18} {'params (prune)':>18} "
              f"{'MACs (prune)':>21} {'MACs (inspect)':>21} {'FFN':>7}  onnxruntime")  # fmt: skip
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            model = hf_model(name)
            source, target = Path(folder) / f"{name}.onnx", Path(folder) / f"{name}.pruned.onnx"
            sg.save(model, source)
            report = _json("prune", str(source), "-o", str(target), "--ratio", "0.3", "--json")
            before, after = (
                _json("inspect", str(source), "--json"),
                _json("inspect", str(target), "--json"),
            )
            widths = {(r["before"], r["after"]) for r in report["layers"]  # type: ignore[attr-defined]
                      if r["before"] == FFN}  # fmt: skip
            pruned = sg.load(target)
            feeds = hf_feeds(model, batch=3)
            want = runtime.run(runtime.create_session(model, threads=1), feeds)
            got = runtime.run(runtime.create_session(pruned, threads=1), feeds)
            same = {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
            ffn = ", ".join(f"{b}->{a}" for b, a in sorted(widths))
            print(
                f"{name:23} {before['parameters']:>8,} -> {after['parameters']:>6,} "
                f"{report['params_before']:>8,} -> {report['params_after']:>6,} "
                f"{report['macs_before']:>9,} -> {report['macs_after']:>8,} "
                f"{before['macs']:>9,} -> {after['macs']:>8,} {ffn:>7}  "
                f"{'runs, output shapes kept' if same else 'OUTPUT SHAPES DIFFER'}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
