r"""Build an ADM-format reference batch from your own images, for the evaluator (FID, sFID, precision, recall).

    python -m evaluations.c2i.reference_batch data/my_images data/my_images_256.npz --image-size 256
    python -m evaluations.c2i.reference_batch data/my_images data/my_images_256.npz --image-size 256 \
        --statistics --inception-weights pretrained_models/pt_inception-2015-12-05-6726825d.pth
    python -m evaluations.c2i.evaluator data/my_images_256.npz samples/<sample name>.npz --inception-weights ...
    python -m evaluations.c2i.reference_batch data/heldout data/heldout_ref.npz --statistics \
        --features runs/classifier/classifier.safetensors     # a classifier's features (evaluations.c2i.classifier)

What ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz``) hold: ``arr_0`` uint8 ``[N, H, W, 3]``,
up to ``--max-images`` (ADM: 10,000) images drawn at random (``--seed``) from the folder, each prepared as ADM
and LlamaGen prepare ImageNet (RGB, then ADM's ``center_crop_arr``: box-halve while the short side is at
least twice the size, bicubic resize of the short side, center crop; ``tokenizer.transforms``, the token
store's own crop); ``arr_1`` their int64 labels when the folder has class subfolders (the sorted subfolder
names, as ``ImageFolder`` and ``preprocess_tokens.py`` number them); with ``--statistics``, the Inception
statistics ``mu``, ``sigma`` (pool_3) and ``mu_s``, ``sigma_s`` (spatial) over **every** image of the folder
("statistics over the whole dataset", as ADM's), computed by the evaluator's own code
(``evaluator.compute_features``) in blocks of 10,000 images whose means and covariances are pooled exactly,
so that memory stays bounded. The evaluator then takes FID and sFID from these statistics and precision and
recall from ``arr_0``. ``--features`` chooses the network of the statistics as the evaluator's flag does
(``inception``, or a classifier's ``.safetensors``, whose image size is then the default ``--image-size``).
``dpar_reference`` (JSON) records how the file was made, and with statistics which features they are of
(network and weights' sha256: the evaluator refuses to compare them with other features).

The folder is an ImageFolder (``<class>/<image>``), a flat folder of images or a ``<path> <label>`` list file
(``tokenizer.images.list_images``). An image that cannot be read is skipped and counted (printed, and listed
in the record), as ``preprocess_tokens.py`` does; a folder without images, or with fewer than 2 readable ones,
is refused in one line, and so is an existing output (delete it first).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from dpar.errors import ArgumentParser, UserError, run_main
from dpar.fileio import atomic_path, check_output_file
from dpar.validation import MAX_IMAGE_SIZE, device, number
from tokenizer.images import list_images
from tokenizer.transforms import ImageError, center_crop_arr, open_rgb

from .evaluator import INCEPTION, REFERENCE_RECORD, Features, compute_features, features_flag, load_features

ADM_IMAGES = 10_000       # ADM's reference batches: 10,000 images for precision and recall
STATISTICS_BLOCK = 10_000  # images whose Inception features are held at once (about 20 KB each)
RECORD_KEY = REFERENCE_RECORD


def build(data_path: str | Path, out: str | Path, image_size: int, max_images: int = ADM_IMAGES, seed: int = 0,
          network: nn.Module | None = None, batch_size: int = 64, device: str = "cpu",
          block: int = STATISTICS_BLOCK, kind: Features = INCEPTION) -> dict:
    """Write the reference batch ``out`` from the images of ``data_path`` (see the module doc); with
    ``network`` (the FID Inception, or the network ``kind`` describes), the statistics over every readable
    image. Returns the record."""
    paths, labels, classes = list_images(data_path)
    labelled = classes != [""]
    order = np.random.default_rng(seed).permutation(len(paths))
    skipped: list[str] = []
    kept_labels: list[int] = []
    read = [0]  # images of ``order`` read so far (a progress bar's estimate of what is left)
    upscaled = [0]  # crops enlarged: images whose short side is under image_size
    out = Path(out)
    with atomic_path(out) as tmp:
        raw_fd, raw_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(raw_fd, "wb") as raw:
                def crops() -> Iterator[np.ndarray]:
                    """Readable crops in ``order``; the first ``max_images`` also go to arr_0."""
                    for index in order:
                        read[0] += 1
                        try:
                            image = open_rgb(paths[index])
                            upscaled[0] += min(image.size) < image_size
                            crop = np.array(center_crop_arr(image, image_size))
                        except ImageError as error:  # recorded relative to the folder (the file may be shared)
                            skipped.append(str(error).replace(str(paths[index]), _relative(paths[index], data_path)))
                            continue
                        if len(kept_labels) < max_images:
                            raw.write(np.ascontiguousarray(crop).tobytes())
                            kept_labels.append(labels[index])
                        yield crop

                stream = _Lookahead(crops())
                if not stream.has(2):
                    raise UserError(f"{data_path}: {len(paths) - len(skipped)} readable image(s) of {len(paths)}; a "
                                    f"reference batch needs at least 2{_first(skipped)}")
                statistics = None
                if network is None:
                    while len(kept_labels) < max_images and stream.take() is not None:
                        pass
                else:
                    statistics = _statistics(network, stream, batch_size, device, block,
                                             lambda: len(order) - read[0] + stream.buffered, kind)
            record = {"image_size": image_size, "images": len(kept_labels), "listed": len(paths), "seed": seed,
                      "statistics_images": None if statistics is None else statistics.pop("count"),
                      "classes": classes if labelled else None, "skipped": skipped, "upscaled": upscaled[0],
                      "features": None if statistics is None else kind.identity}
            arrays = {"arr_1": np.asarray(kept_labels, dtype=np.int64)} if labelled else {}
            arrays.update(statistics or {})
            arrays[RECORD_KEY] = np.array(json.dumps(record))
            _write_npz(tmp, Path(raw_name), (len(kept_labels), image_size, image_size, 3), arrays)
        finally:
            Path(raw_name).unlink(missing_ok=True)
    return record


class _Lookahead:
    """An iterator that can tell whether ``count`` more items remain."""

    def __init__(self, items: Iterator):
        self._items, self._ahead = items, deque()

    def has(self, count: int) -> bool:
        while len(self._ahead) < count:
            item = next(self._items, None)
            if item is None:
                break
            self._ahead.append(item)
        return len(self._ahead) >= count

    @property
    def buffered(self) -> int:
        return len(self._ahead)

    def take(self):
        return self._ahead.popleft() if self.has(1) else None


class _Block:
    """The next ``size`` crops of a stream as the evaluator's image batch (``len``, ``batches``); a block
    never leaves a single image behind it, so every block has at least 2 (a covariance needs 2)."""

    def __init__(self, stream: _Lookahead, size: int, left: int):
        self.stream, self.size, self.left = stream, size, left

    def __len__(self) -> int:
        return min(self.size, self.left)  # the progress bar's estimate (unreadable images are not known yet)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        taken, batch = 0, []
        while self.stream.has(1) and (taken < self.size or not self.stream.has(2)):
            batch.append(self.stream.take())
            taken += 1
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)


def _statistics(network: nn.Module, stream: _Lookahead, batch_size: int, device: str, block: int,
                left: Callable[[], int], kind: Features = INCEPTION) -> dict:
    """mu, sigma, mu_s, sigma_s of every crop in ``stream`` (and their ``count``): the evaluator's features and
    statistics of each block; blocks after the first are pooled exactly (Chan et al.'s parallel mean and
    covariance), a single block is the evaluator's result as it is."""
    first, pooled = None, None  # pooled: count, then (mean, scatter = (n - 1) * covariance) per feature kind
    while stream.has(2):
        features = compute_features(network, _Block(stream, block, left()), batch_size, device, kind)
        n = len(features.pool)
        block_stats = {"": (features.mu, features.sigma), "_s": (features.mu_s, features.sigma_s)}
        if first is None:
            first = {"count": n, **{f"mu{k}": mu for k, (mu, _) in block_stats.items()},
                     **{f"sigma{k}": sigma for k, (_, sigma) in block_stats.items()}}
            pooled = {"count": n, **{k: (mu, sigma * (n - 1)) for k, (mu, sigma) in block_stats.items()}}
            continue
        total = pooled["count"] + n
        for key, (mu, sigma) in block_stats.items():
            mean, scatter = pooled[key]
            delta = mu - mean
            pooled[key] = (mean + delta * (n / total),
                           scatter + sigma * (n - 1) + np.outer(delta, delta) * (pooled["count"] * n / total))
        pooled["count"] = total
    if pooled["count"] == first["count"]:
        return first
    return {"count": pooled["count"], **{f"mu{k}": pooled[k][0] for k in ("", "_s")},
            **{f"sigma{k}": pooled[k][1] / (pooled["count"] - 1) for k in ("", "_s")}}


