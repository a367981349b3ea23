"""Every metadata key slimgraph reads or writes, in one place.

Keys in `metadata_props` (strings that survive saving) start with `pkg.slimgraph.`; keys in an IR
object's `.meta` (in-memory analysis, never saved) start with `slimgraph.`.
"""

from __future__ import annotations

__all__ = [
    "TORCH_NAME_SCOPES",
    "LAYER",
    "SOURCE_PATH",
    "SOURCE_FILES",
    "FACTORIZE_REPORT",
    "UNIT",
    "QUANT_REPORT",
    "BUDGET_SEARCH",
    "SPEED_FALLBACK",
    "SMOOTH_QUANT_ALPHA",
    "AUTO_BITS",
    "STATIC_SHAPE",
    "EXAMPLE_DIMS",
    "MATERIALIZED",
    "EXPORTER_DEBUG_KEYS",
    "EXPORTER_DEBUG_VALUE_PREFIXES",
]

# Written by torch.onnx.export(dynamo=True) on every node: the module path, one entry per level,
# ending with the FX node's own name
# (e.g. "['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d']").
TORCH_NAME_SCOPES = "pkg.torch.onnx.name_scopes"

# metadata_props of a node: the torch module path the node came from (e.g. "layer1.0.conv1").
LAYER = "pkg.slimgraph.layer"

# Model.meta: the resolved path the model was loaded from (save() refuses to write over it).
SOURCE_PATH = "slimgraph.source_path"

# Model.meta: resolved paths of the external-data files the loaded model reads from.
SOURCE_FILES = "slimgraph.source_files"

# metadata_props of a node: the unit (layer + activation, e.g. Conv -> Relu) it belongs to, named
# after the layer; quantization does not split a unit (written by the `mark-units` pass).
UNIT = "pkg.slimgraph.unit"

# Model.meta of a model returned by `factorize`: its `FactorizeReport` (per-layer ranks, errors).
FACTORIZE_REPORT = "slimgraph.factorize_report"

# Model.meta: the QuantReport of sg.quantize(..., report=True) (per-tensor SQNR on calibration
# data).
QUANT_REPORT = "slimgraph.quantize_report"

# Model.meta: the BudgetSearch of a compression under an accuracy budget (layers kept
# uncompressed and why, the evaluations tried; `slimgraph.api.budget`).
BUDGET_SEARCH = "slimgraph.budget_search"

# Model.meta: the SpeedFallback of static quantization (layer shape classes timed as int8 and as
# float, those left float; `passes.quantize.speed_fallback`).
SPEED_FALLBACK = "slimgraph.speed_fallback"

# Model.meta: the alpha SmoothQuant chose (None: no smoothing scored best); `quantize(...,
# smooth_quant=...)`.
SMOOTH_QUANT_ALPHA = "slimgraph.smooth_quant_alpha"

# Model.meta: the AutoBitsResult of sg.quantize(..., bits="auto") (the form each MatMul took and
# the timings it was chosen on; `slimgraph.passes.quantize.auto_bits`).
AUTO_BITS = "slimgraph.auto_bits"

# Model.meta: the FallbackChoice of sg.quantize(..., fallback="fp16") under a budget (float16 or
# float32 weights for the layers kept out of int8; `slimgraph.passes.quantize.fallback`).
PRECISION_FALLBACK = "slimgraph.precision_fallback"

# Value.meta: the value's shape with the symbolic dimensions fixed (a tuple of ints), recorded
# for channel tracing (`slimgraph.passes.prune._shapes.annotate_static_shapes`); stale once the
# graph changes.
STATIC_SHAPE = "slimgraph.static_shape"
# metadata_props of a model exported by `from_torch`: the sizes the example inputs gave each
# symbolic dimension, as JSON by dimension name (`{"batch": 2, "sequence": 16}`). Sample inputs
# (`runtime.feeds`) take them, so verification runs the model at the sizes it was exported for.
EXAMPLE_DIMS = "pkg.slimgraph.example_dims"

# Model.meta: how many ConstantOfShape nodes the `constant-of-shape` pass replaced by
# initializers in this model, less those `compact-constants` wrote back: how many nodes
# compaction may add without the model ending up with more nodes than it came with.
MATERIALIZED = "slimgraph.materialized_constants"

# Debug information torch's exporter writes on every node (source stack traces, FX node text, module
# classes) and the name of the onnxscript rewrite rule that made a node: useful while exporting,
# dead weight in a deployed file (about 9% of a small CNN's bytes). The layer name is kept; reports
# need it (`TORCH_NAME_SCOPES` too, where no layer name was derived from it).
EXPORTER_DEBUG_KEYS = (
    "pkg.torch.onnx.stack_trace",
    "pkg.torch.onnx.fx_node",
    "pkg.torch.onnx.class_hierarchy",
    "namespace",
    "pkg.onnxscript.rewriter.rule_name",
)

# The same kind of information on values (graph inputs and outputs, initializers, intermediate
# values): torch.export's graph signature, the FX node a value came from, the constants onnxscript
# folded into it. Keys equal to or starting with one of these.
EXPORTER_DEBUG_VALUE_PREFIXES = (
    "pkg.torch.export.graph_signature.",
    "pkg.torch.onnx.original_node_name",
    "pkg.onnxscript.optimizer.folded_from",
)
