r"""Sample a class grid and a patch-boundary map from a training run.

    python sample_c2i.py --experiment_dir results/global_model_entropy_row_break/20250820_13 --output-dir samples
    python sample_c2i.py --experiment_dir <run> --classes 207 360 387 974 --cfg-scale 4.0 --threshold 8.0

Writes ``<output-dir>/<sample name>.png`` (one row per class) and, for DPAR, ``<sample name>_patches.png``:
the same images tinted by patch length (red = 1 token ... blue = 7+) with a dark line where each patch
starts. Prints tokens per patch and seconds per image.
"""
import argparse
import time

import torch

from dpar.errors import ArgumentParser, UserError, run_main
from dpar.fileio import check_output_dir
from dpar.sampling import Sampler, add_sampling_arguments, sample_file_stem, sampling_from_args
from dpar.validation import device, number
from dpar.visual import image_grid, patch_map, save_png

IMAGENET_SHOWCASE = [207, 360, 387, 974, 88, 979, 417, 279]  # LlamaGen's sample_c2i.py classes


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(parser, cfg_scale=4.0)  # LlamaGen's sample_c2i.py default
    parser.add_argument("--classes", type=number(int, min=0), nargs="+", default=None,
                        help="class ids in [0, classes), one grid row each (default: LlamaGen's 8 on ImageNet, "
                             "else every class)")
    parser.add_argument("--per-class", type=number(int, min=1), default=8, help="images per class")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    check_output_dir(args.output_dir, "--output-dir")

    sampler = Sampler.from_experiment(args.experiment_dir, args.epoch, ema=args.ema, vq_checkpoint=args.vq_ckpt,
                                      device=args.device, threshold=args.threshold,
                                      max_patch_length=args.max_patch_length)
    sampler.check(sampling_from_args(args))
    num_classes = sampler.model_config.num_classes
    classes = args.classes or (IMAGENET_SHOWCASE if num_classes == 1000 else list(range(num_classes)))
    outside = [c for c in classes if c >= num_classes]
    if outside:
        raise UserError(f"--classes {outside[0]}: the model has {num_classes} classes, ids 0 to {num_classes - 1} "
                        f"(id {num_classes} is the null class that guidance uses)")
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    seeds = args.seed * 1_000_003 + torch.arange(len(labels))
    started = time.perf_counter()
    images, out = sampler.sample(labels.to(args.device), seeds, sampling_from_args(args), progress=True)
    seconds = time.perf_counter() - started

    stem = sample_file_stem(sampler.epoch, sampling_from_args(args), args.seed, args.threshold, args.max_patch_length)
    grid_path = save_png(image_grid(images, nrow=args.per_class), f"{args.output_dir}/{stem}.png")
    print(f"{len(labels)} images of {len(classes)} classes in {seconds:.1f} s ({seconds / len(labels):.3f} s/image) "
          f"-> {grid_path}")
    if sampler.patcher is not None:
        maps = patch_map(images, out.patch_start, sampler.grid)
        map_path = save_png(image_grid(maps, nrow=args.per_class), f"{args.output_dir}/{stem}_patches.png")
        tokens_per_patch = out.tokens.numel() / float(out.global_steps.sum())
        print(f"{tokens_per_patch:.2f} tokens per patch, {out.global_steps.float().mean():.1f} global steps per image "
              f"-> {map_path}")


if __name__ == "__main__":
    run_main(main)
