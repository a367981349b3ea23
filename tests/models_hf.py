"""Hugging Face and torch attention models from tiny configs: the one home of the test zoo
(attention fusion, head pruning, the torch backend's lowering and training, benchmarks).

`build(name)` returns a `Case`: the torch module (eval mode, seeded random weights, nothing
downloaded), example inputs, the `dynamic_shapes` to export it with (batch and, where the
model allows, sequence symbolic) and `feeds(batch, seq)`, inputs at other sizes with a padded row
where the model takes a mask. `exported(name)` exports each model once per session (one cache
for every test module) and returns a fresh copy; `transformer_result(name)` runs the transformer
preset on it once per session (fusion, head pruning and lowering tests share it) and `fused(name)`
returns a fresh copy of its model. `HF_MODELS` lists the Hugging Face
architectures, `TORCH_MODELS` torch's own attention modules, `NO_ATTENTION` the ones without
attention (ConvNeXt, ResNet).

Sizes: 2 layers, hidden 32-64, 4 heads (2 KV heads where the architecture has grouped-query
attention), so an export takes a second or two. Attention is the default "sdpa" implementation
except where the exporter or the architecture needs "eager" (DeBERTa, T5, Swin, MobileViT,
GPT-J). Weights are drawn wide (`INIT`) so that a wrong mask or head order shows in the output,
and normalization scales are redrawn (`build`): Hugging Face's initialization makes MobileViT's
outputs all zero, which proves nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Case", "build", "export", "exported", "transformer_result", "fused", "wrap",
           "HF_MODELS", "TORCH_MODELS", "NO_ATTENTION", "EXTRA_MODELS", "ALL_MODELS"]

VOCAB = 100
Feeds = dict[str, np.ndarray]


@dataclasses.dataclass
class Case:
    """One model: module, example args, dynamic shapes, attention blocks, feeds at any size.

    Attributes:
        module: the torch module in eval mode.
        args: example inputs for the export (a tuple of tensors).
        dynamic_shapes: per argument, {axis: name} of the symbolic axes.
        blocks: attention blocks the model has (softmax-attention cores).
        feeds: (batch, seq, seed) -> input arrays named as the exported graph's inputs; `seq`
            is ignored where the sequence is fixed by the model (images, Whisper frames).
        names: the graph input names, in argument order.
        fixed_seq: the sequence cannot change (image models, Whisper).
    """

    module: nn.Module
    args: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple[dict[int, str] | None, ...]
    blocks: int
    feeds: Callable[[int, int, int], Feeds]
    names: tuple[str, ...]
    fixed_seq: bool = False


def _mask(rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
    """int64 [batch, seq] keep-mask: row 0 full, row 1 (if any) half padded, others random."""
    mask = np.ones((batch, seq), np.int64)
    for row in range(1, batch):
        keep = max(1, seq // 2) if row == 1 else int(rng.integers(1, seq + 1))
        mask[row, keep:] = 0
    return mask


def _text(
    module: nn.Module, blocks: int, *, mask: bool = True, seq: int = 8, causal_pad: bool = False
) -> Case:
    """A model taking (input_ids [, attention_mask]) with batch and sequence symbolic.

    causal_pad: decoders are fed a left-aligned keep-mask too (padding at the end).
    """
    del causal_pad
    ids = torch.randint(0, VOCAB, (2, seq))
    dims = {0: "batch", 1: "seq"}

    def feeds(batch: int, length: int, seed: int = 0) -> Feeds:
        rng = np.random.default_rng(seed)
        out = {"input_ids": rng.integers(0, VOCAB, (batch, length)).astype(np.int64)}
        if mask:
            out["attention_mask"] = _mask(rng, batch, length)
        return out

    if mask:
        args: tuple[torch.Tensor, ...] = (ids, torch.ones(2, seq, dtype=torch.int64))
        return Case(module, args, (dims, dims), blocks, feeds, ("input_ids", "attention_mask"))
    return Case(module, (ids,), (dims,), blocks, feeds, ("input_ids",))


def _image(module: nn.Module, blocks: int, size: int, channels: int = 3) -> Case:
    pixels = torch.randn(2, channels, size, size)

    def feeds(batch: int, length: int, seed: int = 0) -> Feeds:
        del length
        rng = np.random.default_rng(seed)
        return {"pixel_values": rng.standard_normal((batch, channels, size, size)).astype(
            np.float32)}

    return Case(module, (pixels,), ({0: "batch"},), blocks, feeds, ("pixel_values",),
                fixed_seq=True)


class _One(nn.Module):
    """Calls a Hugging Face model with one keyword argument and returns its first output, so the
    export has plain positional inputs and one output; the model stays the `model` attribute
    (layer names read `model.encoder.layer.0...`)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], **fixed: Any) -> None:
        super().__init__()
        self.model, self.names, self.fixed = model, names, fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.names[0]: x}, **self.fixed)[0]


