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


# Patch length -> colour (1: red, 2: orange, 3: yellow, 4: green, 5-6: cyan, 7+: blue): short patches on
# edges and detail read warm, long patches on flat regions cool.
PATCH_COLOURS = np.array([[220, 40, 40], [245, 140, 30], [240, 220, 40], [60, 190, 70], [40, 200, 220],
                          [40, 200, 220], [50, 90, 230]], dtype=np.float32)


def patch_map(images: np.ndarray | torch.Tensor, patch_start: np.ndarray | torch.Tensor, grid: int,
              alpha: float = 0.45) -> np.ndarray:
    """Images with their patches drawn over them: each token tinted by its patch's length, and a dark
    line where a patch starts (left edge) and along every grid row. uint8 [B, H, W, 3] -> same shape."""
    images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    starts = patch_start.cpu().numpy() if isinstance(patch_start, torch.Tensor) else np.asarray(patch_start)
    batch, height, width, _ = images.shape
    cell_h, cell_w = height // grid, width // grid
    ids = np.cumsum(starts, axis=1) - 1
    lengths = np.stack([np.bincount(row)[row] for row in ids])  # [B, N] length of each token's patch
    colours = PATCH_COLOURS[np.minimum(lengths, len(PATCH_COLOURS)) - 1].reshape(batch, grid, grid, 3)
    tint = colours.repeat(cell_h, axis=1).repeat(cell_w, axis=2)
    out = (1 - alpha) * images.astype(np.float32) + alpha * tint
    edges = starts.reshape(batch, grid, grid)
    for row in range(grid):
        out[:, row * cell_h, :] *= 0.3
        for col in range(grid):
            left = edges[:, row, col]
            out[left, row * cell_h:(row + 1) * cell_h, col * cell_w] *= 0.3
    return out.clip(0, 255).astype(np.uint8)
