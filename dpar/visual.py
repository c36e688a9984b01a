"""Pictures: image grids as PNG (samples, reconstructions, patch maps)."""
from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

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


def save_png(picture: np.ndarray, path: str | Path, text: dict[str, str] | None = None) -> Path:
    """Write a uint8 [H, W, 3] array as PNG, atomically, with ``text`` as UTF-8 text chunks (iTXt)."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    with atomic_path(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG", pnginfo=info)
    return Path(path)


# Patch length -> colour (1: red, 2: orange, 3: yellow, 4: green, 5-6: cyan, 7+: blue): short patches on
# edges and detail read warm, long patches on flat regions cool.
PATCH_COLOURS = np.array([[220, 40, 40], [245, 140, 30], [240, 220, 40], [60, 190, 70], [40, 200, 220],
                          [40, 200, 220], [50, 90, 230]], dtype=np.float32)
PATCH_LEGEND = (("1", 0), ("2", 1), ("3", 2), ("4", 3), ("5-6", 4), ("7+", 6))  # label, row of PATCH_COLOURS
TEXT = (20, 20, 20)
MAX_LABEL = 64  # characters of a label drawn; a longer one is cut, ending in "..."


def drawable(text: str) -> str:
    """``text`` as every Pillow >= 10.0 draws it with its default font: one line of latin-1 of at most
    :data:`MAX_LABEL` characters. Pillow 10.0's default (bitmap) font encodes text as latin-1 and raises
    ``UnicodeEncodeError`` on anything else, and no Pillow measures or anchors text holding a line break: so
    control and line-break characters become spaces, the rest outside latin-1 "?" (the later default fonts
    draw most of them as empty boxes anyway)."""
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c if ord(c) < 256 else "?"
                   for c in str(text))
    return text if len(text) <= MAX_LABEL else text[:MAX_LABEL - 3] + "..."


class _Text:
    """Where every annotation is drawn, so that none can fail on what it writes: Pillow's default font, and
    text through :func:`drawable`."""

    def __init__(self):
        self.font = ImageFont.load_default()
        self._measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def length(self, text: str) -> int:
        return int(self._measure.textlength(drawable(text), font=self.font))

    def panel(self, height: int, width: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        panel = Image.new("RGB", (width, height), (255, 255, 255))
        return panel, ImageDraw.Draw(panel)

    def write(self, draw: ImageDraw.ImageDraw, left_middle: tuple[int, int], text: str) -> None:
        draw.text(left_middle, drawable(text), fill=TEXT, font=self.font, anchor="lm")


def with_row_labels(picture: np.ndarray, labels: list[str], row_height: int, pad: int = 2) -> np.ndarray:
    """A grid picture with a white margin on its left naming each row (e.g. its class): ``labels[r]`` is
    written beside grid row r of ``row_height`` pixels (an :func:`image_grid` row without its padding). Any
    text can be a label: what the font cannot draw is replaced (:func:`drawable`)."""
    text = _Text()
    panel, draw = text.panel(picture.shape[0], max((text.length(label) for label in labels), default=0) + 8)
    for row, label in enumerate(labels):
        text.write(draw, (4, pad + row * (row_height + pad) + row_height // 2), label)
    return np.concatenate([np.asarray(panel), picture], axis=1)


def with_patch_legend(picture: np.ndarray) -> np.ndarray:
    """A patch map with a strip below it giving the colour of each patch length (tokens per patch), as
    :func:`patch_map` tints them; a map narrower than the legend is padded white on the right."""
    text = _Text()
    title = "tokens per patch:"
    needed = 12 + text.length(title) + sum(24 + text.length(label) for label, _ in PATCH_LEGEND)
    width = max(picture.shape[1], needed)
    panel, draw = text.panel(20, width)
    text.write(draw, (4, 10), title)
    x = 8 + text.length(title)
    for label, row in PATCH_LEGEND:
        draw.rectangle((x, 4, x + 12, 16), fill=tuple(int(c) for c in PATCH_COLOURS[row]), outline=TEXT)
        text.write(draw, (x + 16, 10), label)
        x += 24 + text.length(label)
    padded = np.full((picture.shape[0], width, 3), 255, dtype=np.uint8)
    padded[:, :picture.shape[1]] = picture
    return np.concatenate([padded, np.asarray(panel)], axis=0)


def patch_map(images: np.ndarray | torch.Tensor, patch_start: np.ndarray | torch.Tensor, grid: int,
              alpha: float = 0.7) -> np.ndarray:
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
