"""LlamaGen's VQ tokenizer (VQ-16, VQ-8): a conv encoder/decoder around an l2-normalised codebook.

Parameter names and shapes are LlamaGen's, so its released checkpoint loads strictly::

    vq = VQ_models["VQ-16"](codebook_size=16384, codebook_embed_dim=8)
    vq.load_state_dict(torch.load("vq_ds16_c2i.pt", weights_only=True)["model"], strict=True)

``ch``, ``num_res_blocks``, the channel multipliers and ``norm_groups`` are options so a tiny
tokenizer can train on a CPU; the defaults are LlamaGen's. On top of LlamaGen's methods
(``encode``, ``decode``, ``decode_code``), :meth:`VQModel.images_to_codes` and
:meth:`VQModel.codes_to_images` go straight between uint8 images and token ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from dpar.config import read_config_file, read_section
from dpar.errors import UserError
from dpar.experiment import CONFIG_FILE, build_for_weights, experiment_of
from dpar.validation import Key, choice, config_key, ranged

# LlamaGen keeps the last 65,536 code ids in a buffer to report codebook usage; the buffer is part of
# its checkpoints, so it stays part of ours.
USAGE_WINDOW = 65536


@dataclass
class VQArgs:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128
    num_res_blocks: int = 2
    norm_groups: int = 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (1x1 conv projections)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        q, k, v = (proj(normed).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with LlamaGen's asymmetric (right/bottom) zero padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attention: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.res = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attention)
    return level


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.res):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def _middle(channels: int, dropout: float, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, dropout, groups), AttnBlock(channels, groups),
                          ResnetBlock(channels, channels, dropout, groups)])


class Encoder(nn.Module):
    def __init__(self, args: VQArgs, in_channels: int = 3):
        super().__init__()
        ch, mult, groups = args.ch, args.encoder_ch_mult, args.norm_groups
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for i, m in enumerate(mult):
            last = i == len(mult) - 1
            blocks, attention = [], []
            for _ in range(args.num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * m, args.dropout_p, groups))
                block_in = ch * m
                if last:
                    attention.append(AttnBlock(block_in, groups))
            level = _level(blocks, attention)
            if not last:
                level.downsample = Downsample(block_in)
            self.conv_blocks.append(level)
        self.mid = _middle(block_in, args.dropout_p, groups)
        self.norm_out = nn.GroupNorm(groups, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, args.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, args: VQArgs, out_channels: int = 3):
        super().__init__()
        ch, mult, groups = args.ch, args.decoder_ch_mult, args.norm_groups
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(args.z_channels, block_in, 3, padding=1)
        self.mid = _middle(block_in, args.dropout_p, groups)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mult))):
            blocks, attention = [], []
            for _ in range(args.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * mult[i], args.dropout_p, groups))
                block_in = ch * mult[i]
                if i == len(mult) - 1:
                    attention.append(AttnBlock(block_in, groups))
            level = _level(blocks, attention)
            if i != 0:
                level.upsample = Upsample(block_in)
            self.conv_blocks.append(level)
        self.norm_out = nn.GroupNorm(groups, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight balances gradients at."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with a straight-through gradient; codes and inputs are l2-normalised."""

    def __init__(self, args: VQArgs):
        super().__init__()
        self.n_e, self.e_dim = args.codebook_size, args.codebook_embed_dim
        self.beta, self.entropy_loss_ratio = args.commit_loss_beta, args.entropy_loss_ratio
        self.l2_norm, self.show_usage = args.codebook_l2_norm, args.codebook_show_usage
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / self.n_e, 1.0 / self.n_e)
        if self.l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        if self.show_usage:
            # -1 marks an empty slot, so a fresh model does not count code 0 as used.
            self.register_buffer("codebook_used", torch.full((USAGE_WINDOW,), -1.0))

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1) if self.l2_norm else self.embedding.weight

    def forward(self, z: torch.Tensor):
        z = z.permute(0, 2, 3, 1).contiguous()  # [B, h, w, C]
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        flat = z.reshape(-1, self.e_dim)
        codebook = self.codebook()
        distances = (flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)
                     - 2 * flat @ codebook.t())
        indices = distances.argmin(dim=1)
        z_q = codebook[indices].view(z.shape)

        vq_loss = commit_loss = entropy_loss = None
        usage = 0.0
        if self.training:
            if self.show_usage:
                usage = self.record_usage(indices)
            vq_loss = F.mse_loss(z_q, z.detach())
            commit_loss = self.beta * F.mse_loss(z_q.detach(), z)
            entropy_loss = (self.entropy_loss_ratio * codebook_entropy_loss(-distances)
                            if self.entropy_loss_ratio > 0 else torch.zeros((), device=z.device))
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), (vq_loss, commit_loss, entropy_loss, usage), (None, None, indices)

    @torch.no_grad()
    def record_usage(self, indices: torch.Tensor) -> float:
        """Push ``indices`` into the usage window; return the fraction of the codebook seen in it."""
        window = self.codebook_used
        recent = indices[-len(window):].to(window.dtype)
        window.copy_(torch.cat([window[len(recent):], recent]))
        return float(torch.unique(window[window >= 0]).numel()) / self.n_e

    def get_codebook_entry(self, indices: torch.Tensor, shape=None, channel_first: bool = True) -> torch.Tensor:
        """Codes for ``indices``; ``shape`` is (B, C, h, w) if ``channel_first`` else (B, h, w, C)."""
        z_q = self.codebook()[indices]
        if shape is None:
            return z_q
        if channel_first:
            b, c, h, w = shape
            return z_q.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        return z_q.reshape(shape)


