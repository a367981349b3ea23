"""Hugging Face architectures from tiny configs (seeded random weights, nothing downloaded), for
the torch backend's op-coverage and lowering tests.

`ZOO` maps a name to a builder returning a `ZooCase`: the torch module (eval mode), example
inputs, the `dynamic_shapes` it is exported with and `feeds(batch, seq, seed)`, inputs at other
sizes (a padded row where the model takes an attention mask). `export(name)` exports each model
once per session with `slimgraph.from_torch` and returns a fresh copy.

Sizes: 2 layers, hidden 32-64, 4 heads (2 KV heads where the architecture has grouped-query
attention). Attention is transformers' default "sdpa" except for T5, Swin and MobileViT
(eager: the exporter or the architecture has no sdpa path).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from slimgraph.ir import from_torch

__all__ = ["ZooCase", "ZOO", "TEXT_MODELS", "build", "export"]

VOCAB = 100
Feeds = dict[str, np.ndarray]


@dataclasses.dataclass
class ZooCase:
    """One model: module, example args, per-argument dynamic axes, feeds at any size."""

    module: nn.Module
    args: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple[dict[int, str], ...]
    feeds: Callable[[int, int, int], Feeds]


def _keep_mask(rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
    """int64 [batch, seq]: row 0 full, row 1 half padded (at the end), the others random."""
    mask = np.ones((batch, seq), np.int64)
    for row in range(1, batch):
        keep = max(1, seq // 2) if row == 1 else int(rng.integers(1, seq + 1))
        mask[row, keep:] = 0
    return mask


class _Text(nn.Module):
    """(input_ids, attention_mask) -> the model's first output (fixed arity for the exporter)."""

    def __init__(self, model: nn.Module, **fixed: Any) -> None:
        super().__init__()
        self.model, self.fixed = model.eval(), fixed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self.fixed)[0]