def _write_npz(path: Path, raw: Path, shape: tuple[int, ...], arrays: dict[str, np.ndarray]) -> None:
    """An ``.npz`` as ``np.savez`` writes it, ``arr_0`` streamed from the raw bytes in ``raw``."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member, open(raw, "rb") as source:
            np.lib.format.write_array_header_1_0(member, header)
            shutil.copyfileobj(source, member, 1 << 24)
        for key, value in arrays.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)


def _relative(path: Path, root: str | Path) -> str:
    root = Path(root) if Path(root).is_dir() else Path(root).parent
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _first(skipped: list[str]) -> str:
    return f" ({len(skipped)} unreadable, first: {skipped[0]})" if skipped else ""


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_path", help="image folder (<class>/<image>, or images directly) or a '<path> <label>' "
                                          "list file")
    parser.add_argument("out", help="the reference batch to write, e.g. data/my_images_256.npz")
    parser.add_argument("--image-size", type=number(int, min=1, max=MAX_IMAGE_SIZE), default=None,
                        help="crop size in pixels: the samples' size (default: 256, or a classifier's own size)")
    parser.add_argument("--max-images", type=number(int, min=2), default=ADM_IMAGES,
                        help="images kept in arr_0, drawn at random (ADM: 10,000)")
    parser.add_argument("--seed", type=number(int, min=0, max=2**32 - 1), default=0, help="of the draw")
    parser.add_argument("--statistics", action="store_true",
                        help="also store the statistics of --features over every image")
    parser.add_argument("--features", type=features_flag, default="inception",
                        help="the statistics' feature network: 'inception' (default; needs --inception-weights) or "
                             "a classifier's .safetensors (python -m evaluations.c2i.classifier)")
    parser.add_argument("--inception-weights", default="pretrained_models/pt_inception-2015-12-05-6726825d.pth",
                        help="with --statistics: pytorch-fid's FID Inception weights (default: %(default)s)")
    parser.add_argument("--batch-size", type=number(int, min=1), default=64, help="images per network forward")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    out = check_output_file(args.out, "out")
    if out.suffix != ".npz":
        raise UserError(f"out {out}: name it <name>.npz (an ADM batch is an .npz)")
    if out.exists():
        raise UserError(f"out {out} exists; delete it or choose another name")
    list_images(args.data_path)  # an empty or missing folder: one line, before the weights load
    network, kind = None, INCEPTION
    if args.statistics or args.features != "inception":
        network, kind = load_features(args.features, args.inception_weights)
        network = network.to(args.device) if args.statistics else None
    image_size = args.image_size or kind.image_size or 256
    if kind.image_size is not None and image_size != kind.image_size:
        raise UserError(f"--image-size {image_size}: the classifier {args.features} judges {kind.image_size} px "
                        f"images; build the reference at {kind.image_size} px, or train a classifier at {image_size}")
    record = build(args.data_path, out, image_size, args.max_images, args.seed, network, args.batch_size,
                   args.device, kind=kind)
    network_name = "Inception" if kind.name == "inception" else "classifier"
    statistics = (f"; {network_name} statistics over {record['statistics_images']} images"
                  if record["statistics_images"] else "")
    print(f"{record['images']} images of {record['listed']} ({image_size}x{image_size})"
          f"{', with labels' if record['classes'] else ''}{statistics} -> {out}")
    if record["upscaled"]:
        print(f"warning: {record['upscaled']} of the images read are smaller than --image-size {image_size} on "
              "their short side and were enlarged; build the reference at the samples' size", file=sys.stderr)
    if record["skipped"]:
        print(f"skipped {len(record['skipped'])} unreadable image(s), listed in its {RECORD_KEY}; first: "
              f"{record['skipped'][0]}")


if __name__ == "__main__":
    run_main(main)
