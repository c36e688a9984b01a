"""Tokens per patch and patches per image of a token store's entropies (paper Table 6), for one or more θ.

    python -m dpar.data.stats --store data/imagenet256_tokens --threshold 7.8 --max-patch-length 4
    python -m dpar.data.stats --store data/imagenet256_tokens --threshold 7.0 7.4 7.8 8.2 --max-patch-length none
    python -m dpar.data.stats --store data/imagenet256_tokens --target-tokens-per-patch 1.81   # which θ gives 1.81?
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

from dpar.errors import ArgumentParser, UserError, run_main
from dpar.patcher import PatcherConfig, calibrate_threshold, patch_start_mask
from dpar.validation import field_type, number

from .store import TokenStore


def store_patch_stats(store: TokenStore, thresholds: list[float], max_patch_length: int | None, row_break: bool,
                      max_images: int | None = None, batch_size: int = 4096) -> list[dict[str, float]]:
    """Mean tokens per patch and patches per image over every view of (the first ``max_images``) images."""
    count = len(store) if max_images is None else min(max_images, len(store))
    if count == 0:
        raise UserError(f"token store {store.path} has no images")
    patches = np.zeros(len(thresholds))
    for lo in tqdm(range(0, count, batch_size), desc="patch stats", unit="batch"):
        entropies = torch.from_numpy(np.stack([store.entropies(i) for i in range(lo, min(lo + batch_size, count))])
                                     .astype(np.float32)).flatten(0, 1)
        for t, threshold in enumerate(thresholds):
            patches[t] += patch_start_mask(entropies, grid_width=store.grid, threshold=threshold,
                                           max_patch_length=max_patch_length, row_break=row_break).sum().item()
    sequences, tokens = count * store.views, count * store.views * store.num_tokens
    return [{"threshold": threshold, "tokens_per_patch": tokens / p, "patches_per_image": p / sequences}
            for threshold, p in zip(thresholds, patches)]


def store_threshold(store: TokenStore, target: float, max_patch_length: int | None, row_break: bool,
                    max_images: int | None = 2000) -> float:
    """θ giving ``target`` tokens per patch on every view of (the first ``max_images``) images."""
    count = len(store) if max_images is None else min(max_images, len(store))
    if count == 0:
        raise UserError(f"token store {store.path} has no images")
    entropies = torch.from_numpy(np.stack([store.entropies(i) for i in range(count)]).astype(np.float32))
    return calibrate_threshold(entropies.flatten(0, 1), store.grid, target, max_patch_length=max_patch_length,
                               row_break=row_break)


def _cap(text: str) -> int | None:
    """P, or None for ``none`` / ``0`` (no cap, as sample_c2i.py's --max-patch-length 0)."""
    return None if text.lower() in ("none", "null") else number(int, min=0)(text) or None


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="token store with entropies")
    parser.add_argument("--threshold", type=field_type(PatcherConfig, "threshold"), nargs="+", default=[7.8],
                        help="θ in nats; several for a sweep")
    parser.add_argument("--max-patch-length", type=_cap, default=4, help="P >= 1; 0 or 'none' = no cap")
    parser.add_argument("--no-row-break", action="store_true", help="let patches run across grid rows")
    parser.add_argument("--max-images", type=number(int, min=1), default=None, help="only the first N images")
    parser.add_argument("--target-tokens-per-patch", type=number(float, min=1), default=None,
                        help="instead of --threshold: find the θ that gives this mean patch length (>= 1)")
    args = parser.parse_args(argv)
    cap = args.max_patch_length
    store = TokenStore(args.store)
    if args.target_tokens_per_patch is not None:
        args.threshold = [store_threshold(store, args.target_tokens_per_patch, cap, not args.no_row_break,
                                          args.max_images)]
    rows = store_patch_stats(store, args.threshold, cap, not args.no_row_break, args.max_images)
    print(f"{store.path}: {store.grid}x{store.grid} tokens, P={cap}, row break {'off' if args.no_row_break else 'on'}")
    print("| threshold | tokens/patch | patches/image |\n|---|---|---|")
    for row in rows:
        # θ in full: it is copied into configs, and entropies of a weak entropy model crowd within 0.01 nats
        print(f"| {row['threshold']:.6g} | {row['tokens_per_patch']:.3f} | {row['patches_per_image']:.1f} |")


if __name__ == "__main__":
    run_main(main)
