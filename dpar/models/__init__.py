"""Model zoo: LlamaGen GPT sizes (``GPT-*``) and DPAR sizes (``DGPT-*`` / ``DPAR-*``), built from one config."""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .attention import BACKENDS
from .dpar import DECODER_INJECTIONS, DPAR, DPAR_models, DPARArgs, PatchLayout
from .gpt import GPT, GPT_models, Transformer
from .layers import MODEL_TYPES, ModelArgs
from .rope import ROPE_MODES
from ..errors import UserError
from ..validation import MAX_IMAGE_SIZE, MAX_IMAGE_TOKENS, Key, choice, config_key, ranged

MODEL_NAMES = tuple(GPT_models) + tuple(DPAR_models)
# ModelConfig fields that configure DPAR's architecture (DPARArgs keyword arguments); a GPT-* keeps their defaults.
DPAR_OPTIONS = ("rope", "encoder_pooling_ffn", "decoder_injection", "n_enc_layer", "n_dec_layer")
# What DPAR had before encoder_pooling_ffn and decoder_injection became keys, and their defaults until they became
# the paper's text: what earlier runs' records hold, or mean where they lack the keys (ModelConfig.upgrade_record).
FORMER_DEFAULTS = {"encoder_pooling_ffn": True, "decoder_injection": "once"}


@dataclass
class ModelConfig:
    # GPT-B/L/XL/XXL (LlamaGen token-level baseline) or DGPT-B/L/XL/XXL (DPAR; DPAR-* also accepted).
    gpt_model: str = choice("DGPT-B", MODEL_NAMES)
    # c2i: class-conditional; uncond: no class (the entropy model).
    model_type: str = choice("c2i", MODEL_TYPES)
    # image side in pixels; the token grid is image_size // downsample_size on each side (at most 128 x 128).
    image_size: int = ranged(256, min=1, max=MAX_IMAGE_SIZE)
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
    # DPAR only: patch-encoder / patch-decoder blocks (null: the size's own, e.g. DGPT-B 1 / 3); paper Table 10
    # varies them at a fixed sum (E1D4, E2D3, E3D2, E4D1 for DGPT-L).
    n_enc_layer: int | None = ranged(None, min=1)
    n_dec_layer: int | None = ranged(None, min=1)
    # DPAR only: a SwiGLU FFN after the encoder's patch cross-attention (false: cross-attention only, as the
    # paper's Eq. 5 and BLT; true: this project's former default, with 2.5% more forward MACs than Table 8's).
    encoder_pooling_ffn: bool = False
    # DPAR only: the patch vector enters the decoder before "every_block", each with its own norm + linear (the
    # paper's section 3.2.4), or "once" (before its first block: the former default); "residual": the global
    # output is added as is before the first block (no norm, no linear): the global stream runs on into the decoder.
    decoder_injection: str = choice("every_block", DECODER_INJECTIONS)

    @staticmethod
    def upgrade_record(section: dict) -> dict:
        """A run's recorded ``model`` section as this version reads it (``dpar.config.read_section``): a DPAR
        record without ``encoder_pooling_ffn`` / ``decoder_injection`` was written before they were keys, when
        DPAR had a pooling FFN and one injection (:data:`FORMER_DEFAULTS`); a GPT-* records DPAR's options but
        does not use them, so where its record holds the former defaults they read as today's."""
        upgraded, name = dict(section), section.get("gpt_model")
        if isinstance(name, str) and is_dpar(name):
            return {**FORMER_DEFAULTS, **upgraded}
        if isinstance(name, str) and name in MODEL_NAMES:
            defaults = ModelConfig()
            upgraded.update({key: getattr(defaults, key) for key, value in FORMER_DEFAULTS.items()
                             if upgraded.get(key) == value})
        return upgraded

    def check(self, key: Key = config_key("model")) -> None:
        """The rules between fields (each field's own range or choices is declared above); ``key`` names a field
        as the user gave it (a config key or a flag). ``UserError``: the token grid must be whole and hold at
        most ``MAX_IMAGE_TOKENS`` (``dpar.validation``: what the caches of one image may take is bounded before
        any is allocated), DPAR's options are DPAR's only, and stochastic depth is the GPT's only."""
        if self.image_size % self.downsample_size:
            raise UserError(f"{key('image_size')} {self.image_size} is not a multiple of {key('downsample_size')} "
                            f"{self.downsample_size}")
        grid = self.image_size // self.downsample_size
        if grid * grid > MAX_IMAGE_TOKENS:
            raise UserError(f"{key('image_size')} {self.image_size} at {key('downsample_size')} "
                            f"{self.downsample_size} makes {grid} x {grid} = {grid * grid} tokens per image; at most "
                            f"{MAX_IMAGE_TOKENS} (a {math.isqrt(MAX_IMAGE_TOKENS)} x {math.isqrt(MAX_IMAGE_TOKENS)} "
                            "grid) are allowed")
        if is_dpar(self.gpt_model):
            if self.drop_path_rate > 0:
                raise UserError(f"{key('drop_path_rate')} {self.drop_path_rate} applies to GPT-* models only, not "
                                f"{self.gpt_model}: in DPAR's packed global stream a sample-wise drop would drop "
                                "the whole batch")
            return
        defaults = ModelConfig()
        changed = [name for name in DPAR_OPTIONS if getattr(self, name) != getattr(defaults, name)]
        if changed:
            raise UserError(f"{key(changed[0])} applies to DGPT-* models only, not {self.gpt_model}")


def is_dpar(name: str) -> bool:
    return name in DPAR_models


def unused_keys(config: ModelConfig) -> frozenset[str]:
    """The keys of a ``model`` section (a :class:`ModelConfig` or its DictConfig) that do not change what its
    ``gpt_model`` builds: DPAR's options for a GPT-*. A run's weights are compared with the model config they
    record without them (a GPT-*'s weights record the DPAR defaults of the version that wrote them; its
    ``config.yaml`` reads as today's, :meth:`ModelConfig.upgrade_record`)."""
    return frozenset() if is_dpar(config.gpt_model) else frozenset(DPAR_OPTIONS)


def create_model(config: ModelConfig) -> nn.Module:
    """Build the model a :class:`ModelConfig` describes (weights freshly initialised). Its rules are checked
    first (:meth:`ModelConfig.check`, already run for a config loaded by ``dpar.config``): ``UserError``."""
    assert config.gpt_model in MODEL_NAMES, config.gpt_model
    config.check()
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
    options = architecture(config)
    if is_dpar(config.gpt_model):
        return DPAR_models[config.gpt_model](attn_backend=config.attn_backend, **options, **kwargs)
    return GPT_models[config.gpt_model](**kwargs)


def architecture(config: ModelConfig) -> dict:
    """The DPAR architecture options a :class:`ModelConfig` sets (``DPARArgs`` keyword arguments; empty for a
    GPT, which :meth:`ModelConfig.check` allows none), shared by :func:`create_model` and ``dpar.flops.count``."""
    if not is_dpar(config.gpt_model):
        return {}
    options = {name: getattr(config, name) for name in DPAR_OPTIONS}
    return {name: value for name, value in options.items() if value is not None}


__all__ = ["DPAR", "DPARArgs", "DPAR_OPTIONS", "DPAR_models", "GPT", "GPT_models", "MODEL_NAMES", "ModelArgs",
           "ModelConfig", "PatchLayout", "Transformer", "architecture", "create_model", "is_dpar"]
