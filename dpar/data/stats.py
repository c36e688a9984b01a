"""Tokens per patch and patches per image of a token store's entropies (paper Table 6), for one or more θ.

    python -m dpar.data.stats --store data/imagenet256_tokens --threshold 7.8 --max-patch-length 4
    python -m dpar.data.stats --store data/imagenet256_tokens --threshold 7.0 7.4 7.8 8.2 --max-patch-length none
    python -m dpar.data.stats --store data/imagenet256_tokens --target-tokens-per-patch 1.81   # which θ gives 1.81?

Measured on the training split (``--val-holdout`` / ``--split-seed`` as the trainers' ``data.val_holdout`` /
``data.split_seed``), on a seeded class-stratified sample of ``--max-images`` of its images (default 10000; 0: all).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

from dpar.errors import ArgumentParser, UserError, run_main
from dpar.patcher import PatcherConfig, calibrate_threshold, patch_start_mask
from dpar.validation import field_type, number

from .splits import holdout_problem, holdout_split, stratified_sample
from .store import TokenStore


def calibration_images(store: TokenStore, val_holdout: int = 0, split_seed: int = 0,
                       max_images: int | None = None) -> np.ndarray:
    """The images θ is calibrated and patch statistics are measured on: the store's training split (all
    images but the trainers' ``data.val_holdout`` draw with ``data.split_seed``,
    :func:`~dpar.data.splits.holdout_split`), or a seeded class-stratified sample of ``max_images`` of them.
    Sorted image indices; ``UserError`` when the store has no images or the hold-out does not fit."""
    if len(store) == 0:
        raise UserError(f"token store {store.path} has no images")
    problem = holdout_problem(store.labels, val_holdout)
    if problem is not None:
        raise UserError(f"val_holdout {val_holdout} for token store {store.path}: {problem}")
    train, _ = holdout_split(store.labels, val_holdout, split_seed)
    if max_images is None or max_images >= len(train):
        return train
    return train[stratified_sample(store.labels[train], max_images, split_seed)]


def _entropies(store: TokenStore, images: np.ndarray) -> torch.Tensor:
    """``[len(images) * views, N]`` float32 entropies of every view of ``images``."""
    return torch.from_numpy(np.stack([store.entropies(int(i)) for i in images]).astype(np.float32)).flatten(0, 1)


def store_patch_stats(store: TokenStore, thresholds: list[float], max_patch_length: int | None, row_break: bool,
                      images: np.ndarray | None = None, batch_size: int = 4096) -> list[dict[str, float]]:
    """Mean tokens per patch and patches per image over every view of ``images`` (default: all images)."""
    images = np.arange(len(store)) if images is None else images
    if len(images) == 0:
        raise UserError(f"token store {store.path} has no images")
    patches = np.zeros(len(thresholds))
    for lo in tqdm(range(0, len(images), batch_size), desc="patch stats", unit="batch"):
        entropies = _entropies(store, images[lo:lo + batch_size])
        for t, threshold in enumerate(thresholds):
            patches[t] += patch_start_mask(entropies, grid_width=store.grid, threshold=threshold,
                                           max_patch_length=max_patch_length, row_break=row_break).sum().item()
    sequences, tokens = len(images) * store.views, len(images) * store.views * store.num_tokens
    return [{"threshold": threshold, "tokens_per_patch": tokens / p, "patches_per_image": p / sequences}
            for threshold, p in zip(thresholds, patches)]


def store_threshold(store: TokenStore, target: float, max_patch_length: int | None, row_break: bool,
                    images: np.ndarray) -> float:
    """The θ (nats) giving ``target`` tokens per patch over every view of ``images``: the one θ calibration
    of the project (the demo, the small-scale study and this module's CLI), how the paper chose θ = 7.8 for
    1.81 tokens per patch (arXiv 2512.21867, section 4.1). Pass :func:`calibration_images`, the training
    split, so validation images never set θ. See :func:`dpar.patcher.calibrate_threshold`.

    Rounded to 6 significant digits, the value written into configs: θ lies mid-gap between two stored
    (float16) entropies, which at ~1.5 nats lie 0.001 apart, so 6 digits patch exactly as the exact θ."""
    if len(images) == 0:
        raise UserError(f"token store {store.path}: no images to calibrate θ on")
    theta = calibrate_threshold(_entropies(store, images), store.grid, target, max_patch_length=max_patch_length,
                                row_break=row_break)
    return float(f"{theta:.6g}")


def describe_images(store_images: int, images: int, val_holdout: int, split_seed: int) -> str:
    """Which images a calibration used, for reports: e.g. "3800 of 4000 images (all of the training split:
    a stratified 200-image hold-out, split seed 0)"."""
    what = "all" if images == store_images - val_holdout else f"a stratified sample (seed {split_seed})"
    held = f"a stratified {val_holdout}-image hold-out, split seed {split_seed}" if val_holdout else "no hold-out"
    return f"{images} of {store_images} images ({what} of the training split: {held})"


