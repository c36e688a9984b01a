"""The embedded dataset: procedurally generated, class-conditional RGB images.

Twelve classes of shapes and textures in two colours of a 12-colour palette, at random positions and
sizes, on flat or softly textured backgrounds. A palette rather than any RGB colour keeps the job of a
tiny tokenizer (a few codes per colour and edge) within reach of a few CPU minutes. Large flat areas (low entropy, long patches) meet sharp edges and fine
texture (high entropy, short patches), so dynamic patching has something to find. Image ``i`` of
seed ``s`` is a pure function of (s, i, size).

    python -m dpar.data.synthetic --output data/synthetic --num-images 2000 --image-size 64

writes an ImageFolder (``<output>/<NN>_<class>/<index>.png``) that goes through the same
``preprocess_tokens.py`` path as ImageNet. Rerunning skips images already written.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dpar.errors import ArgumentParser, UserError, run_main
from dpar.fileio import atomic_write_text, check_output_dir
from dpar.validation import number
from dpar.visual import save_png

PALETTE = np.array([(230, 25, 75), (245, 130, 48), (255, 225, 25), (60, 180, 75), (70, 240, 240), (0, 130, 200),
                    (145, 30, 180), (240, 50, 230), (255, 255, 255), (20, 20, 20), (128, 128, 128), (170, 110, 40)],
                   dtype=np.float64)  # red orange yellow green cyan blue purple magenta white black grey brown
CLASSES = ("disc", "square", "triangle", "ring", "cross", "h_stripes", "v_stripes", "checker", "diagonal",
           "target", "gradient", "dots")


IDENTITY_FILE = ".synthetic.json"  # the size and seed of the images in a folder


def class_folder(label: int) -> str:
    """Folder name whose sort order is the label order."""
    return f"{label:02d}_{CLASSES[label]}"


def synthetic_image(index: int, size: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Image ``index`` as ``uint8 [size, size, 3]`` and its label (``index % 12``)."""
    label = index % len(CLASSES)
    rng = np.random.default_rng([seed, index, size])
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    background = _background(rng, x, y)
    colour = _contrasting_colour(rng, background.reshape(-1, 3).mean(0))
    if CLASSES[label] == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle), 0, 1)[..., None]
        image = (1 - t) * background.reshape(-1, 3).mean(0) + t * colour
    else:
        cx, cy = rng.uniform(0.3, 0.7, 2)
        radius = rng.uniform(0.25, 0.38)
        mask = _shape(CLASSES[label], x - cx, y - cy, radius, rng)
        image = np.where(mask[..., None], colour, background)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


def _background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    base = PALETTE[rng.integers(len(PALETTE))]
    image = np.broadcast_to(base, x.shape + (3,)).copy()
    if rng.random() < 0.4:  # soft texture: a few low-frequency waves of small amplitude
        for _ in range(3):
            fx, fy = rng.uniform(0.5, 2.5, 2)
            phase = rng.uniform(0, 2 * np.pi)
            image += rng.uniform(4, 12) * np.sin(2 * np.pi * (fx * x + fy * y) + phase)[..., None]
    return image


def _contrasting_colour(rng: np.random.Generator, against: np.ndarray) -> np.ndarray:
    distinct = PALETTE[np.abs(PALETTE - against).sum(1) > 150]
    return distinct[rng.integers(len(distinct))]


def _shape(name: str, dx: np.ndarray, dy: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    distance = np.hypot(dx, dy)
    box = (np.abs(dx) < r) & (np.abs(dy) < r)
    period = rng.uniform(0.1, 0.14)  # >= 3 px at 32 px, so a 4x tokenizer still sees it
    if name == "disc":
        return distance < r
    if name == "square":
        return box
    if name == "triangle":
        return (dy < r / 2) & (dy > 2 * np.abs(dx) - r)
    if name == "ring":
        return (distance < r) & (distance > r * rng.uniform(0.5, 0.75))
    if name == "cross":
        arm = r * rng.uniform(0.2, 0.35)
        return box & ((np.abs(dx) < arm) | (np.abs(dy) < arm))
    if name == "h_stripes":
        return box & (np.floor(dy / period) % 2 == 0)
    if name == "v_stripes":
        return box & (np.floor(dx / period) % 2 == 0)
    if name == "checker":
        return box & ((np.floor(dx / period) + np.floor(dy / period)) % 2 == 0)
    if name == "diagonal":
        return box & (np.floor((dx + dy) / period) % 2 == 0)
    if name == "target":
        return (distance < r) & (np.floor(distance / (period * 0.8)) % 2 == 0)
    if name == "dots":
        spacing = period * 1.6
        return box & (np.hypot((dx % spacing) - spacing / 2, (dy % spacing) - spacing / 2) < spacing / 3.5)
    raise ValueError(f"unknown synthetic class {name!r}")


def write_image_folder(output: str | Path, num_images: int, image_size: int, seed: int = 0) -> Path:
    """Write images ``0 .. num_images-1`` as PNGs in ImageFolder layout; existing files are kept (a rerun
    continues), but only in a folder of the same size and seed (recorded in ``.synthetic.json``)."""
    output = Path(output)
    identity, marker = {"image_size": image_size, "seed": seed}, output / IDENTITY_FILE
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text())
        except ValueError:
            recorded = None
        if recorded != identity:
            raise UserError(f"{output} holds synthetic images made with {recorded}, this run asks for {identity}; "
                            "use another --output")
    elif output.is_dir() and any(output.iterdir()):
        raise UserError(f"{output} holds files that are not synthetic images of this module (no {IDENTITY_FILE}); "
                        "use another --output")
    atomic_write_text(marker, json.dumps(identity) + "\n")
    for label in range(len(CLASSES)):
        (output / class_folder(label)).mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(num_images), desc="synthetic images", unit="img"):
        path = output / class_folder(index % len(CLASSES)) / f"{index:06d}.png"
        if not path.exists():
            save_png(synthetic_image(index, image_size, seed)[0], path)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write <NN>_<class>/<index>.png into")
    parser.add_argument("--num-images", type=number(int, min=1), default=2000, help="images in all (classes take turns)")
    parser.add_argument("--image-size", type=number(int, min=8), default=64, help="side in pixels, >= 8")
    parser.add_argument("--seed", type=number(int, min=0, max=2**31 - 1), default=0, help="dataset seed")
    args = parser.parse_args(argv)
    check_output_dir(args.output, "--output")
    print(f"wrote {write_image_folder(args.output, args.num_images, args.image_size, args.seed)}")


if __name__ == "__main__":
    run_main(main)
