"""Hugging Face architectures from tiny configs (random seeded weights, no downloads), exported
with `sg.from_torch` once per session, and feeds that drive them.

Every model has 2 layers, hidden size 32, 2 heads and an FFN of `FFN` channels; `FFN_LAYERS`
names the torch modules whose output channels are the FFN's (what `prune` must shrink).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["FFN", "FFN_LAYERS", "HF_MODELS", "hf_model", "hf_feeds"]

FFN = 64
SEQ = 8

# Layer-name suffixes of the FFN's first projections (gate and up both, for SwiGLU) and of
# convolutions whose channels prune too (Wav2Vec2's first feature-extractor conv, Whisper's conv1).
FFN_LAYERS = {
    "gpt2": ("mlp.c_fc",),
    "gpt2-dynamic": ("mlp.c_fc",),
    "bert": ("intermediate.dense",),
    "albert": ("ffn",),
    "distilbert": ("ffn.lin1",),
    "distilbert-torchscript": ("ffn.lin1",),
    "llama": ("mlp.gate_proj", "mlp.up_proj"),
    "vit": ("mlp.fc1",),
    "whisper": ("fc1", "conv1"),
    "wav2vec2": ("feed_forward.intermediate_dense", "feature_extractor.conv_layers.0.conv"),
}
HF_MODELS = tuple(FFN_LAYERS)

_CACHE: dict[str, onnx.ModelProto] = {}


def _build(name: str):  # noqa: ANN202 - (torch module, example args, dynamic_shapes)
    import torch
    import transformers as hf
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, SEQ))
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": FFN}  # fmt: skip
    if name.startswith("gpt2"):
        config = hf.GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_inner=FFN,
            vocab_size=100,
            n_positions=32,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        dims = ({0: "batch", 1: "seq"},) if name == "gpt2-dynamic" else None
        return hf.GPT2Model(config), (ids,), dims
    if name == "bert":
        return hf.BertModel(hf.BertConfig(vocab_size=100, max_position_embeddings=32, **sizes)), (
            ids,), None  # fmt: skip
    if name == "albert":  # one layer's weights shared by both layers
        config = hf.AlbertConfig(vocab_size=100, embedding_size=16, max_position_embeddings=32,
                                 **sizes)  # fmt: skip
        return hf.AlbertModel(config), (ids,), None
    if name.startswith("distilbert"):
        config = hf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2,
                                     hidden_dim=FFN, max_position_embeddings=32)  # fmt: skip
        return hf.DistilBertModel(config), (ids,), None
    if name == "llama":  # SwiGLU: gate and up coupled through Mul
        config = hf.LlamaConfig(vocab_size=100, max_position_embeddings=32, num_key_value_heads=1,
                                head_dim=16, use_cache=False, **sizes)  # fmt: skip
        return hf.LlamaModel(config), (ids,), None
    if name == "vit":
        config = hf.ViTConfig(image_size=16, patch_size=4, num_channels=3, **sizes)
        return hf.ViTModel(config, add_pooling_layer=False), (torch.randn(1, 3, 16, 16),), None
    if name == "whisper":
        config = hf.WhisperConfig(
            vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=FFN,
            decoder_ffn_dim=FFN, num_mel_bins=8, max_source_positions=16, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        )  # fmt: skip
        return WhisperEncoder(config), (torch.randn(1, 8, 32),), None
    if name == "wav2vec2":  # conv feature extractor (GroupNorm after the first conv)
        config = hf.Wav2Vec2Config(
            vocab_size=100, conv_dim=(16, 16), conv_stride=(4, 2), conv_kernel=(8, 4),
            num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, **sizes,
        )  # fmt: skip
        return hf.Wav2Vec2Model(config), (torch.randn(1, 400),), None
    raise KeyError(name)


def hf_model(name: str) -> ir.Model:
    """The tiny `name` model (a key of `FFN_LAYERS`) exported with `sg.from_torch` (symbolic
    batch; "gpt2-dynamic": symbolic batch and sequence), or "...-torchscript" with torch's
    TorchScript exporter (symbolic batch and sequence: Shape -> Gather -> Unsqueeze -> Concat
    views). A fresh copy each call."""
    if name not in _CACHE:
        from transformers.utils import logging as hf_logging

        from slimgraph.ir import from_torch

        hf_logging.set_verbosity_error()
        module, args, dims = _build(name)
        if name.endswith("-torchscript"):
            _CACHE[name] = _torchscript(module.eval(), args)
        else:
            _CACHE[name] = ir.to_proto(from_torch(module.eval(), args, dynamic_shapes=dims))
    return ir.from_proto(_CACHE[name])


def _torchscript(module, args) -> onnx.ModelProto:  # noqa: ANN001 - a transformers model
    import io
    import warnings

    import torch

    class FirstOutput(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.model(ids)[0]

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            FirstOutput(), args, buffer, dynamo=False, input_names=["input_ids"],
            output_names=["hidden"], opset_version=17,
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "hidden": {0: "batch", 1: "seq"}},
        )  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def hf_feeds(model: ir.Model, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for `model` at `batch` (and `SEQ` for a symbolic sequence): token ids in [0, 100),
    float inputs standard normal."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        assert value.shape is not None and value.name is not None
        shape = [d if isinstance(d, int) else (batch if str(d) == "batch" else SEQ)
                 for d in value.shape]  # fmt: skip
        if value.dtype == ir.DataType.INT64:
            feeds[value.name] = rng.integers(0, 100, shape).astype(np.int64)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds
