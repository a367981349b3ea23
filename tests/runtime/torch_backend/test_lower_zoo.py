"""Models users have: Hugging Face architectures from tiny configs (`tests.models_hf`) and the
torch models of `tests.models`, exported by `sg.from_torch`, lowered whole. Every op of every
form (as exported, the `transformer` preset, dynamic int8; the lossless form adds no op to them
and is covered for the torch models by test_lower_models.py) has a kernel, and eval mode equals
onnxruntime at a batch and a sequence length other than the export's, with a padded row:
rtol 1e-4 plus an absolute 1e-5 of each output's largest magnitude. Dynamic int8 forms are
compared given onnxruntime's DynamicQuantizeLinear codes (`with_measured_codes` says why).

Six architectures run in the default suite (BERT, GPT-2, Llama, ViT, Whisper encoder,
Wav2Vec2, as exported; BERT also dynamic int8); the sweep over all of them and every form is
slow-marked.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.errors import BadInputError
from tests import models
from tests.kit.exports import exported_model
from tests.runtime.torch_backend.backend_helpers import assert_lowers_exactly, assert_matches_ort

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from slimgraph.runtime.torch_backend._lower import check_lowerable  # noqa: E402
from tests import models_hf  # noqa: E402

DEFAULT = ["bert", "gpt2", "llama", "vit", "whisper-encoder", "wav2vec2"]
FORMS: dict[str, Callable[[ir.Model], ir.Model]] = {
    "exported": lambda m: m,
    "transformer": lambda m: sg.optimize(m, preset="transformer", verify=False),
    "dynamic": lambda m: sg.quantize(m, mode="dynamic", verify=False, progress=False),
}


@pytest.mark.parametrize("name", DEFAULT)
def test_hugging_face_export_lowers_exactly(name: str) -> None:
    case, model = models_hf.exported(name)
    assert_matches_ort(model, case.feeds(3, 7, 1))


def test_hugging_face_bert_dynamic_int8_lowers_exactly_given_the_codes() -> None:
    case, model = models_hf.exported("bert")
    quantized = FORMS["dynamic"](model)
    assert any(n.op_type == "MatMulInteger" for n in quantized.graph)
    assert_lowers_exactly(quantized, case.feeds(3, 7, 1))


def _form(model: ir.Model, form: str) -> ir.Model | None:
    try:
        return FORMS[form](model)
    except BadInputError:  # nothing to quantize dynamically (a model without MatMul)
        return None


@pytest.mark.slow
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", [*models_hf.HF_MODELS, *models_hf.NO_ATTENTION])
def test_every_hugging_face_form_lowers_exactly(name: str, form: str) -> None:
    case, model = models_hf.exported(name)
    # the transformer form: fused once per session (`models_hf.fused`, as FORMS computes it)
    formed = models_hf.fused(name) if form == "transformer" else _form(model, form)
    if formed is None:
        pytest.skip(f"no {form} form")
    check_lowerable(formed)
    assert_lowers_exactly(formed, case.feeds(3, 7, 1))


@pytest.mark.slow
@pytest.mark.parametrize("form", ["transformer", "dynamic"])
@pytest.mark.parametrize("torch_model_name", ["bert", "mlp"])
def test_every_torch_test_model_form_lowers_exactly(torch_model_name: str, form: str) -> None:
    """The torch test models with MatMuls (the CNNs have none to fuse or quantize dynamically;
    as exported, lossless and static int8 they are in test_lower_models.py)."""
    model = exported_model(torch_model_name)
    formed = _form(model, form)
    if formed is None:
        pytest.skip(f"no {form} form")
    check_lowerable(formed)
    if torch_model_name == "bert":
        ids, mask = models.example_input("bert", 3)
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    else:
        feeds = sg.random_feeds(formed, batch=3, seed=1)
    assert_lowers_exactly(formed, {k: np.asarray(v) for k, v in feeds.items()})
