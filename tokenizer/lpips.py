"""LPIPS (VGG16) perceptual distance, with weights the user supplies by path; nothing downloads.

Two files make the metric, both widely mirrored:

* the LPIPS linear heads, ``vgg.pth`` (taming-transformers / LlamaGen's ``tokenizer/tokenizer_image/cache``),
  keys ``lin{0..4}.model.1.weight``; if it also carries the VGG trunk (``net.slice{k}.{i}.*``) that is used;
* otherwise torchvision's ImageNet VGG16, ``vgg16-397923af.pth``, keys ``features.{i}.*``.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from dpar.errors import UserError
from dpar.experiment import read_state_dict

# torchvision's vgg16().features: conv widths, "M" for max-pool.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# Indices in ``features`` after the ReLUs LPIPS reads: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_TAPS = (3, 8, 15, 22, 29)
_CHANNELS = (64, 128, 256, 512, 512)


def vgg16_features() -> nn.Sequential:
    layers, in_ch = [], 3
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_ch, item, 3, padding=1), nn.ReLU(inplace=False)]
            in_ch = item
    return nn.Sequential(*layers)


class LinearHead(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """d(x, y) for images in [-1, 1]: channel-normalised VGG features, squared difference, learned weights."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = vgg16_features()
        self.lins = nn.ModuleList(LinearHead(c) for c in _CHANNELS)

    @classmethod
    def from_files(cls, lpips_weights: str | Path, vgg16_weights: str | Path | None = None) -> "LPIPS":
        """A frozen, eval-mode LPIPS built from the two weight files (see module doc)."""
        model = cls()
        heads = read_state_dict(lpips_weights)
        state = {}
        for key, tensor in heads.items():
            if match := re.fullmatch(r"lin(\d)\.model\.1\.weight", key):
                state[f"lins.{match.group(1)}.model.1.weight"] = tensor
            elif match := re.fullmatch(r"net\.slice\d\.(\d+)\.(weight|bias)", key):
                state[f"features.{match.group(1)}.{match.group(2)}"] = tensor
        if not any(k.startswith("features.") for k in state):
            if vgg16_weights is None:
                raise UserError(f"{lpips_weights} has no VGG16 trunk; also pass torchvision's VGG16 weights "
                                "(vgg16-397923af.pth) as loss.vgg16_weights")
            state.update({k: v for k, v in read_state_dict(vgg16_weights).items() if k.startswith("features.")})
        missing = sorted(set(model.state_dict()) - set(state))
        if missing:
            raise UserError(f"LPIPS weights are incomplete: {len(missing)} tensors missing (first {missing[0]!r})")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise UserError(f"LPIPS weights do not fit: {str(error).splitlines()[-1].strip()}") from None
        return model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "LPIPS":
        """Always in eval mode: a frozen metric (LlamaGen's trainer re-enables its dropout by accident)."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance, shape [B, 1, 1, 1]."""
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total, head = 0.0, 0
        for i, layer in enumerate(self.features[:_TAPS[-1] + 1]):
            h = layer(h)
            if i in _TAPS:
                fx, fy = _unit_channels(h).chunk(2)
                total = total + self.lins[head].model((fx - fy).pow(2)).mean(dim=(2, 3), keepdim=True)
                head += 1
        return total


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