class _Two(_One):
    """`_One` with two inputs (the second is the attention mask)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.model(**{self.names[0]: x, self.names[1]: mask}, **self.fixed)[0]


def wrap(model: nn.Module, names: tuple[str, ...], **fixed: Any) -> nn.Module:
    """`model` (a Hugging Face model) called with `names` as keyword inputs, in eval mode,
    returning its first output: what `from_torch` exports with positional inputs."""
    wrapper = _One if len(names) == 1 else _Two
    return wrapper(model.eval(), names, **fixed).eval()


# A wide initializer range: peaked attention, so a wrong mask or head order shows in the output
# (the default 0.02 gives near-uniform attention on tiny models).
INIT = 0.3
TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "vocab_size": VOCAB, "max_position_embeddings": 64,
        "initializer_range": INIT}


def _bert() -> Case:
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(**TEXT, attn_implementation="sdpa"), add_pooling_layer=False)
    return _text(wrap(model, ("input_ids", "attention_mask")), 2)


def _roberta() -> Case:
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(**{**TEXT, "max_position_embeddings": 72}, attn_implementation="sdpa")
    model = RobertaModel(config, add_pooling_layer=False)
    return _text(wrap(model, ("input_ids", "attention_mask")), 2)


def _distilbert() -> Case:
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                              max_position_embeddings=64, initializer_range=INIT,
                              attn_implementation="sdpa")
    return _text(wrap(DistilBertModel(config), ("input_ids", "attention_mask")), 2)


def _albert() -> Case:
    from transformers import AlbertConfig, AlbertModel

    config = AlbertConfig(**TEXT, embedding_size=16, attn_implementation="sdpa")
    model = AlbertModel(config, add_pooling_layer=False)
    return _text(wrap(model, ("input_ids", "attention_mask")), 2)


def _electra() -> Case:
    from transformers import ElectraConfig, ElectraModel

    config = ElectraConfig(**TEXT, embedding_size=16, attn_implementation="sdpa")
    return _text(wrap(ElectraModel(config), ("input_ids", "attention_mask")), 2)


def _deberta() -> Case:
    from transformers import DebertaV2Config, DebertaV2Model

    config = DebertaV2Config(**TEXT, relative_attention=True, position_buckets=16,
                             pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
                             attn_implementation="eager")
    return _text(wrap(DebertaV2Model(config), ("input_ids", "attention_mask")), 2)


def _gpt2() -> Case:
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        initializer_range=INIT, bos_token_id=0, eos_token_id=0,
                        attn_implementation="sdpa")
    return _text(wrap(GPT2Model(config), ("input_ids", "attention_mask"), use_cache=False), 2)


def _gpt_neox() -> Case:
    from transformers import GPTNeoXConfig, GPTNeoXModel

    config = GPTNeoXConfig(**TEXT, rotary_pct=0.5, attn_implementation="sdpa")
    return _text(wrap(GPTNeoXModel(config), ("input_ids", "attention_mask"), use_cache=False), 2)


DECODER = {**TEXT, "hidden_size": 64, "intermediate_size": 128, "num_key_value_heads": 2}


def _llama() -> Case:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(**DECODER, attn_implementation="sdpa")
    return _text(wrap(LlamaModel(config), ("input_ids", "attention_mask"), use_cache=False), 2)


def _mistral() -> Case:
    from transformers import MistralConfig, MistralModel

    config = MistralConfig(**DECODER, attn_implementation="sdpa")
    return _text(wrap(MistralModel(config), ("input_ids", "attention_mask"), use_cache=False), 2)


def _qwen2() -> Case:
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(**DECODER, attn_implementation="sdpa")
    return _text(wrap(Qwen2Model(config), ("input_ids", "attention_mask"), use_cache=False), 2)


def _phi() -> Case:
    from transformers import PhiConfig, PhiModel

    config = PhiConfig(**{**DECODER, "num_key_value_heads": 4}, partial_rotary_factor=0.5,
                       attn_implementation="sdpa")
    return _text(wrap(PhiModel(config), ("input_ids", "attention_mask"), use_cache=False), 2)


def _gptj() -> Case:
    """GPT-J: interleaved rotary embeddings (pairs 2i, 2i+1) on the first 8 features per head."""
    from transformers import GPTJConfig, GPTJModel

    config = GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        rotary_dim=4, initializer_range=INIT, attn_implementation="eager")
    return _text(wrap(GPTJModel(config), ("input_ids", "attention_mask"), use_cache=False), 2)


def _t5() -> Case:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, initializer_factor=3.0,
                      attn_implementation="eager")
    return _text(wrap(T5EncoderModel(config), ("input_ids", "attention_mask")), 2)


VISION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 64, "image_size": 32, "patch_size": 8, "initializer_range": INIT}


def _vit() -> Case:
    from transformers import ViTConfig, ViTModel

    model = ViTModel(ViTConfig(**VISION, attn_implementation="sdpa"), add_pooling_layer=False)
    return _image(wrap(model, ("pixel_values",)), 2, 32)


def _deit() -> Case:
    from transformers import DeiTConfig, DeiTModel

    model = DeiTModel(DeiTConfig(**VISION, attn_implementation="sdpa"), add_pooling_layer=False)
    return _image(wrap(model, ("pixel_values",)), 2, 32)


def _swin() -> Case:
    from transformers import SwinConfig, SwinModel

    config = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                        num_heads=[2, 4], window_size=4, initializer_range=INIT,
                        attn_implementation="eager")
    return _image(wrap(SwinModel(config, add_pooling_layer=False), ("pixel_values",)), 4, 32)


def _mobilevit() -> Case:
    from transformers import MobileViTConfig, MobileViTModel

    config = MobileViTConfig(image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[
        8, 8, 16, 16, 24, 24, 32], num_attention_heads=4, initializer_range=INIT,
        attn_implementation="eager")
    model = MobileViTModel(config, expand_output=False)
    return _image(wrap(model, ("pixel_values",)), 9, 64)


def _whisper() -> Case:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4,
                           encoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
                           init_std=INIT, attn_implementation="sdpa")
    frames = 2 * config.max_source_positions
    module = wrap(WhisperEncoder(config), ("input_features",))

    def feeds(batch: int, length: int, seed: int = 0) -> Feeds:
        del length
        rng = np.random.default_rng(seed)
        return {"input_features": rng.standard_normal((batch, 8, frames)).astype(np.float32)}

    return Case(module, (torch.randn(2, 8, frames),), ({0: "batch"},), 2, feeds,
                ("input_features",), fixed_seq=True)


def _wav2vec2() -> Case:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                            conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
                            do_stable_layer_norm=True, mask_time_prob=0.0,
                            initializer_range=INIT, attn_implementation="sdpa")
    module = wrap(Wav2Vec2Model(config), ("input_values", "attention_mask"))
    samples = 400

    def feeds(batch: int, length: int, seed: int = 0) -> Feeds:
        rng = np.random.default_rng(seed)
        n = length * 50
        return {"input_values": rng.standard_normal((batch, n)).astype(np.float32),
                "attention_mask": _mask(rng, batch, n)}

    dims = {0: "batch", 1: "samples"}
    args = (torch.randn(2, samples), torch.ones(2, samples, dtype=torch.int64))
    return Case(module, args, (dims, dims), 2, feeds, ("input_values", "attention_mask"))


def _convnext() -> Case:
    from transformers import ConvNextConfig, ConvNextModel

    config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32)
    return _image(wrap(ConvNextModel(config), ("pixel_values",)), 0, 32)


def _resnet() -> Case:
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8)
    return _image(wrap(ResNetModel(config), ("pixel_values",)), 0, 32)


# ------------------------------------------------------------------------- torch's own modules


class EncoderLayer(nn.Module):
    """`nn.TransformerEncoder` (2 layers) with a key padding mask (True = padding)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, src_key_padding_mask=mask == 0)