def codebook_entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """MaskGIT's codebook entropy loss: confident per-token assignments, diverse codes overall."""
    probs = F.softmax(affinity / temperature, dim=-1)
    log_probs = F.log_softmax(affinity / temperature + 1e-5, dim=-1)
    mean_probs = probs.mean(dim=0)
    diversity = -(mean_probs * torch.log(mean_probs + 1e-5)).sum()
    confidence = -(probs * log_probs).sum(dim=-1).mean()
    return confidence - diversity


class VQModel(nn.Module):
    def __init__(self, config: VQArgs):
        super().__init__()
        assert config.ch % config.norm_groups == 0 and config.z_channels % config.norm_groups == 0, \
            (config.ch, config.z_channels, config.norm_groups)  # a user's config: VQConfig.check
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def encode(self, x: torch.Tensor):
        """Images in [-1, 1], [B, 3, H, W] -> (quant, (vq, commit, entropy, usage), (None, None, indices))."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor, shape=None, channel_first: bool = True) -> torch.Tensor:
        return self.decode(self.quantize.get_codebook_entry(code_b, shape, channel_first))

    def forward(self, x: torch.Tensor):
        quant, losses, _ = self.encode(x)
        return self.decode(quant), losses

    @torch.no_grad()
    def images_to_codes(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, H, W, 3] -> token ids [B, h*w] in raster order."""
        _check_images(images, self.downsample)
        x = images.to(self.quant_conv.weight.device)
        _, _, (_, _, indices) = self.encode(uint8_to_unit(x))
        return indices.view(images.shape[0], -1)

    @torch.no_grad()
    def codes_to_images(self, codes: torch.Tensor, grid: int | tuple[int, int], size: int | None = None) -> torch.Tensor:
        """Token ids [B, h*w] -> uint8 images [B, H, W, 3]; ``grid`` is h (square) or (h, w).

        ``size`` resizes the decoder's float output (bicubic) before it is quantised, as LlamaGen's
        ``sample_c2i_ddp.py --image-size-eval`` does (384 px samples evaluated at 256 px)."""
        h, w = (grid, grid) if isinstance(grid, int) else grid
        if codes.dim() != 2 or codes.shape[1] != h * w:
            raise UserError(f"codes must have shape [B, {h * w}] for a {h}x{w} grid, got {list(codes.shape)}")
        if codes.min() < 0 or codes.max() >= self.config.codebook_size:
            raise UserError(f"codes must lie in [0, {self.config.codebook_size}), "
                            f"got [{int(codes.min())}, {int(codes.max())}]")
        codes = codes.to(self.quant_conv.weight.device)
        pixels = self.decode_code(codes, (codes.shape[0], self.config.codebook_embed_dim, h, w))
        if size is not None and size != pixels.shape[-1]:
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic")
        return unit_to_uint8(pixels)


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1], as ToTensor + Normalize(0.5, 0.5) compute it."""
    return (images.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def unit_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], rounding as LlamaGen's and ADM's samplers do."""
    return (127.5 * pixels.float() + 128.0).clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8)


