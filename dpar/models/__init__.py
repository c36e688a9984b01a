"""Model zoo: LlamaGen GPT sizes (``GPT-*``) and DPAR sizes (``DGPT-*`` / ``DPAR-*``), built from one config."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .attention import BACKENDS
from .dpar import DPAR, DPAR_models, DPARArgs, PatchLayout
from .gpt import GPT, GPT_models, Transformer
from .layers import MODEL_TYPES, ModelArgs
from .rope import ROPE_MODES
from ..validation import choice, ranged

MODEL_NAMES = tuple(GPT_models) + tuple(DPAR_models)


@dataclass
class ModelConfig:
    # GPT-B/L/XL/XXL (LlamaGen token-level baseline) or DGPT-B/L/XL/XXL (DPAR; DPAR-* also accepted).
    gpt_model: str = choice("DGPT-B", MODEL_NAMES)
    # c2i: class-conditional; uncond: no class (the entropy model).
    model_type: str = choice("c2i", MODEL_TYPES)
    # image side in pixels; the token grid is image_size // downsample_size on each side.
    image_size: int = ranged(256, min=1)
    # VQ tokenizer downsampling factor (16 for LlamaGen's VQ-16).
    downsample_size: int = ranged(16, min=1)
    # VQ codebook size.
    vocab_size: int = ranged(16384, min=2)
    # number of classes (ImageNet: 1000); the null class for CFG comes on top.
    num_classes: int = ranged(1000, min=1)
    # probability of replacing the class by the null class in training (classifier-free guidance).
    class_dropout_prob: float = ranged(0.1, min=0, lt=1)
    # dropout on attention/FFN outputs (LlamaGen's resid_dropout_p and ffn_dropout_p).
    dropout_p: float = ranged(0.1, min=0, lt=1)
    # dropout on token and class embeddings.
    token_dropout_p: float = ranged(0.1, min=0, lt=1)
    # stochastic depth (GPT baseline only).
    drop_path_rate: float = ranged(0.0, min=0, lt=1)
    # DPAR only: Dynamic RoPE variant of the global transformer (paper Table 9).
    rope: str = choice("dynamic", ROPE_MODES)
    # DPAR only: packed attention backend of the global transformer (auto = fastest available).
    attn_backend: str = choice("auto", ("auto",) + BACKENDS)


def is_dpar(name: str) -> bool:
    return name in DPAR_models


def create_model(config: ModelConfig) -> nn.Module:
    """Build the model a :class:`ModelConfig` describes (weights freshly initialised)."""
    if config.gpt_model not in MODEL_NAMES:
        raise ValueError(f"unknown model.gpt_model {config.gpt_model!r}; valid: {', '.join(MODEL_NAMES)}")
    if config.image_size % config.downsample_size:
        raise ValueError(f"model.image_size {config.image_size} is not a multiple of "
                         f"model.downsample_size {config.downsample_size}")
    kwargs = dict(
        vocab_size=config.vocab_size,
        block_size=(config.image_size // config.downsample_size) ** 2,
        num_classes=config.num_classes,
        cls_token_num=1,
        model_type=config.model_type,
        class_dropout_prob=config.class_dropout_prob,
        resid_dropout_p=config.dropout_p,
        ffn_dropout_p=config.dropout_p,
        token_dropout_p=config.token_dropout_p,
        drop_path_rate=config.drop_path_rate,
    )
    if is_dpar(config.gpt_model):
        return DPAR_models[config.gpt_model](rope=config.rope, attn_backend=config.attn_backend, **kwargs)
    return GPT_models[config.gpt_model](**kwargs)


__all__ = ["DPAR", "DPARArgs", "DPAR_models", "GPT", "GPT_models", "MODEL_NAMES", "ModelArgs", "ModelConfig", "PatchLayout",
           "Transformer", "create_model", "is_dpar"]
