r"""Sample a class grid and a patch-boundary map from a training run or a released LlamaGen checkpoint.

    python sample_c2i.py --experiment_dir data/model_checkpoints/global_model_entropy_row_break_b/20250820_13 --output-dir samples
    python sample_c2i.py --experiment_dir <run> --classes 207 360 387 974 --cfg-scale 4.0 --threshold 8.0
    python sample_c2i.py --experiment_dir <run> --epoch latest          # a run still in its first epoch
    python sample_c2i.py --gpt-model GPT-L --gpt-ckpt c2i_L_256.pt --vq-ckpt vq_ds16_c2i.pt --image-size 256
    python sample_c2i.py --experiment_dir <run> --prefix-image photo.jpg --prefix-rows 6 --classes 207

Writes ``<output-dir>/<sample name>.png`` (one row per class, labelled with its id and the store's class
name) and, for DPAR, ``<sample name>_patches.png``: the same images tinted by patch length (legend below)
with a dark line where each patch starts. With ``--prefix-image``, each row is the image (a red line
under its kept rows) followed by completions that keep its first ``--prefix-rows`` token rows
(``<sample name>_completion-<image>-rows-<R>.png`` and its ``_patches.png``). Prints the weights loaded, tokens per patch and
seconds per image. The PNGs record the run that made them (text chunk ``dpar_run``); where another run's
files hold the name, this run's get the run appended (``sample_cli.sample_name``, printed).
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpar.errors import ArgumentParser, UserError, run_main
from dpar.fileio import check_output_dir, check_output_file, claim_outputs
from dpar.sampling import Generation
from dpar.validation import device, number
from dpar.visual import image_grid, patch_map, save_png, with_patch_legend, with_row_labels
from sample_cli import (RUN_KEY, add_sampling_arguments, run_record, sample_file_stem, sample_name, sampler_from_args,
                        sampling_from_args)
from tokenizer.transforms import load_center_crop

IMAGENET_SHOWCASE = [207, 360, 387, 974, 88, 979, 417, 279]  # LlamaGen's sample_c2i.py classes


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(parser, cfg_scale=4.0)  # LlamaGen's sample_c2i.py default
    parser.add_argument("--classes", type=number(int, min=0), nargs="+", default=None,
                        help="class ids in [0, classes), one grid row each (default: LlamaGen's 8 on ImageNet, "
                             "else every class)")
    parser.add_argument("--per-class", type=number(int, min=1), default=8, help="images per class")
    parser.add_argument("--batch-size", type=number(int, min=1), default=32,
                        help="images sampled at once (each image has its own seed: its tokens do not depend on it)")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    completion = parser.add_argument_group("image completion (outpainting downward)")
    completion.add_argument("--prefix-image", default=None, help="an image whose top token rows are kept")
    completion.add_argument("--prefix-rows", type=number(int, min=1), default=None,
                            help="token rows of --prefix-image kept, in [1, grid rows)")
    args = parser.parse_args(argv)
    if (args.prefix_image is None) != (args.prefix_rows is None):
        raise UserError("--prefix-image and --prefix-rows go together (the image, and how many token rows of it "
                        "to keep)")
    if args.prefix_image is not None and not Path(args.prefix_image).is_file():
        raise UserError(f"--prefix-image {args.prefix_image}: no such file")
    check_output_dir(args.output_dir, "--output-dir")

    sampler = sampler_from_args(args, args.device)
    sampler.check(sampling_from_args(args))
    print(f"sampling {sampler.weights} ({sampler.name})")
    num_classes = sampler.model_config.num_classes
    classes = args.classes or (IMAGENET_SHOWCASE if num_classes == 1000 else list(range(num_classes)))
    outside = [c for c in classes if c >= num_classes]
    if outside:
        raise UserError(f"--classes {outside[0]}: the model has {num_classes} classes, ids 0 to {num_classes - 1} "
                        f"(id {num_classes} is the null class that guidance uses)")
    stem = sample_file_stem(sampler.name, sampling_from_args(args), args.seed, args.threshold, args.max_patch_length,
                            sampler.patcher is not None and sampler.patcher.mode == "self_entropy", args.ema)
    if args.prefix_image is not None:
        stem += f"_completion-{Path(args.prefix_image).stem}-rows-{args.prefix_rows}"
    run = run_record(sampler)
    stem, note = sample_name(args.output_dir, stem, (".png", "_patches.png"), run)
    if note:
        print(note)
    grid_path = check_output_file(Path(args.output_dir) / f"{stem}.png", "the sample grid")
    map_path = check_output_file(Path(args.output_dir) / f"{stem}_patches.png", "the patch map")

    names = sampler.class_names
    row_labels = [f"{c} {names[c]}" if names else str(c) for c in classes]
    check_picture_size(args, len(classes), args.per_class + (args.prefix_image is not None),
                       sampler.model_config.image_size, row_labels, sampler.patcher is not None)

    prefix, original = None, None
    if args.prefix_image is not None:
        if sampler.grid < 2:
            raise UserError(f"--prefix-image: the model's images have {sampler.grid} token row; completion keeps "
                            "some rows and samples the others")
        if args.prefix_rows >= sampler.grid:
            raise UserError(f"--prefix-rows {args.prefix_rows}: the model's images have {sampler.grid} token rows; "
                            f"keep 1 to {sampler.grid - 1} of them")
        original = torch.from_numpy(load_center_crop(args.prefix_image, sampler.model_config.image_size))
        codes = sampler.vq.images_to_codes(original[None].to(args.device))
        prefix = codes[:, :args.prefix_rows * sampler.grid].repeat(len(classes) * args.per_class, 1)
    claim_outputs({grid_path: "the sample grid",  # once every input is checked: a second writer stops here
                   **({map_path: "the patch map"} if sampler.patcher is not None else {})})

    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    seeds = args.seed * 1_000_003 + torch.arange(len(labels))
    started = time.perf_counter()
    batches = [sampler.sample(labels[i:i + args.batch_size].to(args.device), seeds[i:i + args.batch_size],
                              sampling_from_args(args), progress=True,
                              prefix=None if prefix is None else prefix[i:i + args.batch_size],
                              static_shapes=args.static_shapes) for i in range(0, len(labels), args.batch_size)]
    images = torch.cat([batch.cpu() for batch, _ in batches])
    out = Generation(*(torch.cat([getattr(record, key).cpu() for _, record in batches])
                       for key in ("tokens", "patch_start", "global_steps")))
    seconds = time.perf_counter() - started

    height = images.shape[1]
    if original is None:
        pictures = images
    else:  # each row: the image, a red line under its kept rows, then its completions
        cut = original.clone()
        cut[args.prefix_rows * height // sampler.grid - 1] = torch.tensor([230, 30, 30], dtype=torch.uint8)
        pictures = torch.cat([torch.cat([cut[None], images[k * args.per_class:(k + 1) * args.per_class].cpu()])
                              for k in range(len(classes))])
    columns = args.per_class + (original is not None)
    record = {RUN_KEY: json.dumps(run)}
    save_png(with_row_labels(image_grid(pictures, nrow=columns), row_labels, height), grid_path, record)
    print(f"{len(labels)} images of {len(classes)} class{'es' * (len(classes) > 1)} in {seconds:.1f} s "
          f"({seconds / len(labels):.3f} s/image) -> {grid_path}")
    if sampler.patcher is not None:
        maps = patch_map(images, out.patch_start, sampler.grid)
        picture = with_patch_legend(with_row_labels(image_grid(maps, nrow=args.per_class), row_labels, height))
        save_png(picture, map_path, record)
        tokens_per_patch = out.tokens.numel() / float(out.global_steps.sum())
        print(f"{tokens_per_patch:.2f} tokens per patch, {out.global_steps.float().mean():.1f} global steps per image "
              f"-> {map_path}")


def check_picture_size(args: argparse.Namespace, rows: int, columns: int, size: int, row_labels: list[str],
                       patch_map: bool) -> None:
    """``UserError`` naming ``--per-class`` and ``--classes``, before any sampling, when the picture of ``rows`` x
    ``columns`` images of ``size`` px (with its row labels, and the patch map's legend) would hold more pixels than
    Pillow opens by default (``PIL.Image.MAX_IMAGE_PIXELS``; None: no bound). Each size is the one the pictures
    are then built with: the grid's formula, the label margin and legend of empty pictures."""
    if Image.MAX_IMAGE_PIXELS is None:
        return
    pad = 2  # image_grid's
    height, width = rows * (size + pad) + pad, columns * (size + pad) + pad
    width += with_row_labels(np.zeros((1, 0, 3), np.uint8), row_labels, size).shape[1]
    sizes = [(height, width)]
    if patch_map:
        legend = with_patch_legend(np.zeros((0, 1, 3), np.uint8)).shape  # a strip, widened to the map
        sizes.append((height + legend[0], max(width, legend[1])))
    height, width = max(sizes, key=lambda shape: shape[0] * shape[1])
    if height * width > Image.MAX_IMAGE_PIXELS:
        raise UserError(f"--per-class {args.per_class} x {rows} classes (--classes) make a {width} x {height} px "
                        f"picture ({height * width / 1e6:,.0f} Mpx), more than the {Image.MAX_IMAGE_PIXELS / 1e6:,.0f}"
                        " Mpx Pillow opens (PIL.Image.MAX_IMAGE_PIXELS); sample fewer per picture (sample_c2i_ddp.py "
                        "samples any number into an .npz)")


if __name__ == "__main__":
    run_main(main)