class _One(nn.Module):
    """One named input -> the model's first output."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model, self.name = model.eval(), name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.name: x})[0]


def _text(model: nn.Module, **fixed: Any) -> ZooCase:
    dims = {0: "batch", 1: "seq"}
    args = (torch.randint(0, VOCAB, (2, 8)), torch.ones(2, 8, dtype=torch.int64))

    def feeds(batch: int, seq: int, seed: int = 0) -> Feeds:
        rng = np.random.default_rng(seed)
        return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
                "attention_mask": _keep_mask(rng, batch, seq)}

    return ZooCase(_Text(model, **fixed).eval(), args, (dims, dims), feeds)


def _floats(model: nn.Module, name: str, shape: tuple[int, ...]) -> ZooCase:
    def feeds(batch: int, seq: int, seed: int = 0) -> Feeds:
        del seq
        rng = np.random.default_rng(seed)
        return {"x": rng.standard_normal((batch, *shape)).astype(np.float32)}

    return ZooCase(_One(model, name).eval(), (torch.randn(2, *shape),), ({0: "batch"},), feeds)


TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "vocab_size": VOCAB, "max_position_embeddings": 64}
DECODER = {**TEXT, "hidden_size": 64, "intermediate_size": 128, "num_key_value_heads": 2}
VISION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 64, "image_size": 32, "patch_size": 8}


def _bert() -> ZooCase:
    from transformers import BertConfig, BertModel

    return _text(BertModel(BertConfig(**TEXT), add_pooling_layer=False))


def _roberta() -> ZooCase:
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(**{**TEXT, "max_position_embeddings": 72})
    return _text(RobertaModel(config, add_pooling_layer=False))


def _distilbert() -> ZooCase:
    from transformers import DistilBertConfig, DistilBertModel

    return _text(DistilBertModel(DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
        max_position_embeddings=64)))


def _albert() -> ZooCase:
    from transformers import AlbertConfig, AlbertModel

    return _text(AlbertModel(AlbertConfig(**TEXT, embedding_size=16), add_pooling_layer=False))


def _electra() -> ZooCase:
    from transformers import ElectraConfig, ElectraModel

    return _text(ElectraModel(ElectraConfig(**TEXT, embedding_size=16)))


def _deberta() -> ZooCase:
    from transformers import DebertaV2Config, DebertaV2Model

    return _text(DebertaV2Model(DebertaV2Config(
        **TEXT, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"],
        max_relative_positions=-1)))


def _gpt2() -> ZooCase:
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return _text(GPT2Model(config), use_cache=False)


def _gpt_neox() -> ZooCase:
    from transformers import GPTNeoXConfig, GPTNeoXModel

    return _text(GPTNeoXModel(GPTNeoXConfig(**TEXT, rotary_pct=0.5)), use_cache=False)


def _llama() -> ZooCase:
    from transformers import LlamaConfig, LlamaModel

    return _text(LlamaModel(LlamaConfig(**DECODER)), use_cache=False)


def _mistral() -> ZooCase:
    from transformers import MistralConfig, MistralModel

    return _text(MistralModel(MistralConfig(**DECODER)), use_cache=False)


def _qwen2() -> ZooCase:
    from transformers import Qwen2Config, Qwen2Model

    return _text(Qwen2Model(Qwen2Config(**DECODER)), use_cache=False)


def _phi() -> ZooCase:
    from transformers import PhiConfig, PhiModel

    config = PhiConfig(**{**DECODER, "num_key_value_heads": 4}, partial_rotary_factor=0.5)
    return _text(PhiModel(config), use_cache=False)


def _t5() -> ZooCase:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, attn_implementation="eager")
    return _text(T5EncoderModel(config))


def _vit() -> ZooCase:
    from transformers import ViTConfig, ViTModel

    return _floats(ViTModel(ViTConfig(**VISION), add_pooling_layer=False), "pixel_values",
                   (3, 32, 32))


def _deit() -> ZooCase:
    from transformers import DeiTConfig, DeiTModel

    return _floats(DeiTModel(DeiTConfig(**VISION), add_pooling_layer=False), "pixel_values",
                   (3, 32, 32))


def _swin() -> ZooCase:
    from transformers import SwinConfig, SwinModel

    config = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                        num_heads=[2, 4], window_size=4, attn_implementation="eager")
    return _floats(SwinModel(config, add_pooling_layer=False), "pixel_values", (3, 32, 32))


def _mobilevit() -> ZooCase:
    from transformers import MobileViTConfig, MobileViTModel

    config = MobileViTConfig(image_size=64, hidden_sizes=[16, 24, 32],
                             neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
                             num_attention_heads=4, attn_implementation="eager")
    return _floats(MobileViTModel(config, expand_output=False), "pixel_values", (3, 64, 64))


def _whisper() -> ZooCase:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4,
                           encoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16)
    return _floats(WhisperEncoder(config), "input_features", (8, 32))


def _wav2vec2() -> ZooCase:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                            conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
                            do_stable_layer_norm=True, mask_time_prob=0.0)
    dims = {0: "batch", 1: "samples"}
    args = (torch.randn(2, 400), torch.ones(2, 400, dtype=torch.int64))

    class _Audio(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Wav2Vec2Model(config).eval()

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_values=x, attention_mask=attention_mask)[0]

    def feeds(batch: int, seq: int, seed: int = 0) -> Feeds:
        rng = np.random.default_rng(seed)
        n = seq * 50
        return {"x": rng.standard_normal((batch, n)).astype(np.float32),
                "attention_mask": _keep_mask(rng, batch, n)}

    return ZooCase(_Audio().eval(), args, (dims, dims), feeds)


def _convnext() -> ZooCase:
    from transformers import ConvNextConfig, ConvNextModel

    config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32)
    return _floats(ConvNextModel(config), "pixel_values", (3, 32, 32))


def _resnet() -> ZooCase:
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8)
    return _floats(ResNetModel(config), "pixel_values", (3, 32, 32))


ZOO: dict[str, Callable[[], ZooCase]] = {
    "bert": _bert, "roberta": _roberta, "distilbert": _distilbert, "albert": _albert,
    "electra": _electra, "deberta-v2": _deberta, "gpt2": _gpt2, "gpt-neox": _gpt_neox,
    "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "phi": _phi, "t5-encoder": _t5,
    "vit": _vit, "deit": _deit, "swin": _swin, "mobilevit": _mobilevit,
    "whisper-encoder": _whisper, "wav2vec2": _wav2vec2, "convnext": _convnext,
    "resnet": _resnet,
}
TEXT_MODELS = ("bert", "roberta", "distilbert", "albert", "electra", "deberta-v2", "gpt2",
               "gpt-neox", "llama", "mistral", "qwen2", "phi", "t5-encoder")

_CACHE: dict[str, tuple[onnx.ModelProto, ZooCase]] = {}


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def build(name: str, seed: int = 0) -> ZooCase:
    """The model `name` of `ZOO`, weights seeded by `seed` (KeyError for an unknown name).

    Normalization scales are drawn from U(0.5, 1.5) and shifts from N(0, 0.1): Hugging Face
    initializes some of them near zero (MobileViT's BatchNorm scales), which makes deep tiny
    models output zeros."""
    torch.manual_seed(seed)
    case = ZOO[name]()
    with torch.no_grad():
        for module in case.module.modules():
            if isinstance(module, _NORMS) and module.weight is not None:
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return case


def export(name: str) -> tuple[ir.Model, ZooCase]:
    """`name` exported by `slimgraph.from_torch` (once per session; a fresh copy each call)."""
    if name not in _CACHE:
        case = build(name)
        model = from_torch(case.module, case.args, dynamic_shapes=case.dynamic_shapes)
        _CACHE[name] = (ir.to_proto(model), case)
    proto, case = _CACHE[name]
    return ir.from_proto(proto), case
