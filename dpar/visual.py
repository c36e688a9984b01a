"""Pictures: image grids as PNG (samples, reconstructions, patch maps)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .fileio import atomic_path


def image_grid(images: np.ndarray | torch.Tensor, nrow: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 [rows*(H+pad)+pad, nrow*(W+pad)+pad, 3] picture, row-major."""
    images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 [H, W, 3] array as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    return Path(path)