def _check_images(images: torch.Tensor, downsample: int) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise UserError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {list(images.shape)}")
    if images.shape[1] % downsample or images.shape[2] % downsample:
        raise UserError(f"image size {images.shape[1]}x{images.shape[2]} is not a multiple of the tokenizer's "
                        f"downsampling factor {downsample}")


CHANNEL_MULTIPLIERS = {"VQ-16": [1, 1, 2, 2, 4], "VQ-8": [1, 2, 2, 4]}


def VQ_8(**kwargs) -> VQModel:
    kwargs.setdefault("encoder_ch_mult", list(CHANNEL_MULTIPLIERS["VQ-8"]))
    kwargs.setdefault("decoder_ch_mult", list(CHANNEL_MULTIPLIERS["VQ-8"]))
    return VQModel(VQArgs(**kwargs))


def VQ_16(**kwargs) -> VQModel:
    return VQModel(VQArgs(**kwargs))


VQ_models = {"VQ-16": VQ_16, "VQ-8": VQ_8}


@dataclass
class VQConfig:
    """The tokenizer section of a config (``model:`` in ``configs/tokenizer/*.yaml``)."""
    vq_model: str = choice("VQ-16", tuple(VQ_models))
    codebook_size: int = ranged(16384, min=2)
    codebook_embed_dim: int = ranged(8, min=1)
    ch: int = ranged(128, min=1)
    ch_mult: Optional[list[int]] = ranged(None, min=1)
    z_channels: int = ranged(256, min=1)
    num_res_blocks: int = ranged(2, min=1)
    norm_groups: int = ranged(32, min=1)
    dropout_p: float = ranged(0.0, min=0, lt=1)
    commit_loss_beta: float = ranged(0.25, min=0)
    entropy_loss_ratio: float = ranged(0.0, min=0)

    def check(self, key: Key = config_key("model")) -> None:
        """The rule between fields: GroupNorm splits the widths into ``norm_groups`` groups. ``UserError``."""
        if self.ch % self.norm_groups or self.z_channels % self.norm_groups:
            raise UserError(f"VQ width {key('ch')}={self.ch} and {key('z_channels')}={self.z_channels} must be "
                            f"multiples of {key('norm_groups')}={self.norm_groups}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult or CHANNEL_MULTIPLIERS[self.vq_model]) - 1)


def create_vq(config: VQConfig) -> VQModel:
    """The tokenizer a :class:`VQConfig` describes (weights freshly initialised); its ``check`` runs first."""
    config.check()
    kwargs = {name: getattr(config, name) for name in ("codebook_size", "codebook_embed_dim", "ch", "z_channels",
                                                       "num_res_blocks", "norm_groups", "dropout_p",
                                                       "commit_loss_beta", "entropy_loss_ratio")}
    if config.ch_mult is not None:
        kwargs["encoder_ch_mult"] = kwargs["decoder_ch_mult"] = list(config.ch_mult)
    return VQ_models[config.vq_model](**kwargs)


def load_vq(checkpoint: str | Path, config: VQConfig | None = None) -> VQModel:
    """A tokenizer in eval mode from LlamaGen's ``.pt`` or this project's ``model.safetensors``.

    Without ``config``, a checkpoint inside an experiment dir takes the ``model`` section of that
    run's ``config.yaml``; anything else is LlamaGen's VQ-16 (codebook 16384, dim 8). The shapes are compared
    before anything is allocated (:func:`dpar.experiment.build_for_weights`): ``UserError`` naming the run's
    config key that does not describe the weights.
    """
    checkpoint, config_path = Path(checkpoint), None
    if config is None:
        experiment = experiment_of(checkpoint)
        run_config = experiment / CONFIG_FILE if experiment else None
        section = read_config_file(run_config).get("model") if run_config and run_config.is_file() else None
        if isinstance(section, DictConfig) and "gpt_model" in section:
            raise UserError(f"{checkpoint} is a {section.gpt_model} run's checkpoint, not a tokenizer's")
        config_path = run_config if run_config and run_config.is_file() else None
        config = read_section(config_path, "model", VQConfig) if config_path else VQConfig()
    return build_for_weights(create_vq, config, checkpoint, config_path).eval()  # shapes first, on meta
