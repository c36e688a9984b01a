"""Image loading and LlamaGen's augmentations in PIL + numpy (torchvision is not a dependency).

Views per image (``image_views``), in the order LlamaGen stores them:

* ``1``: ADM center crop at ``size``.
* ``2``: center crop, then its horizontal flip (LlamaGen's extraction without ``--ten-crop``).
* ``10``: ADM center crop at ``int(size * crop_range)``, then torchvision's ``TenCrop(size)``:
  top-left, top-right, bottom-left, bottom-right, center, then the same five crops of the
  horizontally flipped image. The flip is part of ten-crop; flipping again adds no new view.
* ``20``: the 10 views at ``crop_range`` followed by the 10 at ``crop_range=1.05``: LlamaGen's
  ``ten_crop`` and ``ten_crop_105`` code directories, which its training dataset draws from
  uniformly.

Everything is deterministic; :func:`random_crop_arr` takes an explicit ``numpy`` generator.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dpar.errors import UserError

VIEW_COUNTS = (1, 2, 10, 20)
SECOND_CROP_RANGE = 1.05
# Modes whose values do not fit 8 bits: PIL's convert("RGB") would clip them without a word.
_HIGH_DEPTH_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")


class ImageError(UserError):
    """An image file that cannot be read or turned into 8-bit RGB."""


def open_rgb(path: str | Path) -> Image.Image:
    """Read an image as 8-bit RGB.

    Grayscale, palette and CMYK images are converted; an alpha channel is dropped (as torchvision's
    ``ImageFolder`` loader does, so tokens match LlamaGen's). 16-bit and float images and
    unreadable files raise :class:`ImageError` naming the file.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image, name=str(path))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError) as error:
        raise ImageError(f"cannot read image {path}: {error}") from None


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    if image.mode in _HIGH_DEPTH_MODES:
        raise ImageError(f"{name} has {image.mode!r} pixels (16-bit or float); convert it to 8-bit RGB first")
    return image if image.mode == "RGB" else image.convert("RGB")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's center crop: box-halve while >= 2x the target, bicubic-resize the short side, crop."""
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def load_center_crop(path: str | Path, image_size: int) -> np.ndarray:
    """An image file -> uint8 ``[image_size, image_size, 3]``: RGB (:func:`open_rgb`), then
    :func:`center_crop_arr`, as the token store's one-view preprocessing. ``ImageError`` names a bad file."""
    return np.array(center_crop_arr(open_rgb(path), image_size))


def random_crop_arr(pil_image: Image.Image, image_size: int, rng: np.random.Generator,
                    min_crop_frac: float = 0.8, max_crop_frac: float = 1.0) -> Image.Image:
    """ADM's random crop (LlamaGen's VQ training augmentation): random short side, random offset."""
    short_min = math.ceil(image_size / max_crop_frac)
    short_max = math.ceil(image_size / min_crop_frac)
    short_side = int(rng.integers(short_min, short_max + 1))
    while min(pil_image.size) >= 2 * short_side:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = short_side / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = int(rng.integers(arr.shape[0] - image_size + 1))
    left = int(rng.integers(arr.shape[1] - image_size + 1))
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def hflip(arr: np.ndarray) -> np.ndarray:
    """Mirror ``[..., H, W, C]`` images left to right."""
    return np.ascontiguousarray(arr[..., ::-1, :])


def five_crop(arr: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision's FiveCrop on an ``[H, W, C]`` array: TL, TR, BL, BR, center (rounded half to even)."""
    height, width = arr.shape[:2]
    if size > height or size > width:
        raise UserError(f"crop size {size} is larger than the image ({height}x{width})")
    center_top = int(round((height - size) / 2.0))
    center_left = int(round((width - size) / 2.0))
    corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
               (center_top, center_left)]
    return [arr[top:top + size, left:left + size] for top, left in corners]


def ten_crop(pil_image: Image.Image, image_size: int, crop_range: float = 1.1) -> np.ndarray:
    """LlamaGen's ten-crop view set: ``uint8 [10, size, size, 3]``."""
    arr = np.asarray(center_crop_arr(pil_image, int(image_size * crop_range)))
    return np.stack(five_crop(arr, image_size) + five_crop(hflip(arr), image_size))


def center_view(views: int) -> int:
    """The index of the center crop among :func:`image_views`' ``views`` crops: 0 for 1 or 2 views, 4 (the
    center of the first ten-crop, at ``crop_range``) for 10 or 20."""
    return 0 if views <= 2 else 4


def image_views(pil_image: Image.Image, image_size: int, views: int = 20, crop_range: float = 1.1) -> np.ndarray:
    """The ``views`` augmented crops of one RGB image as ``uint8 [views, size, size, 3]`` (see module doc)."""
    if views not in VIEW_COUNTS:
        raise UserError(f"views must be one of {', '.join(map(str, VIEW_COUNTS))}; got {views}")
    if views <= 2:
        center = np.asarray(center_crop_arr(pil_image, image_size))[None]
        return center if views == 1 else np.concatenate([center, hflip(center)])
    crops = ten_crop(pil_image, image_size, crop_range)
    if views == 20:
        crops = np.concatenate([crops, ten_crop(pil_image, image_size, SECOND_CROP_RANGE)])
    return crops
