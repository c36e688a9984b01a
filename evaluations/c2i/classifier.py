r"""A small CNN classifier of an image folder's classes: the feature network of the evaluator on data that
Inception does not know (the embedded demo's synthetic classes), the way FID's Inception serves ImageNet.

    python -m evaluations.c2i.classifier --images data/synthetic --output runs/classifier --image-size 32
    python -m evaluations.c2i.reference_batch data/synthetic_heldout data/ref.npz --image-size 32 \
        --statistics --features runs/classifier/classifier.safetensors
    python -m evaluations.c2i.evaluator data/ref.npz samples/<sample name>.npz \
        --features runs/classifier/classifier.safetensors

The folder is an ImageFolder (``<class>/<image>``, classes numbered in sorted order as ``preprocess_tokens.py``
numbers them, so a class-conditional model's labels are the classifier's) or a ``<path> <label>`` list file.
Each image is prepared as the reference batch prepares it (RGB, ADM's center crop to ``--image-size``). A
seeded, class-stratified ``--holdout`` share of the images (``dpar.data.splits``) is kept out of training and
its accuracy reported. The network (:class:`ClassifierCNN`): three stages of two 3x3 convolutions (batch norm,
ReLU), max pooling between them, global average pooling, one linear layer; trained with AdamW and a one-cycle
learning rate, no augmentation. The evaluator reads three outputs: the pooled ``4 * width`` features before
the linear layer (FID, precision/recall), the first :data:`SPATIAL_CHANNELS` channels of the second stage's
pooled map on an at most :data:`SPATIAL_GRID` square grid (sFID) and the logits (the IS formula, class
accuracy). ``<output>/classifier.safetensors`` holds the weights with the record in its metadata (all the
evaluator needs); ``<output>/classifier.json`` the same record: classes in label order, image size, width,
held-out accuracy, the training command. Both are written atomically, after training; an existing one is
refused.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn
from tqdm import tqdm

from dpar.data.splits import holdout_split
from dpar.errors import ArgumentParser, UserError, first_line, run_main
from dpar.fileio import atomic_path, atomic_write_text, check_output_dir, claim_outputs
from dpar.validation import MAX_IMAGE_SIZE, device, number
from tokenizer.images import list_images
from tokenizer.transforms import ImageError, load_center_crop

WEIGHTS_FILE = "classifier.safetensors"
RECORD_FILE = "classifier.json"
METADATA_KEY = "dpar_classifier"  # the record, in the weights' safetensors metadata
SPATIAL_CHANNELS = 4  # sFID: channels of the second stage's map kept (ADM keeps 7 of Inception's mixed_6/conv)
SPATIAL_GRID = 8      # ... on at most this square grid (8 x 8 x 4 = 256 features from 32 px up)


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class ClassifierCNN(nn.Module):
    """float ``[N, 3, S, S]`` images in 0..255 -> (pooled features ``[N, 4 * width]``, spatial features
    ``[N, g, g, SPATIAL_CHANNELS]`` with ``g = min(SPATIAL_GRID, S // 4)``, logits ``[N, num_classes]``)."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.stage1 = nn.Sequential(_conv(3, width), _conv(width, width))
        self.stage2 = nn.Sequential(_conv(width, 2 * width), _conv(2 * width, 2 * width))
        self.stage3 = nn.Sequential(_conv(2 * width, 4 * width), _conv(4 * width, 4 * width))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = (images - 127.5) / 127.5
        x = F.max_pool2d(self.stage1(x), 2)
        x = F.max_pool2d(self.stage2(x), 2)
        grid = min(SPATIAL_GRID, x.shape[-1])
        spatial = F.adaptive_avg_pool2d(x[:, :SPATIAL_CHANNELS], grid).permute(0, 2, 3, 1)
        pool = self.stage3(x).mean(dim=(2, 3))
        return pool, spatial, self.head(pool)


def spatial_size(image_size: int) -> int:
    """How many spatial features (sFID) a classifier of ``image_size`` px gives per image."""
    return min(SPATIAL_GRID, image_size // 4) ** 2 * SPATIAL_CHANNELS


def load_classifier(path: str | Path) -> tuple[ClassifierCNN, dict]:
    """The classifier at ``path`` (eval mode) and its record; one line when the file is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"classifier not found: {path} (train one with python -m evaluations.c2i.classifier)")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"cannot read {path} as a classifier's .safetensors ({first_line(error)})") from None
    if METADATA_KEY not in metadata:
        raise UserError(f"{path} is not a classifier of python -m evaluations.c2i.classifier (no {METADATA_KEY} "
                        "in its metadata)")
    record = json.loads(metadata[METADATA_KEY])
    model = ClassifierCNN(len(record["classes"]), record["width"])
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UserError(f"{path}: its weights do not fit its record ({first_line(error)})") from None
    return model.eval(), record


def load_folder(data_path: str | Path, image_size: int) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(uint8 ``[N, S, S, 3]`` center crops, int64 labels, class names, unreadable files) of an image folder;
    one line when it has no classes or fewer than two readable images a class."""
    paths, labels, classes = list_images(data_path)
    if classes == [""]:
        raise UserError(f"--images {data_path}: a classifier needs class subfolders (<class>/<image>) or a "
                        "'<path> <label>' list; this folder holds images directly")
    crops, kept, skipped = [], [], []
    for image_path, label in zip(tqdm(paths, desc="images", unit="img", leave=False), labels):
        try:
            crops.append(load_center_crop(image_path, image_size))
        except ImageError as error:
            skipped.append(str(error))
            continue
        kept.append(label)
    counts = np.bincount(np.asarray(kept, dtype=np.int64), minlength=len(classes))
    if counts.min() < 2:
        name = classes[int(counts.argmin())]
        raise UserError(f"--images {data_path}: class {name!r} has {counts.min()} readable image(s); every class "
                        "needs at least 2 (one to train on, one to hold out)")
    return np.stack(crops), np.asarray(kept, dtype=np.int64), classes, skipped


def _as_input(images: np.ndarray, device: str) -> Tensor:
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float()


@torch.no_grad()
def predict(model: ClassifierCNN, images: np.ndarray, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """Predicted labels of uint8 ``[N, S, S, 3]`` images."""
    model.eval()
    return np.concatenate([model(_as_input(images[i:i + batch_size], device))[2].argmax(1).cpu().numpy()
                           for i in range(0, len(images), batch_size)])


def train(images: np.ndarray, labels: np.ndarray, num_classes: int, width: int = 16, epochs: int = 10,
          batch_size: int = 64, lr: float = 3e-3, seed: int = 0, device: str = "cpu",
          held_out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[ClassifierCNN, list[float]]:
    """Train a :class:`ClassifierCNN` on uint8 ``[N, S, S, 3]`` images; returns it (eval mode) and the
    held-out accuracy after each epoch (empty without ``held_out``)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ClassifierCNN(num_classes, width).to(device)
    steps_per_epoch = max(len(images) // batch_size, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
    targets = torch.from_numpy(labels).to(device)
    accuracies: list[float] = []
    with tqdm(total=epochs * steps_per_epoch, desc="classifier", unit="step") as bar:
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(images), generator=generator)
            for step in range(steps_per_epoch):
                index = order[step * batch_size:(step + 1) * batch_size]
                loss = F.cross_entropy(model(_as_input(images[index.numpy()], device))[2], targets[index.to(device)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", **({"held_out": f"{accuracies[-1]:.3f}"}
                                                               if accuracies else {}))
            if held_out is not None:
                accuracies.append(float((predict(model, held_out[0], device=device) == held_out[1]).mean()))
                bar.set_postfix(loss=f"{loss.item():.3f}", held_out=f"{accuracies[-1]:.3f}")
    return model.eval(), accuracies


def save(model: ClassifierCNN, record: dict, output: Path) -> None:
    """``classifier.safetensors`` (the record in its metadata) and ``classifier.json`` in ``output``, each
    written atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(output / WEIGHTS_FILE) as tmp:  # bytes into the claimed temporary: the umask's mode
        tmp.write_bytes(save_safetensors(state, metadata={METADATA_KEY: json.dumps(record)}))
    atomic_write_text(output / RECORD_FILE, json.dumps(record, indent=1) + "\n")


def _first_image_size(data_path: str | Path) -> int:
    """The short side of the folder's first image: the default ``--image-size``."""
    from tokenizer.transforms import open_rgb

    paths, _, _ = list_images(data_path)
    for image_path in paths:
        try:
            return min(open_rgb(image_path).size)
        except ImageError:
            continue
    raise UserError(f"--images {data_path}: no readable image")


def relative_to_cwd(argument: str) -> str:
    """An absolute path inside the working directory (alone or as ``--flag=path``) as a relative one, resolved
    (links, ``..``), so a shipped record names no machine's folders; any other argument unchanged."""
    flag, equals, value = argument.partition("=") if argument.startswith("-") else ("", "", argument)
    path, here = Path(value), Path.cwd().resolve()
    if not path.is_absolute() or not path.resolve().is_relative_to(here):
        return argument
    return f"{flag}{equals}{path.resolve().relative_to(here)}"


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="image folder (<class>/<image>) or '<path> <label>' list")
    parser.add_argument("--output", required=True, help=f"folder to write {WEIGHTS_FILE} and {RECORD_FILE} into")
    parser.add_argument("--image-size", type=number(int, min=8, max=MAX_IMAGE_SIZE), default=None,
                        help="crop size in pixels, the size of the images it will judge (default: the short side "
                             "of the folder's first image)")
    parser.add_argument("--epochs", type=number(int, min=1), default=10)
    parser.add_argument("--width", type=number(int, min=1), default=16, help="channels of the first stage")
    parser.add_argument("--batch-size", type=number(int, min=1), default=64)
    parser.add_argument("--lr", type=number(float, gt=0), default=3e-3, help="peak learning rate")
    parser.add_argument("--holdout", type=number(float, gt=0, lt=1), default=0.1,
                        help="share of the images held out of training, drawn per class (default: %(default)s)")
    parser.add_argument("--seed", type=number(int, min=0, max=2**31 - 1), default=0,
                        help="of the hold-out draw, the initialisation and the batch order")
    parser.add_argument("--device", type=device, default="cpu")
    args = parser.parse_args(argv)
    output = check_output_dir(args.output, "--output")
    for name in (WEIGHTS_FILE, RECORD_FILE):
        if (output / name).exists():
            raise UserError(f"--output {output} already holds {name}; delete it or choose another folder")
    image_size = args.image_size or _first_image_size(args.images)
    images, labels, classes, skipped = load_folder(args.images, image_size)
    holdout = max(round(args.holdout * len(labels)), 1)
    train_index, held_index = holdout_split(labels, min(holdout, len(labels) - len(classes)), args.seed)
    claims = claim_outputs({output / WEIGHTS_FILE: "--output", output / RECORD_FILE: "--output"})
    print(f"{len(train_index)} training and {len(held_index)} held-out images of {len(classes)} classes "
          f"({image_size}x{image_size}){f'; skipped {len(skipped)} unreadable' if skipped else ''}")
    started = time.perf_counter()
    held_out = (images[held_index], labels[held_index])
    model, accuracies = train(images[train_index], labels[train_index], len(classes), args.width, args.epochs,
                              args.batch_size, args.lr, args.seed, args.device, held_out)
    command = "python -m evaluations.c2i.classifier " + shlex.join(
        map(relative_to_cwd, sys.argv[1:] if argv is None else argv))
    record = {"classes": classes, "image_size": image_size, "width": args.width,
              "features": {"pool": 4 * args.width, "spatial": spatial_size(image_size), "logits": len(classes)},
              "held_out": {"images": len(held_index), "accuracy": accuracies[-1], "seed": args.seed},
              "train_images": len(train_index), "epochs": args.epochs, "seconds": round(time.perf_counter() - started, 1),
              "skipped": skipped, "command": command}
    save(model.cpu(), record, output)
    for claim in claims:
        claim.release()
    print(f"held-out accuracy {accuracies[-1]:.4f} ({len(held_index)} images) -> {output / WEIGHTS_FILE}")


if __name__ == "__main__":
    run_main(main)
