"""VQ tokenizer losses: reconstruction, codebook/commitment, optional LPIPS and PatchGAN terms.

The weights and defaults are LlamaGen's (``vq_train.py``). :class:`VQLoss` owns the discriminator,
and each of its two calls (generator step, discriminator step) is one ``forward``, so the whole
module can sit inside DDP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpar.validation import choice, ranged

from .lpips import LPIPS


@dataclass
class VQLossConfig:
    reconstruction_loss: str = choice("l2", ("l1", "l2"))
    reconstruction_weight: float = ranged(1.0, min=0)
    codebook_weight: float = ranged(1.0, min=0)
    perceptual_weight: float = ranged(1.0, min=0)
    lpips_weights: Optional[str] = None
    vgg16_weights: Optional[str] = None
    disc_start: Optional[int] = ranged(20000, min=0)
    disc_weight: float = ranged(0.5, min=0)
    disc_loss: str = choice("hinge", ("hinge", "vanilla", "non-saturating"))
    gen_loss: str = choice("hinge", ("hinge", "non-saturating"))
    disc_dim: int = ranged(64, min=1)
    disc_num_layers: int = ranged(3, min=1)
    disc_adaptive_weight: bool = False


class PatchGANDiscriminator(nn.Module):
    """pix2pix's N-layer PatchGAN: a real/fake logit per overlapping image patch (taming's names)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            next_width = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(width, next_width, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(next_width), nn.LeakyReLU(0.2)]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def discriminator_loss(kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        real, fake = F.relu(1.0 - logits_real).mean(), F.relu(1.0 + logits_fake).mean()
    elif kind == "vanilla":
        real, fake = F.softplus(-logits_real).mean(), F.softplus(logits_fake).mean()
    else:
        real = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
        fake = F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    return 0.5 * (real + fake)


def generator_adversarial_loss(kind: str, logits_fake: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        return -logits_fake.mean()
    return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))


class VQLoss(nn.Module):
    def __init__(self, config: VQLossConfig, perceptual: LPIPS | None = None):
        super().__init__()
        self.config = config
        self.perceptual = perceptual
        self.discriminator = (PatchGANDiscriminator(ndf=config.disc_dim, n_layers=config.disc_num_layers)
                              if config.disc_start is not None else None)

    def gan_weight(self, step: int) -> float:
        """The adversarial weight at ``step``: 0 before ``disc_start`` (the discriminator still runs, so
        DDP sees the same parameters used every step)."""
        return self.config.disc_weight if step >= self.config.disc_start else 0.0

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, codebook_losses=None,
                step: int = 0, last_layer: torch.Tensor | None = None, discriminator_step: bool = False):
        """Generator loss (default) or, with ``discriminator_step``, the discriminator's. Returns (loss, logs)."""
        if discriminator_step:
            return self._discriminator_step(inputs, reconstructions, step)
        cfg = self.config
        rec_loss = (F.l1_loss if cfg.reconstruction_loss == "l1" else F.mse_loss)(reconstructions, inputs)
        vq_loss, commit_loss, entropy_loss, _ = codebook_losses
        codebook_loss = cfg.codebook_weight * (vq_loss + commit_loss + entropy_loss)
        loss = cfg.reconstruction_weight * rec_loss + codebook_loss
        logs = {"rec_loss": rec_loss.detach(), "vq_loss": vq_loss.detach(), "commit_loss": commit_loss.detach()}
        if self.perceptual is not None:
            p_loss = self.perceptual(inputs, reconstructions).mean()
            loss = loss + cfg.perceptual_weight * p_loss
            logs["perceptual_loss"] = p_loss.detach()
        if self.discriminator is not None:
            adv_loss = generator_adversarial_loss(cfg.gen_loss, self.discriminator(reconstructions))
            weight = self.gan_weight(step)
            if cfg.disc_adaptive_weight and weight > 0:
                weight = weight * self._adaptive_weight(loss - codebook_loss, adv_loss, last_layer)
            loss = loss + weight * adv_loss
            logs["gen_adv_loss"] = adv_loss.detach()
        return loss, logs

    def _discriminator_step(self, inputs: torch.Tensor, reconstructions: torch.Tensor, step: int):
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        loss = self.gan_weight(step) * discriminator_loss(self.config.disc_loss, logits_real, logits_fake)
        return loss, {"disc_loss": loss.detach(), "logits_real": logits_real.detach().mean(),
                      "logits_fake": logits_fake.detach().mean()}

    @staticmethod
    def _adaptive_weight(nll_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """taming's balance: scale the GAN gradient at the decoder's last layer to the reconstruction's."""
        nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        adv_grad = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
        return (nll_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
