"""Image folders: the ImageNet layout (one subfolder per class) or a flat folder of images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dpar.errors import UserError
from .transforms import open_rgb, random_crop_arr

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def scan_image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, class names), sorted as torchvision's ImageFolder sorts them.

    With class subfolders, labels index the sorted subfolder names; a flat folder is one class ``""``.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        paths = _images_under(root)
        if not paths:
            raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}; expected class subfolders "
                            "(root/<class>/<image>) or images directly in root")
        return paths, [0] * len(paths), [""]
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise UserError(f"{root} has class subfolders and also images directly inside (e.g. {loose[0].name}); "
                        "put every image in its class folder")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = _images_under(root / name)
        if not found:
            raise UserError(f"class folder {root / name} has no images ({', '.join(IMAGE_SUFFIXES)})")
        paths += found
        labels += [label] * len(found)
    return paths, labels, classes


def read_image_list(path: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """A list file of ``<image path> <integer label>`` lines (paths relative to the file's folder)."""
    path = Path(path)
    paths, labels = [], []
    try:
        text = path.read_text()
    except UnicodeDecodeError:  # an image, an .npz, weights...: not a list file
        raise UserError(f"{path} is neither an image folder nor a '<image path> <label>' list file (not text)") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, label = line.rstrip().rpartition(" ")
        if not name or not label.lstrip("-").isdigit() or int(label) < 0:
            raise UserError(f"{path}:{number}: expected '<image path> <label >= 0>', got {line.strip()!r}")
        paths.append(path.parent / name.strip())
        labels.append(int(label))
    if not paths:
        raise UserError(f"{path} lists no images")
    return paths, labels, [str(i) for i in range(max(labels) + 1)]


def list_images(data_path: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """An ImageFolder directory or a list file."""
    data_path = Path(data_path)
    return read_image_list(data_path) if data_path.is_file() else scan_image_folder(data_path)


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class RandomCropImages(Dataset):
    """LlamaGen's VQ training augmentation (random crop 0.8-1.0, horizontal flip) as uint8 [H, W, 3].

    The crop of image ``i`` in epoch ``e`` depends only on (seed, e, i): the same with any number of
    workers or processes, and again after a resume.
    """

    def __init__(self, paths: list[Path], image_size: int, seed: int = 0):
        self.paths, self.image_size, self.seed, self.epoch = paths, image_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        crop = np.asarray(random_crop_arr(open_rgb(self.paths[index]), self.image_size, rng))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return torch.from_numpy(np.array(crop))


class EpochPermutation(Sampler[int]):
    """A shuffled order that is a function of (seed, epoch) alone, so a resumed run sees the same order."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return iter(epoch_order(self.size, self.seed, self.epoch))


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of ``size`` items in ``epoch``: a function of (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator).tolist()