def missed_target(reached: float, target: float) -> bool:
    """Is a calibrated mean patch length more than 2% away from its target?"""
    return abs(reached - target) > 0.02 * target


def _cap(text: str) -> int | None:
    """P, or None for ``none`` / ``0`` (no cap, as sample_c2i.py's --max-patch-length 0)."""
    return None if text.lower() in ("none", "null") else number(int, min=0)(text) or None


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="token store with entropies")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--threshold", type=field_type(PatcherConfig, "threshold"), nargs="+", default=[7.8],
                       help="θ in nats; several for a sweep")
    parser.add_argument("--max-patch-length", type=_cap, default=4, help="P >= 1; 0 or 'none' = no cap")
    parser.add_argument("--no-row-break", action="store_true", help="let patches run across grid rows")
    parser.add_argument("--val-holdout", type=number(int, min=0), default=0,
                        help="the trainers' data.val_holdout: measure on the training split only (default 0: all)")
    parser.add_argument("--split-seed", type=number(int, min=0, max=2**31 - 1), default=0,
                        help="the trainers' data.split_seed; also seeds the --max-images sample")
    parser.add_argument("--max-images", type=number(int, min=0), default=10000,
                        help="a seeded class-stratified sample of N training images (default 10000; 0: all)")
    which.add_argument("--target-tokens-per-patch", type=number(float, min=1), default=None,
                       help="instead of --threshold: find the θ that gives this mean patch length (>= 1), or the "
                            "closest one the entropies allow")
    args = parser.parse_args(argv)
    cap = args.max_patch_length
    store = TokenStore(args.store)
    images = calibration_images(store, args.val_holdout, args.split_seed, args.max_images or None)
    if args.target_tokens_per_patch is not None:
        args.threshold = [store_threshold(store, args.target_tokens_per_patch, cap, not args.no_row_break, images)]
    rows = store_patch_stats(store, args.threshold, cap, not args.no_row_break, images)
    print(f"{store.path}: {store.grid}x{store.grid} tokens, P={cap or 'none (no cap)'}, row break "
          f"{'off' if args.no_row_break else 'on'}; "
          f"{describe_images(len(store), len(images), args.val_holdout, args.split_seed)}, every view")
    if args.target_tokens_per_patch is not None and missed_target(rows[0]["tokens_per_patch"], args.target_tokens_per_patch):
        print(f"note: no θ gives {args.target_tokens_per_patch} tokens per patch on these entropies; the closest is "
              f"{rows[0]['tokens_per_patch']:.3f} (an entropy model whose entropies take few distinct values)")
    print("| threshold | tokens/patch | patches/image |\n|---|---|---|")
    for row in rows:
        # θ in full: it is copied into configs, and entropies of a weak entropy model crowd within 0.01 nats
        print(f"| {row['threshold']:.6g} | {row['tokens_per_patch']:.3f} | {row['patches_per_image']:.1f} |")


if __name__ == "__main__":
    run_main(main)