class MultiheadSelfAttention(nn.Module):
    """`nn.MultiheadAttention` (packed in-projection), no mask."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class DecoderLayer(nn.Module):
    """`nn.TransformerDecoderLayer`: causal self-attention, then cross-attention on a memory of
    another length (its packed in-projection split into query and key-value parts)."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.decoder(x, memory, tgt_is_causal=False)


class SDPA(nn.Module):
    """Q/K/V projections and `F.scaled_dot_product_attention`: no mask, causal, or a boolean
    key mask broadcast as attn_mask [B, 1, 1, T]."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, 4, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        if mask is not None:
            keep = (mask != 0)[:, None, None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.mode == "causal")
        return self.out(y.transpose(1, 2).reshape(b, s, 32))


def _torch_case(module: nn.Module, blocks: int, mask: bool) -> Case:
    x = torch.randn(2, 8, 32)
    dims = {0: "batch", 1: "seq"}

    def feeds(batch: int, length: int, seed: int = 0) -> Feeds:
        rng = np.random.default_rng(seed)
        out = {"x": rng.standard_normal((batch, length, 32)).astype(np.float32)}
        if mask:
            out["mask"] = _mask(rng, batch, length)
        return out

    if mask:
        return Case(module.eval(), (x, torch.ones(2, 8, dtype=torch.int64)), (dims, dims),
                    blocks, feeds, ("x", "mask"))
    return Case(module.eval(), (x,), (dims,), blocks, feeds, ("x",))


def _encoder_layer() -> Case:
    return _torch_case(EncoderLayer(), 2, True)


def _multihead() -> Case:
    return _torch_case(MultiheadSelfAttention(), 1, False)


def _decoder_layer() -> Case:
    def feeds(batch: int, length: int, seed: int = 0) -> Feeds:
        rng = np.random.default_rng(seed)
        return {"x": rng.standard_normal((batch, length, 32)).astype(np.float32),
                "memory": rng.standard_normal((batch, length + 3, 32)).astype(np.float32)}

    args = (torch.randn(2, 8, 32), torch.randn(2, 6, 32))
    dims = ({0: "batch", 1: "seq"}, {0: "batch", 1: "memory_seq"})
    return Case(DecoderLayer().eval(), args, dims, 2, feeds, ("x", "memory"))


def _sdpa(mode: str) -> Callable[[], Case]:
    return lambda: _torch_case(SDPA(mode), 1, mode == "mask")


HF_MODELS: dict[str, Callable[[], Case]] = {
    "bert": _bert, "roberta": _roberta, "distilbert": _distilbert, "albert": _albert,
    "electra": _electra, "deberta-v2": _deberta, "gpt2": _gpt2, "gpt-neox": _gpt_neox,
    "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "phi": _phi, "t5-encoder": _t5,
    "vit": _vit, "deit": _deit, "swin": _swin, "mobilevit": _mobilevit,
    "whisper-encoder": _whisper, "wav2vec2": _wav2vec2,
}
NO_ATTENTION: dict[str, Callable[[], Case]] = {"convnext": _convnext, "resnet": _resnet}
# beyond the list: interleaved rotary embeddings
EXTRA_MODELS: dict[str, Callable[[], Case]] = {"gptj": _gptj}
TORCH_MODELS: dict[str, Callable[[], Case]] = {
    "torch-encoder": _encoder_layer, "torch-decoder": _decoder_layer, "torch-mha": _multihead,
    "sdpa": _sdpa("none"),
    "sdpa-causal": _sdpa("causal"), "sdpa-mask": _sdpa("mask"),
}
ALL_MODELS = {**HF_MODELS, **NO_ATTENTION, **TORCH_MODELS, **EXTRA_MODELS}


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def build(name: str, seed: int = 0) -> Case:
    """The model `name` of `ALL_MODELS` with weights seeded by `seed`.

    Normalization scales are drawn from U(0.5, 1.5) and shifts from N(0, 0.1): Hugging Face
    initializes some of them near zero (MobileViT's BatchNorm scales), which makes deep tiny
    models output zeros.

    Raises:
        KeyError: an unknown name.
    """
    torch.manual_seed(seed)
    case = ALL_MODELS[name]()
    with torch.no_grad():
        for module in case.module.modules():
            if isinstance(module, _NORMS) and module.weight is not None:
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return case


def export(case: Case):  # noqa: ANN201 - an onnx_ir.Model (onnx_ir imported by the caller)
    """`slimgraph.from_torch` of the case with its dynamic shapes and input names."""
    from slimgraph.ir import from_torch

    return from_torch(case.module, case.args, dynamic_shapes=case.dynamic_shapes,
                      input_names=list(case.names))


_EXPORTS: dict[str, tuple[Case, bytes]] = {}


def exported(name: str):  # noqa: ANN201 - (Case, onnx_ir.Model)
    """(`build(name)`, its export), exported once per session; the model is a fresh copy on
    every call (tests may edit it)."""
    import onnx_ir as ir

    if name not in _EXPORTS:
        case = build(name)
        _EXPORTS[name] = (case, ir.to_proto(export(case)).SerializeToString())
    case, data = _EXPORTS[name]
    return case, ir.from_proto(_load(data))


def _load(data: bytes):  # noqa: ANN202
    import onnx

    return onnx.load_model_from_string(data)


_TRANSFORMER: dict[str, Any] = {}


def transformer_result(name: str):  # noqa: ANN201 - slimgraph's PipelineResult
    """The transformer preset (`run_pipeline(model, ["transformer"])`, verifier off, as
    `sg.optimize(model, preset="transformer", verify=False)` runs it) on the export of `name`,
    run once per session. Shared: read it, never edit its model (`fused` gives a copy)."""
    from slimgraph.passes.pipeline import run_pipeline

    if name not in _TRANSFORMER:
        _TRANSFORMER[name] = run_pipeline(exported(name)[1], ["transformer"], verify=False)
    return _TRANSFORMER[name]


def fused(name: str):  # noqa: ANN201 - an onnx_ir.Model
    """A fresh copy of the model of `transformer_result(name)` (tests may edit it)."""
    import onnx_ir as ir

    return ir.from_proto(_load(ir.to_proto(transformer_result(name).model).SerializeToString()))
