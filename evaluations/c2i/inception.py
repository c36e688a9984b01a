"""The FID Inception-v3: the 2015 TensorFlow graph (``classify_image_graph_def.pb``) that ADM's evaluator runs.

The architecture is torchvision's Inception-v3 with the changes pytorch-fid documents for this graph:
average pooling that ignores padding in the A, C and first E blocks, max pooling in the last E block,
and a 1008-way classifier. Parameter names follow torchvision / pytorch-fid, so the widely mirrored
``pt_inception-2015-12-05-6726825d.pth`` loads as it is. Nothing is downloaded.

Input handling follows the TF graph itself: uint8-range images are resized to 299x299 with TF1's
bilinear resize (no half-pixel offset) and mapped to [-1, 1] by ``(x - 128) / 128``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpar.errors import UserError, first_line

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_HINT = (f"the FID Inception weights {WEIGHTS_FILE} (pytorch-fid's release 'fid_weights', "
                "github.com/mseitzer/pytorch-fid/releases); pass their path with --inception-weights")


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 0.001), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([self.branch1x1(x), seven, double, self.branch_pool(_avg_pool(x))], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven,
                          F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """The 8x8 blocks; the graph pools with an average in the first and a max in the second."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(three), self.branch3x3_2b(three),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], dim=1)


def tf_resize_bilinear(x: Tensor, size: int) -> Tensor:
    """TF1 ``ResizeBilinear`` (align_corners=False, no half-pixel centres): source = target * in / out."""
    def axis(length: int, device) -> tuple[Tensor, Tensor, Tensor]:
        source = torch.arange(size, device=device, dtype=torch.float64) * (length / size)
        low = source.floor().long().clamp(max=length - 1)
        return low, (low + 1).clamp(max=length - 1), (source - low).to(x.dtype)

    top, bottom, dy = axis(x.shape[2], x.device)
    left, right, dx = axis(x.shape[3], x.device)
    rows = x[:, :, top] + (x[:, :, bottom] - x[:, :, top]) * dy[:, None]
    return rows[..., left] + (rows[..., right] - rows[..., left]) * dx


class FIDInceptionV3(nn.Module):
    """uint8-range images -> (pool_3 [N, 2048], mixed_6/conv [N, 17, 17, 192], logits [N, 1008])."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    @classmethod
    def from_file(cls, path: str | Path | None) -> FIDInceptionV3:
        """The network with the FID weights at ``path`` (eval mode)."""
        if path is None or not Path(path).is_file():
            raise UserError(f"Inception weights not found{f' at {path}' if path else ''}: the evaluator needs "
                            + WEIGHTS_HINT)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or foreign file; say which
            raise UserError(f"cannot read {path} as {WEIGHTS_FILE} ({type(error).__name__}: {first_line(error)})") \
                from None
        model = cls()
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise UserError(f"{path} is not {WEIGHTS_FILE}: it holds no state dict of tensors")
        own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        given = {k for k in state if not k.endswith("num_batches_tracked")}
        if set(own) != given:
            missing, unexpected = sorted(set(own) - given), sorted(given - set(own))
            raise UserError(f"{path} is not {WEIGHTS_FILE}: {len(missing)} missing keys"
                            f"{f' (first {missing[0]!r})' if missing else ''}, {len(unexpected)} unexpected"
                            f"{f' (first {unexpected[0]!r})' if unexpected else ''}")
        misshapen = [k for k, v in own.items() if state[k].shape != v.shape]
        if misshapen:
            k = misshapen[0]
            raise UserError(f"{path} is not {WEIGHTS_FILE}: {len(misshapen)} tensors of other shapes (first {k!r}: "
                            f"{list(state[k].shape)} in the file, {list(own[k].shape)} expected)")
        model.load_state_dict(state, strict=False)
        return model.eval()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``images``: float [N, 3, H, W] with values in [0, 255]."""
        x = images if images.shape[-2:] == (299, 299) else tf_resize_bilinear(images, 299)
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6c(self.Mixed_6b(x))
        spatial = self.Mixed_6d.branch1x1(x)  # the graph's mixed_6/conv: 1x1 branch of the fourth 17x17 block
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))
        pool = x.mean(dim=(2, 3))
        # ADM takes the graph's softmax/logits/MatMul: the weights only, no bias
        logits = pool @ self.fc.weight.t()
        return pool, spatial.permute(0, 2, 3, 1), logits
