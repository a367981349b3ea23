"""The one graph-building and assertion kit of the test suite.

- `tests.kit.graphs`: models built by hand from `onnx.helper` nodes (checked and shape-inferred),
  one-node Conv/Gemm/MatMul models, initializer and op-count look-ups.
- `tests.kit.protos`: raw, unchecked `ModelProto`s for the loader and session tests (external data,
  subgraphs, local functions).
- `tests.kit.exports`: torch models of `tests.models` exported to ONNX once per session.
- `tests.kit.data`: the bundled digits model and data, the onnx light zoo, feeds.
- `tests.kit.asserts`: outputs on onnxruntime compared with explicit tolerances relative to the
  output's scale, rewired edges by identity, exact error messages, model validity.
- `tests.kit.files`: writing models and proving that a folder was left alone.
- `tests.kit.cli`: running the installed console script.
- `tests.kit.heads`: attention heads zeroed on purpose (removing them must be exact).
"""
