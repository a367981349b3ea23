"""docs/torch_backend_ops.md lists every op of the torch backend's op table: its generated table
is the registry rendered, so the test fails when a kernel is added or removed without the docs.

Regenerate after changing the op table: `python -m tests.runtime.torch_backend.test_ops_doc`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[3] / "docs" / "torch_backend_ops.md"
BEGIN = "<!-- generated from the op table by tests/runtime/torch_backend/test_ops_doc.py -->"
END = "<!-- end of the generated table -->"
KINDS = {
    "_math": "element-wise, activations, linear algebra",
    "_shape": "shapes, sequences",
    "_index": "indexing",
    "_nn": "reductions, normalization",
    "_conv": "convolution, pooling, resize",
    "_quant": "quantization (QDQ and dynamic int8)",
    "_attention": "attention, rotary embeddings",
}


def render() -> str:
    """The table: one row per kernel module, its ONNX-domain and com.microsoft ops."""
    from slimgraph.runtime.torch_backend import _ops

    rows: dict[str, dict[str, list[str]]] = {module: {"": [], _ops.MS_DOMAIN: []}
                                             for module in KINDS}
    for domain, op_type in _ops.known_ops():
        builder = _ops.lookup(domain, op_type)
        assert builder is not None
        rows[builder.__module__.rsplit(".", 1)[1]][domain].append(op_type)
    lines = ["| kind | ONNX domain | com.microsoft |", "| --- | --- | --- |"]
    for module, label in KINDS.items():
        onnx, contrib = (", ".join(sorted(rows[module][d])) or "-"
                         for d in ("", _ops.MS_DOMAIN))
        lines.append(f"| {label} | {onnx} | {contrib} |")
    return "\n".join(lines)


def _generated(text: str) -> str:
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()


def test_docs_list_every_op_of_the_table() -> None:
    pytest.importorskip("torch")
    assert _generated(DOC.read_text()) == render(), (
        "docs/torch_backend_ops.md is stale: python -m tests.runtime.torch_backend.test_ops_doc")


def test_the_table_has_every_registered_op_once() -> None:
    pytest.importorskip("torch")
    from slimgraph.runtime.torch_backend import _ops

    table = render()
    for domain, op_type in _ops.known_ops():
        column = 2 if domain else 1
        cells = [line.split(" | ")[column] for line in table.splitlines()[2:]]
        assert sum(op_type in cell.strip("| ").split(", ") for cell in cells) == 1, op_type


if __name__ == "__main__":
    text = DOC.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + render() + "\n" + text[stop:])
