"""The public verbs, one module each, between the command line (`tools`) and the passes.

Every verb takes its options as keywords or as `options=` an instance of its options type, and has
a `*_with_report` twin returning `(model, report)` where it returns a model: `quantize`
(`QuantizeOptions`, `QuantizeReport`), `prune` (`PruneOptions`, `PruneReport`), `factorize`
(`FactorizeOptions`, `FactorizeReport`), `optimize` (`OptimizeOptions`, `PipelineResult`),
`finetune` (`FinetuneOptions`, `FinetuneReport`); `sensitivity` (`SensitivityOptions`) and
`sweep` (`SweepOptions`) return their report (`SensitivityTable`, `SweepResult`). The budget
search over any family's `Units` is `budget`; `check_budget` its one-shot check.

Imports run downwards: `tools` -> `api` -> `passes` -> `runtime` -> `ir`; nothing below imports
`api`. The verbs and their types are exported by `slimgraph` itself; this package
re-exports nothing, so `slimgraph.api.quantize` stays the module, not the function.
"""
